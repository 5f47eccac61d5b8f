"""The ``Trainer`` API: the same training as the command, callbacks, predict, save/load, user layers.

Serial tests run the trainer on one rank (``Comm.serial()``); the MPI tests (``--with-mpi``) check
that N ranks give what one rank gives, and that a layer defined here trains in a 2-stage pipeline
and resumes bitwise from its checkpoint.
"""

import os
import re

import numpy as np
import pytest
from launch import ROOT, run
from test_checkpoint import tensors

import hpcnn
from hpcnn import SGD, Adam, Dense, Layer, ReLU, Sequential, Sigmoid, Trainer
from hpcnn.core.params import ParamSpec
from hpcnn.errors import JobError, UserError
from hpcnn.io.checkpoints import checkpoints
from hpcnn.io.datasets import synthetic_arrays, write_h5
from hpcnn.parallel.comm import Comm


class TrainerTestGain(Layer):
    """``y = x * (1 + g) + c`` per feature: a layer hpcnn does not ship, with parameters of its own
    (both start at zero: the layer starts as the identity)."""

    def __init__(self, width: int):
        self.width = width

    def param_specs(self):
        return [ParamSpec("g", (self.width,), "zeros"), ParamSpec("c", (self.width,), "zeros")]

    def bind(self, params, grads):
        self.g, self.c, self.dg, self.dc = params["g"], params["c"], grads["g"], grads["c"]

    def forward(self, x, saved, ws=None):
        if saved is not None:
            saved["x"] = x
        return x * (1 + self.g) + self.c  # (rows, width)

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=None):
        x = saved.pop("x")
        dg, dc = (x * dy).sum(axis=0), dy.sum(axis=0)
        if accumulate:
            self.dg += dg
            self.dc += dc
        else:
            self.dg[...], self.dc[...] = dg, dc
        return dy * (1 + self.g) if need_dx else None

    def flops(self, in_shape):
        return 6.0 * in_shape[0]


def data(rows=240, features=12, classes=4, seed=3):
    """Training and held-out rows of the synthetic clusters (float32 inputs, int64 labels)."""
    x, y = synthetic_arrays(rows, features, classes, seed, 0)
    xt, yt = synthetic_arrays(rows // 4, features, classes, seed, 1)
    return x, y, xt, yt


TESTS = ROOT / "tests"
SETTINGS = dict(epochs=3, batch_size=32, seed=4, lr=0.01, eval_every=0, log_every=0)


@pytest.fixture(scope="module")
def comm():
    return Comm.serial()


def mlp(features=12, classes=4):
    # what --hidden 16 builds: He for the ReLU layer, Xavier for the logits
    return [Dense(features, 16, init="he"), ReLU(), Dense(16, classes, init="xavier")]


def test_the_trainer_on_arrays_equals_the_command_on_the_same_file(comm, tmp_path):
    from hpcnn.train import main

    x, y, xt, yt = data()
    path = str(tmp_path / "d.h5")
    write_h5(path, x, y, xt, yt, 4)
    flags = ["--epochs", "3", "--batch-size", "32", "--seed", "4", "--lr", "0.01", "--eval-every", "0"]
    flags += ["--log-every", "0", "--hidden", "16", "--run-dir", "", "--quiet"]
    assert main(["--data", path, *flags, "--checkpoint-dir", str(tmp_path / "cli")]) == 0
    command = tensors(checkpoints(tmp_path / "cli")[0])
    for name, model in (("api", mlp()), ("mlp", None)):  # user layers, and the command's own model
        trainer = Trainer(model, hpcnn.arrays(x, y, xt, yt), comm=comm, log=None, **SETTINGS,
                          hidden=[16], checkpoint_dir=str(tmp_path / name))  # fmt: skip
        result = trainer.fit()
        assert result.steps == 3 * 8 and result.final["split"] == "held-out"
        api = tensors(checkpoints(tmp_path / name)[0])
        assert api.keys() == command.keys()
        for key in command:
            np.testing.assert_array_equal(api[key], command[key], err_msg=f"{name}: {key}")


def test_a_2_h_1_sigmoid_mlp_with_mse_and_plain_sgd_learns_xor(comm):
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([[0], [1], [1], [0]], dtype=np.float64)
    model = Sequential([Dense(2, 4), Sigmoid(), Dense(4, 1), Sigmoid()])
    trainer = Trainer(
        model, hpcnn.arrays(x, y), loss="mse", optimizer=SGD(), lr=2.0, lr_schedule="constant",
        batch_size=4, epochs=2000, dtype="float64", seed=1, log_every=0, comm=comm, log=None,
    )  # fmt: skip
    result = trainer.fit()
    assert trainer.config.optimizer == "sgd" and trainer.config.momentum == 0.0
    out = trainer.predict(x)
    assert out.shape == (4, 1) and list((out[:, 0] > 0.5).astype(int)) == [0, 1, 1, 0]
    assert result.final["loss"] < 0.01 and result.final["accuracy"] is None
    assert trainer.evaluate() == {k: result.final[k] for k in ("loss", "accuracy", "rows")}


def test_on_epoch_returning_true_stops_as_that_many_epochs_would(comm):
    x, y, xt, yt = data()
    common = dict(SETTINGS, epochs=8, lr_schedule="constant", comm=comm, log=None)
    seen = []

    def on_epoch(row):
        seen.append(row["epoch"])
        return row["epoch"] == 3

    stopped = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), on_epoch=on_epoch, **common).fit()
    straight = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), **dict(common, epochs=3)).fit()
    assert seen == [1, 2, 3] and len(stopped.history) == 3 and stopped.steps == straight.steps == 24
    np.testing.assert_array_equal(stopped.model.params.data, straight.model.params.data)
    assert stopped.final == straight.final and stopped.final["rows"] == len(xt)  # the final evaluation ran


def test_on_step_returning_true_stops_as_max_steps_would(comm):
    x, y, xt, yt = data()
    common = dict(SETTINGS, lr_schedule="constant", log_every=1, comm=comm, log=None)
    steps = []
    stopped = Trainer(mlp(), hpcnn.arrays(x, y), on_step=lambda r: steps.append(r["step"]) or r["step"] == 11,
                      **common).fit()  # fmt: skip
    straight = Trainer(mlp(), hpcnn.arrays(x, y), **dict(common, max_steps=11)).fit()
    assert steps == list(range(1, 12)) and stopped.steps == 11
    np.testing.assert_array_equal(stopped.model.params.data, straight.model.params.data)
    assert [r["loss"] for r in stopped.history] == [r["loss"] for r in straight.history]


def test_a_failing_callback_is_one_error_not_a_hang(comm):
    x, y, _, _ = data()
    with pytest.raises(JobError, match="the on_epoch callback raised ZeroDivisionError: division by zero"):
        Trainer(mlp(), hpcnn.arrays(x, y), on_epoch=lambda row: 1 / 0, comm=comm, log=None, **SETTINGS).fit()


def test_predict_equals_a_forward_through_the_model(comm):
    x, y, xt, yt = data()
    trainer = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), comm=comm, log=None, **SETTINGS)
    before = trainer.predict(xt)  # before fit: the initial parameters
    np.testing.assert_array_equal(before, trainer.model.forward(xt, train=False))
    trainer.fit()
    out = trainer.predict(xt)
    assert out.shape == (len(xt), 4) and out.dtype == np.float32 and not np.array_equal(out, before)
    np.testing.assert_array_equal(out, trainer.model.forward(xt, train=False))
    scores = trainer.evaluate()
    assert scores["accuracy"] == np.mean(out.argmax(axis=1) == yt) and scores["rows"] == len(xt)


def test_save_then_load_into_a_fresh_trainer_gives_the_same_bits(comm, tmp_path):
    x, y, xt, yt = data()
    settings = dict(SETTINGS, comm=comm, log=None)
    trainer = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), optimizer=Adam(beta2=0.99), **settings)
    trainer.fit()
    path = trainer.save(tmp_path / "saved")
    assert os.path.basename(path) == "ckpt-000000024.h5"
    fresh = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), optimizer=Adam(beta2=0.99), **settings)
    assert not np.array_equal(fresh.model.params.data, trainer.model.params.data)
    fresh.load(path)
    np.testing.assert_array_equal(fresh.model.params.data, trainer.model.params.data)
    assert trainer.optimizer is trainer.result.optimizer and fresh.optimizer.t == trainer.optimizer.t > 0
    for name, buffer in trainer.optimizer.state.items():
        np.testing.assert_array_equal(fresh.optimizer.state[name], buffer)
    np.testing.assert_array_equal(fresh.predict(xt), trainer.predict(xt))
    # a checkpoint of another optimizer is refused, naming both
    other = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), optimizer="sgd", **settings)
    with pytest.raises(JobError, match=r"adam state \['m', 'v'\], this run's sgd keeps \[\]"):
        other.load(path)


def test_models_from_specs_and_wrong_settings_are_clear(comm):
    x, y, _, _ = data()
    specs = [layer.spec() for layer in mlp()]
    a = Trainer(specs, hpcnn.arrays(x, y), comm=comm, log=None, **SETTINGS).fit()
    b = Trainer(mlp(), hpcnn.arrays(x, y), comm=comm, log=None, **SETTINGS).fit()
    np.testing.assert_array_equal(a.model.params.data, b.model.params.data)
    with pytest.raises(UserError, match="Trainer: unknown key 'lrate'"):
        Trainer(mlp(), hpcnn.arrays(x, y), comm=comm, lrate=0.1)
    with pytest.raises(UserError, match="momentum = 0.5 contradicts the optimizer SGD"):
        Trainer(mlp(), hpcnn.arrays(x, y), comm=comm, optimizer=SGD(momentum=0.9), momentum=0.5)
    with pytest.raises(
        JobError, match=r"layer 0 \(Dense\(10, 16\)\) cannot take the rows .* 10 values, not of shape \(12,\)"
    ):
        Trainer([Dense(10, 16), ReLU(), Dense(16, 4)], hpcnn.arrays(x, y), comm=comm, log=None).fit()
    with pytest.raises(JobError, match="the model gives 3 values per row; arrays has 4 classes"):
        Trainer([Dense(12, 3)], hpcnn.arrays(x, y), comm=comm, log=None).fit()
    with pytest.raises(JobError, match=r'y holds regression targets; .* \(use loss="mse"'):
        Trainer([Dense(12, 1)], hpcnn.arrays(x, y.astype(np.float32)), comm=comm, log=None).fit()
    with pytest.raises(UserError, match="x has 240 rows, y 239"):
        hpcnn.arrays(x, y[:-1])


def test_importing_hpcnn_imports_neither_numpy_nor_mpi4py():
    code = "import sys, hpcnn; print(sorted(m for m in ('numpy', 'mpi4py', 'h5py') if m in sys.modules))"
    out = run(code, check=True)
    assert out.stdout.strip() == "[]"
    assert {"Trainer", "Sequential", "SGD", "arrays", "Interrupted", "Result"} <= set(dir(hpcnn))


def test_one_optimizer_object_given_to_two_trainers_is_bound_to_neither(comm):
    x, y, xt, yt = data()
    opt = SGD(momentum=0.9)
    runs = [
        Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), optimizer=opt, comm=comm, **SETTINGS) for _ in range(2)
    ]
    first, second = (t.fit() for t in runs)
    assert runs[0].optimizer is not runs[1].optimizer and runs[0].optimizer.params is runs[0].model.params
    np.testing.assert_array_equal(first.model.params.data, second.model.params.data)


def test_evaluate_imports_the_module_that_defines_a_checkpoints_user_layer(tmp_path):
    train = (
        "import sys; sys.path.insert(0, sys.argv[1]); import hpcnn, user_layers\n"
        "from hpcnn import Dense, ReLU, Trainer\n"
        "t = Trainer([Dense(64, 16), user_layers.Scale(16), ReLU(), Dense(16, 10)], 'digits',\n"
        "            epochs=1, log=None, checkpoint_dir=sys.argv[2])\n"
        "print(t.fit().final['loss'])\n"
    )
    trained = run(train, [TESTS, tmp_path / "ckpt"], check=True)
    path = str(next((tmp_path / "ckpt").glob("ckpt-*.h5")))
    env = {"PYTHONPATH": str(TESTS)}
    missing = run("hpcnn.evaluate", ["--checkpoint", path], env=env)
    assert missing.returncode == 2, missing.stderr
    assert "Scale" in missing.stderr and "import" in missing.stderr, missing.stderr
    scored = run("hpcnn.evaluate", ["--checkpoint", path, "--import", "user_layers"], env=env)
    assert scored.returncode == 0, scored.stderr
    loss = float(re.search(r"loss (\d+\.\d+)", scored.stdout).group(1))
    assert abs(loss - float(trained.stdout)) < 5e-5, (scored.stdout, trained.stdout)
    wrong = run("hpcnn.evaluate", ["--checkpoint", path, "--import", "no_such_module_here"], env=env)
    assert wrong.returncode == 2 and "--import no_such_module_here" in wrong.stderr, wrong.stderr
