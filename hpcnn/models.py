"""Models as data: the built-in architectures and model files (``--model``).

``--model`` names the network ``python -m hpcnn.train`` (and a ``Trainer`` without a model) trains:

- ``mlp`` (the default): Dense layers of ``--hidden`` widths with ``--activation`` between them,
  from the data's features to its outputs (``hpcnn.core.model.mlp_layers``);
- ``lenet``: LeNet-5 for 1x28x28 images (conv5-6, relu, maxpool2, conv5-16, relu, maxpool2, dense
  120, relu, dense 84, relu, dense classes);
- ``cnn-digits``: a small convolutional network for the built-in ``digits`` (1x8x8 images): conv3-16
  pad 1, relu, conv3-32 pad 1, relu, maxpool2, dense 64, relu, dense classes; it takes any image
  whose sides are even;
- ``cnn-cifar``: the CIFAR-sized network of the benchmark (3x32x32: conv3-32, conv3-32, maxpool2,
  conv3-64, conv3-64, maxpool2, all convolutions pad 1 and followed by relu, dense 256, relu, dense
  classes); it takes any image whose sides divide by 4;
- ``FILE.toml``: a model file, one ``[[layers]]`` table per layer: ``type`` (a layer class:
  ``Dense``, ``Conv2D``, ``ReLU``, ...) and the class's constructor arguments, exactly the spec a
  checkpoint stores and ``Trainer`` accepts as dicts; an optional top-level ``input_shape`` (the
  row shape the model is written for, as hpcnn states it: ``[features]`` or ``[H, W, C]``) is
  checked against the data.

Every error is a ``UserError`` naming the file, the layer and what to change; whether the layers
take the data's rows and give one value per output is checked where the data is known
(``hpcnn.training.setup.check_model``).
"""

import inspect
import math
from pathlib import Path

# Imported for their layer classes (Conv2D and the pooling layers; Dropout; BatchNorm, LayerNorm),
# which importing registers with ``layer_from_spec``: model files and checkpoints name them.
import hpcnn.core.conv  # noqa: F401
import hpcnn.core.dropout  # noqa: F401
import hpcnn.core.norm  # noqa: F401
from hpcnn.config import MODELS, load_toml
from hpcnn.core.layers import LAYER_TYPES, Layer, layer_from_spec
from hpcnn.core.model import as_shape
from hpcnn.errors import UserError

BUILTIN_MODELS = MODELS  # named in hpcnn.config, which checks --model without importing numpy


def model_layers(model: str, in_shape, outputs: int, where: str) -> list:
    """The layers of the built-in ``model`` (not ``mlp``: its widths are config fields) or of the
    model file ``model``, for rows of shape ``in_shape`` (from ``where``) and ``outputs`` values out."""
    shape = as_shape(in_shape)
    if model == "lenet":
        return layers_from_specs(lenet(shape, outputs, where), "lenet")
    if model == "cnn-digits":
        return layers_from_specs(cnn_digits(shape, outputs, where), "cnn-digits")
    if model == "cnn-cifar":
        return layers_from_specs(cnn_cifar(shape, outputs, where), "cnn-cifar")
    if model.endswith(".toml"):
        layers, wanted = read_model_file(model)
        if wanted is not None and wanted != shape:
            raise UserError(
                f"model file {model} is written for rows of shape {wanted} (input_shape); "
                f"{where} has rows of shape {shape}"
            )
        return layers
    raise UserError(f"model = {model!r}: expected one of {', '.join(BUILTIN_MODELS)} or a FILE.toml")


def _image(shape: tuple, model: str, where: str, needs: str) -> tuple:
    if len(shape) != 3:
        raise UserError(
            f"--model {model} takes images ({needs}); {where} has flat rows of {shape[0]} features "
            "(give the data as images: see docs/data.md)"
        )
    return shape


def lenet(in_shape: tuple, classes: int, where: str = "the data") -> list[dict]:
    """LeNet-5's layer specs for 28x28 images of one channel (``(28, 28, 1)`` rows)."""
    _image(in_shape, "lenet", where, "1x28x28")
    if tuple(in_shape) != (28, 28, 1):
        h, w, c = in_shape
        raise UserError(f"--model lenet takes 1x28x28 images; {where} has {c}x{h}x{w} images")
    return [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 6, "kernel": 5},  # -> 24x24x6
        {"type": "ReLU"},
        {"type": "MaxPool2D", "kernel": 2},  # -> 12x12x6
        {"type": "Conv2D", "in_channels": 6, "out_channels": 16, "kernel": 5},  # -> 8x8x16
        {"type": "ReLU"},
        {"type": "MaxPool2D", "kernel": 2},  # -> 4x4x16
        {"type": "Flatten"},
        {"type": "Dense", "fan_in": 4 * 4 * 16, "fan_out": 120},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 120, "fan_out": 84},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 84, "fan_out": classes, "init": "xavier"},
    ]


def cnn_digits(in_shape: tuple, classes: int, where: str = "the data") -> list[dict]:
    """The ``cnn-digits`` layer specs for ``(H, W, C)`` images with even ``H`` and ``W``
    (``digits``: 8x8x1)."""
    h, w, c = _image(in_shape, "cnn-digits", where, "CxHxW, H and W even, such as digits' 1x8x8")
    if h % 2 or w % 2:
        raise UserError(f"--model cnn-digits takes images of even height and width; {where} has {c}x{h}x{w}")
    return [
        {"type": "Conv2D", "in_channels": c, "out_channels": 16, "kernel": 3, "padding": 1},
        {"type": "ReLU"},
        {"type": "Conv2D", "in_channels": 16, "out_channels": 32, "kernel": 3, "padding": 1},
        {"type": "ReLU"},
        {"type": "MaxPool2D", "kernel": 2},  # -> (h/2, w/2, 32)
        {"type": "Flatten"},
        {"type": "Dense", "fan_in": (h // 2) * (w // 2) * 32, "fan_out": 64},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 64, "fan_out": classes, "init": "xavier"},
    ]


def cnn_cifar(in_shape: tuple, classes: int, where: str = "the data") -> list[dict]:
    """The ``cnn-cifar`` layer specs (a CIFAR-sized VGG-style network, the benchmark's) for ``(H,
    W, C)`` images with ``H`` and ``W`` divisible by 4 (CIFAR-10: 32x32x3)."""
    h, w, c = _image(in_shape, "cnn-cifar", where, "CxHxW, H and W divisible by 4, such as 3x32x32")
    if h % 4 or w % 4:
        raise UserError(f"--model cnn-cifar takes images whose sides divide by 4; {where} has {c}x{h}x{w}")

    def conv(cin, cout):
        return [{"type": "Conv2D", "in_channels": cin, "out_channels": cout, "kernel": 3, "padding": 1},
                {"type": "ReLU"}]  # fmt: skip

    return [
        *conv(c, 32), *conv(32, 32), {"type": "MaxPool2D", "kernel": 2},  # -> (h/2, w/2, 32)
        *conv(32, 64), *conv(64, 64), {"type": "MaxPool2D", "kernel": 2},  # -> (h/4, w/4, 64)
        {"type": "Flatten"},
        {"type": "Dense", "fan_in": (h // 4) * (w // 4) * 64, "fan_out": 256},
        {"type": "ReLU"},
        {"type": "Dense", "fan_in": 256, "fan_out": classes, "init": "xavier"},
    ]  # fmt: skip


def layers_from_specs(specs, where: str) -> list[Layer]:
    """Layer objects from spec dicts (``{"type": ..., **arguments}``); ``UserError`` naming the
    layer (``where``: the model's name or file) for an unknown type or arguments that do not fit."""
    layers = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise UserError(f"{where}: layer {i} is {spec!r}: expected a table with a type")
        kind = spec.get("type")
        if not isinstance(kind, str):
            raise UserError(f'{where}: layer {i} ({spec}) has no type = "<layer class>"')
        if kind not in LAYER_TYPES:
            known = ", ".join(sorted(k for k in LAYER_TYPES if k != "Layer"))
            raise UserError(f"{where}: layer {i}: unknown layer type {kind!r}; known types: {known}")
        try:
            layers.append(layer_from_spec(spec))
        except (TypeError, ValueError, AssertionError) as exc:  # a constructor's own checks
            raise UserError(f"{where}: layer {i} ({kind}): {exc}") from None
        except UserError as exc:
            raise UserError(f"{where}: layer {i}: {exc}") from None
    return layers


def read_model_file(path) -> tuple[list[Layer], tuple | None]:
    """The layers of a model file and its ``input_shape`` (``None`` if it states none)."""
    path = Path(path)
    where = f"model file {path}"
    doc = load_toml(path, "model file")
    unknown = sorted(set(doc) - {"layers", "input_shape"})
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}; a model file has [[layers]] and input_shape"
        )
    specs = doc.get("layers")
    if not isinstance(specs, list) or not specs:
        raise UserError(f'{where} has no layers: one [[layers]] table per layer, each with type = "..."')
    shape = doc.get("input_shape")
    if shape is not None:
        ok = isinstance(shape, list) and len(shape) in (1, 3)
        if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise UserError(
                f"{where}: input_shape = {shape!r}: expected [features] or [H, W, C] (positive integers)"
            )
        shape = tuple(shape)
    return layers_from_specs(specs, where), shape


def model_file_text(layers, input_shape=None) -> str:
    """A model file that ``read_model_file`` reads back as ``layers`` (their specs)."""
    lines = []
    if input_shape is not None:
        lines += [f"input_shape = {list(as_shape(input_shape))}", ""]
    for layer in layers:
        lines.append("[[layers]]")
        defaults = inspect.signature(type(layer).__init__).parameters
        for key, value in layer.spec().items():
            if value is None and key in defaults and defaults[key].default is None:
                continue  # TOML has no None: left out, the argument takes its default, None
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if value is None:
        raise UserError("a layer argument of None that is not its default has no TOML form")
    return repr(value)
