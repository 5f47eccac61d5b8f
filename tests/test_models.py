"""Models as data (``--model``, ``hpcnn.models``) and image data through the API and the commands.

- a model file reads back as the layers it lists, and the layers' specs write the same file again;
- the built-in ``lenet`` and ``cnn-digits`` have the shapes and parameter counts of their
  definitions, and ``--model mlp`` (the default) is the MLP the command always built;
- every mistake in a model file or a model/data mismatch is one ``UserError`` that names it;
- a ``Trainer`` takes ``model="cnn-digits"`` or a model file; ``Trainer.predict`` and
  ``python -m hpcnn.evaluate --predict`` take images in either layout and give what flat rows give.
"""

import math

import h5py
import numpy as np
import pytest

import hpcnn
from hpcnn.config import Config, resolve
from hpcnn.core.model import Sequential, describe
from hpcnn.errors import JobError, UserError
from hpcnn.io.datasets import arrays, open_dataset
from hpcnn.models import cnn_digits, layers_from_specs, lenet, model_file_text, model_layers, read_model_file
from hpcnn.parallel.comm import Comm
from hpcnn.training.setup import check_model, command_layers

MLP_FILE = """\
input_shape = [8, 8, 1]

[[layers]]
type = "Dense"
fan_in = 64
fan_out = 32

[[layers]]
type = "BatchNorm"
channels = 32

[[layers]]
type = "GELU"
approximate = "tanh"

[[layers]]
type = "Dropout"
p = 0.1

[[layers]]
type = "Dense"
fan_in = 32
fan_out = 10
init = "xavier"
"""

CNN_FILE = """\
[[layers]]
type = "Conv2D"
in_channels = 1
out_channels = 4
kernel = 3
padding = 1

[[layers]]
type = "ReLU"

[[layers]]
type = "MaxPool2D"
kernel = 2

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
fan_in = 64
fan_out = 10
"""


def _digits():
    return open_dataset(Config(), 0, 1)[0]


def test_a_model_file_reads_back_as_its_layers_and_their_specs_write_it_again(tmp_path):
    path = tmp_path / "mlp.toml"
    path.write_text(MLP_FILE)
    layers, shape = read_model_file(path)
    assert shape == (8, 8, 1)
    assert [layer.spec() for layer in layers] == [
        {"type": "Dense", "fan_in": 64, "fan_out": 32, "init": "he"},
        {"type": "BatchNorm", "channels": 32, "eps": 1e-05, "momentum": 0.1},
        {"type": "GELU", "approximate": "tanh"},
        {"type": "Dropout", "p": 0.1},
        {"type": "Dense", "fan_in": 32, "fan_out": 10, "init": "xavier"},
    ]
    again = tmp_path / "again.toml"
    again.write_text(model_file_text(layers, shape))
    layers2, shape2 = read_model_file(again)
    assert shape2 == shape and [x.spec() for x in layers2] == [x.spec() for x in layers]
    # the same specs are what the API takes as dicts
    assert [x.spec() for x in layers_from_specs([x.spec() for x in layers], "api")] == [
        x.spec() for x in layers
    ]


def test_a_conv_model_file_round_trips_and_fits_digits(tmp_path):
    path = tmp_path / "cnn.toml"
    path.write_text(CNN_FILE)
    layers, shape = read_model_file(path)
    assert shape is None
    specs = [layer.spec() for layer in layers]
    assert specs[0]["type"] == "Conv2D" and specs[0]["padding"] == 1 and specs[0]["kernel"] == 3
    again = tmp_path / "again.toml"
    again.write_text(model_file_text(layers))
    assert [x.spec() for x in read_model_file(again)[0]] == specs
    ds = _digits()
    got = command_layers(Config(model=str(path)), ds)
    check_model(got, ds)
    assert Sequential.shapes(got, ds.in_shape)[1:] == [(8, 8, 4), (8, 8, 4), (4, 4, 4), (64,), (10,)]


def test_the_builtin_specs_follow_their_definitions():
    specs = lenet((28, 28, 1), 10)
    assert [s["type"] for s in specs] == [
        "Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten",
        "Dense", "ReLU", "Dense", "ReLU", "Dense",
    ]  # fmt: skip
    assert [(s["in_channels"], s["out_channels"], s["kernel"]) for s in specs if s["type"] == "Conv2D"] == [
        (1, 6, 5),
        (6, 16, 5),
    ]
    assert [(s["fan_in"], s["fan_out"]) for s in specs if s["type"] == "Dense"] == [
        (256, 120),
        (120, 84),
        (84, 10),
    ]
    specs = cnn_digits((8, 8, 1), 10)
    assert [(s["in_channels"], s["out_channels"], s["padding"]) for s in specs if s["type"] == "Conv2D"] == [
        (1, 16, 1),
        (16, 32, 1),
    ]
    assert [(s["fan_in"], s["fan_out"]) for s in specs if s["type"] == "Dense"] == [(512, 64), (64, 10)]
    assert cnn_digits((6, 4, 3), 5)[-3]["fan_in"] == 3 * 2 * 32  # any image of even sides


def test_the_builtins_have_their_shapes_and_parameter_counts():
    layers = model_layers("lenet", (28, 28, 1), 10, "mnist")
    shapes = Sequential.shapes(layers, (28, 28, 1))
    assert shapes == [
        (28, 28, 1), (24, 24, 6), (24, 24, 6), (12, 12, 6), (8, 8, 16), (8, 8, 16), (4, 4, 16), (256,),
        (120,), (120,), (84,), (84,), (10,),
    ]  # fmt: skip
    assert describe(layers).endswith("(44,426 parameters)")  # as PyTorch's LeNet of the benchmark
    ds = _digits()
    layers = command_layers(Config(model="cnn-digits"), ds)
    check_model(layers, ds)
    assert Sequential.shapes(layers, ds.in_shape)[-5:] == [(4, 4, 32), (512,), (64,), (64,), (10,)]
    assert describe(layers).endswith("(38,282 parameters)")


def test_the_default_model_is_the_mlp_of_hidden_on_digits_as_images():
    ds = _digits()
    assert ds.shape == (8, 8, 1) and ds.in_shape == (8, 8, 1) and ds.features == 64
    layers = command_layers(Config(), ds)
    assert [x.spec() for x in layers] == [
        {"type": "Dense", "fan_in": 64, "fan_out": 256, "init": "he"},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 256, "fan_out": 128, "init": "he"},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 128, "fan_out": 10, "init": "xavier"},
    ]
    check_model(layers, ds)


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[layers]]\ntype = "Conv3D"\n', r"layer 0: unknown layer type 'Conv3D'; known types: .*Dense"),
        ('[[layers]]\ntype = "Dense"\nfan_in = 64\nfanout = 10\n', r"layer 0: .*fanout"),
        ("[[layers]]\nfan_in = 64\n", r"layer 0 .* has no type"),
        (
            '[[layers]]\ntype = "Dense"\nfan_in = 64\nfan_out = 10\n[[layers]]\ntype = 3\n',
            r"layer 1 .*no type",
        ),
        ("input_shape = [8, 8, 1]\n", r"has no layers"),
        ('layer = []\n[[layers]]\ntype = "ReLU"\n', r"unknown key\(s\) layer"),
        ('input_shape = [8, 0]\n[[layers]]\ntype = "ReLU"\n', r"input_shape = \[8, 0\]: expected"),
        ("[[layers\n", r"model file .* is not valid TOML"),
    ],
)
def test_model_file_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_model_file(path)


def test_models_that_do_not_fit_the_data_are_named(tmp_path):
    ds = _digits()
    with pytest.raises(UserError, match=r"--model lenet takes 1x28x28 images; digits has 1x8x8 images"):
        command_layers(Config(model="lenet"), ds)
    flat = arrays(np.zeros((4, 64), np.float32), np.arange(4) % 2, name="flat")
    with pytest.raises(
        UserError, match=r"--model cnn-digits takes images .*flat has flat rows of 64 features"
    ):
        command_layers(Config(model="cnn-digits"), flat)
    odd = arrays(np.zeros((4, 1, 7, 8), np.float32), np.arange(4) % 2, name="odd")
    with pytest.raises(UserError, match=r"even height and width; odd has 1x7x8"):
        command_layers(Config(model="cnn-digits"), odd)
    path = tmp_path / "wide.toml"
    path.write_text(MLP_FILE.replace("fan_in = 64", "fan_in = 65"))
    with pytest.raises(UserError, match=r"model file .* is written for rows of shape \(8, 8, 1\)"):
        command_layers(Config(model=str(path)), flat)
    path.write_text(MLP_FILE.replace("fan_in = 64", "fan_in = 65").replace("input_shape = [8, 8, 1]", ""))
    layers = command_layers(Config(model=str(path)), ds)
    with pytest.raises(UserError, match=r"layer 0 \(Dense\(65, 32\)\) cannot take the rows .*\(8, 8, 1\)"):
        check_model(layers, ds)
    path.write_text(MLP_FILE.replace("fan_out = 10", "fan_out = 3"))
    with pytest.raises(UserError, match=r"the model gives 3 values per row; digits has 10 classes"):
        check_model(command_layers(Config(model=str(path)), ds), ds)
    with pytest.raises(UserError, match=r"model file .*missing.toml does not exist"):
        command_layers(Config(model=str(tmp_path / "missing.toml")), ds)


def test_the_model_setting_is_checked_with_the_config():
    assert resolve(["--model", "cnn-digits"]).model == "cnn-digits"
    assert resolve(["--model", "net.toml"]).model == "net.toml"
    with pytest.raises(
        UserError, match=r"model = 'resnet': expected one of mlp, lenet, cnn-digits, cnn-cifar or a FILE.toml"
    ):
        resolve(["--model", "resnet"])
    with pytest.raises(UserError, match=r"synthetic_image = '3x32': expected CxHxW"):
        resolve(["--synthetic-image", "3x32"])
    with pytest.raises(UserError, match=r"--image-layout: invalid choice: 'chw'"):
        resolve(["--image-layout", "chw"])


def test_a_trainer_takes_a_model_file_and_trains_it(tmp_path):
    path = tmp_path / "mlp.toml"
    path.write_text(MLP_FILE)
    trainer = hpcnn.Trainer(str(path), "digits", comm=Comm.serial(), max_steps=3, eval_every=0, log=None)
    assert trainer.config.model == str(path)
    result = trainer.fit()
    assert [x.spec()["type"] for x in result.layers] == ["Dense", "BatchNorm", "GELU", "Dropout", "Dense"]
    assert result.steps == 3 and math.isfinite(result.final["loss"])


def test_a_trainer_predicts_images_in_either_layout_as_flat_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2, 4, 6)).astype(np.float32)  # (rows, C, H, W)
    y = np.arange(12) % 3
    spec = [
        {"type": "Conv2D", "in_channels": 2, "out_channels": 3, "kernel": 3, "padding": 1},
        {"type": "ReLU"},
        {"type": "Flatten"},
        {"type": "Dense", "fan_in": 4 * 6 * 3, "fan_out": 3},
    ]
    trainer = hpcnn.Trainer(spec, hpcnn.arrays(x, y), comm=Comm.serial(), max_steps=2, eval_every=0, log=None)
    trainer.fit()
    nhwc = x.transpose(0, 2, 3, 1)
    out = trainer.predict(x)
    np.testing.assert_array_equal(trainer.predict(nhwc, image_layout="nhwc"), out)
    np.testing.assert_array_equal(trainer.predict(nhwc.reshape(12, -1)), out)  # flat rows, channels last
    with pytest.raises(
        JobError, match=r"x has rows of shape \(6, 4, 2\); the model takes rows of \(4, 6, 2\)"
    ):
        trainer.predict(x.transpose(0, 1, 3, 2))


def test_images_in_either_layout_train_the_mlp_as_flat_channels_last_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3, 2, 2)).astype(np.float32)
    y = np.arange(20) % 2

    def fit(data):
        trainer = hpcnn.Trainer(
            None, data, comm=Comm.serial(), hidden=[8], max_steps=3, eval_every=0, log=None
        )
        trainer.fit()
        return trainer.model.params.data.copy(), trainer.predict(x)

    flat = x.transpose(0, 2, 3, 1).reshape(20, -1)
    a, b, c = (
        fit(arrays(x, y)),
        fit(arrays(x.transpose(0, 2, 3, 1), y, image_layout="nhwc")),
        fit(arrays(flat, y)),
    )
    for got in (b, c):
        np.testing.assert_array_equal(got[0], a[0])
        np.testing.assert_array_equal(got[1], a[1])


def _mlp_checkpoint(tmp_path, x, y, layout="nchw"):
    trainer = hpcnn.Trainer(
        None, arrays(x, y, image_layout=layout), comm=Comm.serial(), hidden=[6], max_steps=2, eval_every=0,
        log=None, image_layout=layout,
    )  # fmt: skip
    trainer.fit()
    return trainer, trainer.save(tmp_path / "ckpt")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_evaluate_predicts_and_scores_an_image_file(tmp_path, layout):
    from hpcnn.evaluate import predict, score

    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 2, 3, 4)).astype(np.float32)  # (rows, C, H, W)
    stored = x if layout == "nchw" else x.transpose(0, 2, 3, 1)
    y = np.arange(10) % 2
    trainer, ckpt = _mlp_checkpoint(tmp_path, x, y)
    data = tmp_path / "images.h5"
    with h5py.File(data, "w") as f:
        f["x"], f["y"] = stored, y
    out = tmp_path / "pred.h5"
    assert predict(ckpt, out, {"data": str(data), "image_layout": layout}, Comm.serial()) == 10
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["outputs"][...], trainer.predict(x), rtol=1e-6, atol=1e-6)
    metrics = score(ckpt, "training", {"data": str(data), "image_layout": layout}, Comm.serial())
    assert metrics["rows"] == 10
    other = "nhwc" if layout == "nchw" else "nchw"  # the other layout reads 3x4x2 or 4x2x3 images
    with pytest.raises(JobError, match=r"has images of shape .* the checkpoint's model takes 2x3x4 images"):
        predict(ckpt, out, {"data": str(data), "image_layout": other}, Comm.serial())


def test_evaluate_names_a_non_finite_value_of_an_image_row(tmp_path):
    from hpcnn.evaluate import predict

    x = np.ones((6, 1, 2, 3), np.float32)
    x[4, 0, 1, 2] = np.nan
    _, ckpt = _mlp_checkpoint(tmp_path, np.ones((6, 1, 2, 3), np.float32), np.arange(6) % 2)
    data = tmp_path / "nan.h5"
    with h5py.File(data, "w") as f:
        f["x"] = x
    with pytest.raises(JobError, match=r"row 4 has a non-finite input value .*'x'\[4, 0, 1, 2\] = nan"):
        predict(ckpt, tmp_path / "p.h5", {"data": str(data)}, Comm.serial())


def test_a_trainer_takes_a_builtin_model_by_name():
    trainer = hpcnn.Trainer("cnn-digits", "digits", comm=Comm.serial(), max_steps=2, eval_every=0, log=None)
    result = trainer.fit()
    assert trainer.config.model == "cnn-digits" and result.in_shape == (8, 8, 1)
    assert [x.spec()["type"] for x in result.layers][:2] == ["Conv2D", "ReLU"]


@pytest.mark.launches
def test_an_image_file_read_by_rows_at_two_ranks_trains_as_the_flat_file_at_one(tmp_path):
    """Each rank reads its rows of an (N, C, H, W) file and makes them channels-last rows: at 2
    ranks the deterministic training gives the bits one rank gives on the same rows stored flat."""
    from launch import run

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 2, 3, 3)).astype(np.float32), np.arange(40) % 4
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x[:32], y[:32], x[32:], y[32:]
    flat = x.transpose(0, 2, 3, 1).reshape(40, 18)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = flat[:32], y[:32], flat[32:], y[32:]
    common = [
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--deterministic",
        "--run-dir",
        "",
        "--quiet",
    ]
    finals = []
    for name, ranks in (("img.h5", 2), ("flat.h5", None)):
        proc = run("hpcnn.train", ["--data", str(tmp_path / name), *common], ranks=ranks)
        assert proc.returncode == 0, proc.stderr
        finals.append([line.split("; ")[0] for line in proc.stdout.splitlines() if line.startswith("final ")])
    assert finals[0] == finals[1] and finals[0], finals
