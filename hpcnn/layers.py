"""Layers: forward and backward on views into the flat buffers.

A layer declares the tensors it needs (``param_specs``), receives views of them (``bind``), and
implements ``forward(x, train)`` and ``backward(dy, need_dx)``. Arrays are ``(batch, features)``.
Weight gradients are written straight into the gradient buffer with ``out=`` so backward never
allocates a parameter-sized array. Nothing here is MLP-specific: a model is any ordered list of
layers, and a pipeline stage is a consecutive run of them.
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

    def forward(self, x, train: bool = True):
        return x

    def backward(self, dy, need_dx: bool = True):
        return dy

    def out_features(self, in_features: int) -> int:
        return in_features

    def __repr__(self) -> str:
        return type(self).__name__


class Dense(Layer):
    """``y = x @ W + b`` with ``W`` of shape (fan_in, fan_out)."""

    def __init__(self, fan_in: int, fan_out: int, init: str = "he"):
        self.fan_in, self.fan_out, self.init = fan_in, fan_out, init

    def param_specs(self):
        return [
            ParamSpec("W", (self.fan_in, self.fan_out), self.init, self.fan_in, self.fan_out),
            ParamSpec("b", (self.fan_out,), "zeros"),
        ]

    def bind(self, params, grads):
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]

    def forward(self, x, train=True):
        if train:
            self.x = x  # (batch, fan_in), kept for dW
        y = x @ self.W  # (batch, fan_out)
        y += self.b
        return y

    def backward(self, dy, need_dx=True):
        xp.matmul(self.x.T, dy, out=self.dW)
        xp.sum(dy, axis=0, out=self.db)
        dx = dy @ self.W.T if need_dx else None  # (batch, fan_in)
        self.x = None
        return dx

    def out_features(self, in_features):
        assert in_features == self.fan_in, (in_features, self.fan_in)
        return self.fan_out

    def __repr__(self):
        return f"Dense({self.fan_in}, {self.fan_out})"


class ReLU(Layer):
    def forward(self, x, train=True):
        y = xp.maximum(x, 0)
        if train:
            self.y = y
        return y

    def backward(self, dy, need_dx=True):
        dx = dy * (self.y > 0)
        self.y = None
        return dx


class Sigmoid(Layer):
    def forward(self, x, train=True):
        # 0.5 * (1 + tanh(x / 2)) is the logistic function without exp overflow for large |x|.
        y = xp.tanh(0.5 * x)
        y += 1
        y *= 0.5
        if train:
            self.y = y
        return y

    def backward(self, dy, need_dx=True):
        dx = dy * self.y * (1 - self.y)
        self.y = None
        return dx


class Tanh(Layer):
    def forward(self, x, train=True):
        y = xp.tanh(x)
        if train:
            self.y = y
        return y

    def backward(self, dy, need_dx=True):
        dx = dy * (1 - self.y * self.y)
        self.y = None
        return dx


class GELU(Layer):
    """GELU with the tanh approximation (as in GPT-2 and BERT)."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x, train=True):
        t = xp.tanh(self._C * (x + 0.044715 * x**3))
        if train:
            self.x, self.t = x, t
        return 0.5 * x * (1 + t)

    def backward(self, dy, need_dx=True):
        x, t = self.x, self.t
        dt = self._C * (1 + 3 * 0.044715 * x * x)
        dx = dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dt)
        self.x = self.t = None
        return dx


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU, "identity": Layer}

# The initialisation that keeps activations' variance steady through each nonlinearity.
INIT_FOR = {"relu": "he", "gelu": "he", "sigmoid": "xavier", "tanh": "xavier", "identity": "xavier"}
