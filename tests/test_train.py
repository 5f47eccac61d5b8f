"""Training end to end at one rank, and the command line's behaviour under mpiexec."""

import h5py
import numpy as np
import pytest
from launch import run

from hpcnn.config import Config
from hpcnn.errors import JobError
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit


@pytest.fixture(scope="module")
def comm():
    return Comm.serial()


@pytest.mark.parametrize(
    "settings",
    [
        dict(hidden=[8], activation="tanh", lr=0.05, epochs=200, lr_schedule="constant"),
        # the tutorial's network: sigmoid hidden and output units, MSE, gradient descent (with momentum)
        dict(
            hidden=[4], activation="sigmoid", output_activation="sigmoid", loss="mse",
            optimizer="sgd", lr=2.0, momentum=0.9, epochs=500, lr_schedule="constant",
        ),
    ],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_xor_reaches_full_accuracy(comm, settings, seed):
    result = fit(Config(data="xor", batch_size=4, seed=seed, **settings), comm)
    assert result.final["split"] == "training" and result.final["accuracy"] == 1.0


def test_digits_default_reaches_97_percent_held_out(comm):
    result = fit(Config(), comm)
    assert result.final["split"] == "held-out" and result.final["rows"] == 359
    assert result.final["accuracy"] >= 0.97
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 10


def test_uneven_last_batch_is_trained_and_max_steps_stops(comm):
    cfg = Config(hidden=[16], epochs=2, batch_size=500)  # 1438 rows: 500, 500, 438
    result = fit(cfg, comm)
    assert result.steps == 6 and [row["step"] for row in result.history] == [3, 6]
    assert fit(Config(hidden=[16], epochs=2, batch_size=500, drop_last=True), comm).steps == 4
    assert fit(Config(hidden=[16], epochs=5, max_steps=4, batch_size=500), comm).steps == 4


def test_regression_with_float_targets(comm, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = np.stack([x[:, 0] - 2 * x[:, 1], x[:, 2] ** 2], axis=1).astype(np.float32)  # (256, 2)
    with h5py.File(tmp_path / "reg.h5", "w") as f:
        f["x"], f["y"] = x, y
    result = fit(Config(data=str(tmp_path / "reg.h5"), loss="mse", hidden=[32], epochs=60, lr=0.01), comm)
    assert result.final["accuracy"] is None
    assert result.final["loss"] < 0.05 * result.history[0]["loss"]


@pytest.mark.parametrize(
    "labels,test_labels,attr,message",
    [
        ([0, 1, 2, 4], None, 3, "label 4 is out of range for num_classes = 3"),
        ([0, 1, 2, 2], [5], None, None),  # held-out label above every training label: C = 6, fine
        ([0, 1, -1, 2], None, None, "labels must be class indices >= 0, found -1"),
        ([0, 1, 1, 0], [3], 2, "label 3 is out of range for num_classes = 2"),
    ],
)
def test_labels_are_checked_before_training(comm, tmp_path, labels, test_labels, attr, message):
    path = tmp_path / "labels.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = np.zeros((4, 2), np.float32), np.array(labels)
        if test_labels is not None:
            f["x_test"], f["y_test"] = np.zeros((len(test_labels), 2), np.float32), np.array(test_labels)
        if attr is not None:
            f.attrs["num_classes"] = attr
    cfg = Config(data=str(path), hidden=[4], epochs=1, batch_size=2)
    if message is None:
        assert fit(cfg, comm).model.layers[-1].fan_out == 6
    else:
        with pytest.raises(JobError, match=message) as exc:
            fit(cfg, comm)
        assert exc.value.exit_code == 2


def test_cli_trains_and_reports(tmp_path):
    proc = run("hpcnn.train", ["--epochs", "2", "--hidden", "32"])
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and "final held-out loss" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.launches
@pytest.mark.parametrize(
    "args,message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--epochs", "0"], "epochs = 0: must be a positive integer"),
        (["--batch-size", "3"], "batch_size = 3 is smaller than the 4 data-parallel replicas"),
        (["--pipeline-stages", "3"], "pipeline_stages = 3 does not divide the 4 ranks"),
        (["--pipeline-stages", "2", "--hidden", ""], "pipeline_stages = 2 exceeds the model's 1 layers"),
        (["--pipeline-stages", "2", "--stage-layers", "9"], "stage_layers = [9]: expected 1 increasing"),
        (["--data", "missing.h5"], "data file missing.h5 does not exist"),
        (["--config", "nope.toml"], "config file nope.toml does not exist"),
    ],
)
def test_cli_user_errors_print_one_message_and_fail_on_every_rank(args, message):
    proc = run("hpcnn.train", args, ranks=4, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"hpcnn: error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.count("hpcnn 0.") <= 1


@pytest.mark.launches
def test_cli_help_prints_once_and_succeeds():
    proc = run("hpcnn.train", ["--help"], ranks=4, timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("usage:") == 1 and "--batch-size" in proc.stdout


@pytest.mark.launches
def test_cli_unknown_config_key_names_the_valid_ones(tmp_path):
    (tmp_path / "c.toml").write_text("learning_rate = 0.1\n")
    proc = run("hpcnn.train", ["--config", str(tmp_path / "c.toml")], ranks=2, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("hpcnn: error:") == 1
    assert "unknown key 'learning_rate'; valid keys: model, hidden," in proc.stderr and "lr," in proc.stderr


@pytest.mark.launches
def test_a_rank_failing_alone_mid_training_ends_the_job_fast():
    """Rank 2 raises inside its 5th data read while the others wait in the Allreduce: no hang."""
    inject = (
        "import sys\n"
        "from hpcnn.io import datasets as data\n"
        "from mpi4py import MPI\n"
        "read, calls = data.H5Source.read, []\n"
        "def faulty(self, ids, **parts):\n"
        "    calls.append(1)\n"
        "    if MPI.COMM_WORLD.rank == 2 and len(calls) == 5:\n"
        "        raise RuntimeError('injected fault')\n"
        "    return read(self, ids, **parts)\n"
        "data.H5Source.read = faulty\n"
        "from hpcnn.train import main\n"
        "sys.exit(main(['--epochs', '1']))\n"
    )
    proc = run(inject, ranks=4, timeout=60)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:")]
    assert ours == ["hpcnn: rank 2: internal error: injected fault"], proc.stderr
    assert "final held-out" not in proc.stdout
