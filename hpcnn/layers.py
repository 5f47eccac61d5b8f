"""Layers: forward and backward on views into the flat buffers.

A layer declares the tensors it needs (``param_specs``), receives views of them (``bind``), and
implements ``forward(x, saved)`` and ``backward(dy, saved, need_dx, accumulate)``. Arrays are
``(batch, features)``. What backward needs from forward goes into ``saved``, a dict the caller owns
(``None`` for inference: nothing is kept). Keeping that state outside the layer is what lets a
pipeline stage hold several micro-batches in flight through the same layers.

Weight gradients are written straight into the gradient buffer with ``out=``; with
``accumulate=True`` (micro-batches after the first) they go through one scratch array per layer,
allocated once, and are added. Backward never allocates a parameter-sized array per step.
Nothing here is MLP-specific: a model is any ordered list of layers, and a pipeline stage is a
consecutive run of them.
"""

import math

from hpcnn.backend import xp
from hpcnn.params import ParamSpec


class Layer:
    """Base class: a parameter-free identity."""

    def param_specs(self) -> list[ParamSpec]:
        return []

    def bind(self, params: dict, grads: dict) -> None:
        assert not params and not grads

    def forward(self, x, saved: dict | None):
        return x

    def backward(self, dy, saved: dict, need_dx: bool = True, accumulate: bool = False):
        return dy

    def out_features(self, in_features: int) -> int:
        return in_features

    def flops(self, in_features: int) -> float:
        """Floating-point operations per row, forward and backward (for balancing stages)."""
        return 4.0 * in_features  # elementwise: a few passes over the row

    def spec(self) -> dict:
        """What rebuilds this layer (``layer_from_spec``): checkpoints store the architecture as data."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        return type(self).__name__


class Dense(Layer):
    """``y = x @ W + b`` with ``W`` of shape (fan_in, fan_out)."""

    def __init__(self, fan_in: int, fan_out: int, init: str = "he"):
        self.fan_in, self.fan_out, self.init = fan_in, fan_out, init
        self._dW_part = None  # scratch for accumulated micro-batch gradients, made on first use

    def param_specs(self):
        return [
            ParamSpec("W", (self.fan_in, self.fan_out), self.init, self.fan_in, self.fan_out),
            ParamSpec("b", (self.fan_out,), "zeros"),
        ]

    def bind(self, params, grads):
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]
        self._dW_part = None

    def forward(self, x, saved):
        if saved is not None:
            saved["x"] = x  # (batch, fan_in), kept for dW
        y = x @ self.W  # (batch, fan_out)
        y += self.b
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        x = saved.pop("x")
        if accumulate:
            if self._dW_part is None:
                self._dW_part = xp.empty_like(self.dW)
            xp.matmul(x.T, dy, out=self._dW_part)
            self.dW += self._dW_part
            self.db += dy.sum(axis=0)
        else:
            xp.matmul(x.T, dy, out=self.dW)
            xp.sum(dy, axis=0, out=self.db)
        return dy @ self.W.T if need_dx else None  # (batch, fan_in)

    def out_features(self, in_features):
        assert in_features == self.fan_in, (in_features, self.fan_in)
        return self.fan_out

    def flops(self, in_features):
        return 6.0 * self.fan_in * self.fan_out  # forward x@W, backward dy@W.T and x.T@dy

    def spec(self):
        return {"type": "Dense", "fan_in": self.fan_in, "fan_out": self.fan_out, "init": self.init}

    def __repr__(self):
        return f"Dense({self.fan_in}, {self.fan_out})"


class ReLU(Layer):
    def forward(self, x, saved):
        y = xp.maximum(x, 0)
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        return dy * (saved.pop("y") > 0)


class Sigmoid(Layer):
    def forward(self, x, saved):
        # 0.5 * (1 + tanh(x / 2)) is the logistic function without exp overflow for large |x|.
        y = xp.tanh(0.5 * x)
        y += 1
        y *= 0.5
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        y = saved.pop("y")
        return dy * y * (1 - y)


class Tanh(Layer):
    def forward(self, x, saved):
        y = xp.tanh(x)
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        y = saved.pop("y")
        return dy * (1 - y * y)


class GELU(Layer):
    """GELU with the tanh approximation (as in GPT-2 and BERT)."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x, saved):
        t = xp.tanh(self._C * (x + 0.044715 * x**3))
        if saved is not None:
            saved["x"], saved["t"] = x, t
        return 0.5 * x * (1 + t)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        x, t = saved.pop("x"), saved.pop("t")
        dt = self._C * (1 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dt)

    def flops(self, in_features):
        return 20.0 * in_features


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU, "identity": Layer}

# The initialisation that keeps activations' variance steady through each nonlinearity.
INIT_FOR = {"relu": "he", "gelu": "he", "sigmoid": "xavier", "tanh": "xavier", "identity": "xavier"}

LAYER_TYPES = {cls.__name__: cls for cls in (Layer, Dense, ReLU, Sigmoid, Tanh, GELU)}


def layer_from_spec(spec: dict) -> Layer:
    """The layer ``spec`` describes (the inverse of ``Layer.spec``)."""
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}")
    return LAYER_TYPES[kind](**kwargs)
