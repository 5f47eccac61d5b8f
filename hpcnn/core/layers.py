"""Layers: forward and backward on views into the flat buffers.

A layer declares the tensors it needs (``param_specs``), receives views of them (``bind``), and
implements ``forward(x, saved, ws)`` and ``backward(dy, saved, need_dx, accumulate, ws)``. Arrays are
``(batch, features)``. What backward needs from forward goes into ``saved``, a dict the caller owns
(``None`` for inference: nothing is kept). Keeping that state outside the layer is what lets a
pipeline stage hold several micro-batches in flight through the same layers.

Weight gradients are written straight into the gradient buffer with ``out=``; with
``accumulate=True`` (micro-batches after the first) they go through one scratch array per layer,
allocated once, and are added. A pipeline stage instead *defers* them (``saved["defer"]``): each
micro-batch's backward computes only the input gradient and copies the layer's input and output
gradient into step-long stacks, and ``weight_grads`` then forms the weight gradient as one product
over all the step's rows (see ``pipeline``). Outputs, input gradients and temporaries come from ``ws``, a
``workspace.Scope`` that returns the same array every step (``FRESH`` allocates: for a layer used on
its own). A training step therefore allocates no activation- or parameter-sized array.
Nothing here is MLP-specific: a model is any ordered list of layers, and a pipeline stage is a
consecutive run of them.
"""

import math

from hpcnn.core.backend import xp
from hpcnn.core.params import ParamSpec
from hpcnn.core.workspace import FRESH


class Layer:
    """Base class: a parameter-free identity."""

    def param_specs(self) -> list[ParamSpec]:
        return []

    def bind(self, params: dict, grads: dict) -> None:
        assert not params and not grads

    def forward(self, x, saved: dict | None, ws=FRESH):
        return x

    def backward(self, dy, saved: dict, need_dx: bool = True, accumulate: bool = False, ws=FRESH):
        return dy

    def weight_grads(self, stack, rows: int) -> None:
        """Form the weight gradients from the ``rows`` rows deferred backwards put in ``stack``."""

    def shard(self, sharding, grads: dict | None) -> None:
        """Compute in the fixed row blocks of ``sharding`` (``--deterministic``; ``None``: as usual),
        each block's weight gradients into its own row of ``grads`` (``{name: (blocks, *shape)}``;
        ``None`` for inference). ``Sequential.shard`` passes them down. A layer that works row by row
        needs nothing; one with parameters sums over rows in backward and must override this."""
        if grads is not None:
            raise NotImplementedError(
                f"{self!r} has parameters but no per-shard backward (Layer.shard): it cannot train "
                "in deterministic mode"
            )

    def deferred_width(self, in_features: int) -> int:
        """Values per row that a deferred backward keeps until ``weight_grads``."""
        return 0

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
        self._dW_part = self._db_part = None  # scratch for accumulated micro-batch gradients
        self._shards = self._shard_grads = None  # deterministic mode (``shard``)

    def param_specs(self):
        return [
            ParamSpec("W", (self.fan_in, self.fan_out), self.init, self.fan_in, self.fan_out),
            ParamSpec("b", (self.fan_out,), "zeros"),
        ]

    def bind(self, params, grads):
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]
        self._dW_part = self._db_part = None

    def forward(self, x, saved, ws=FRESH):
        if saved is not None:
            saved["x"] = x  # (batch, fan_in), kept for dW
        y = ws("y", (len(x), self.fan_out), x.dtype)
        if self._shards is None:
            xp.matmul(x, self.W, out=y)  # (batch, fan_out)
        else:
            self._shards.matmul_rows(x, self.W, y)
        y += self.b
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        x = saved.pop("x")
        if self._shards is not None:
            return self._backward_shards(x, dy, saved.get("shard", 0), need_dx, ws)
        if "defer" in saved:  # (first row, step rows, stack scope): weight gradients come later
            first, rows, stack = saved["defer"]
            stack("x", (rows, self.fan_in), x.dtype)[first : first + len(x)] = x
            stack("dy", (rows, self.fan_out), dy.dtype)[first : first + len(dy)] = dy
        elif accumulate:
            if self._dW_part is None:  # once per run: micro-batches after the first add into dW
                self._dW_part, self._db_part = xp.empty_like(self.dW), xp.empty_like(self.db)
            xp.matmul(x.T, dy, out=self._dW_part)
            self.dW += self._dW_part
            xp.sum(dy, axis=0, out=self._db_part)
            self.db += self._db_part
        else:
            xp.matmul(x.T, dy, out=self.dW)
            xp.sum(dy, axis=0, out=self.db)
        if not need_dx:
            return None
        dx = ws("dx", (len(dy), self.fan_in), dy.dtype)
        return xp.matmul(dy, self.W.T, out=dx)  # (batch, fan_in)

    def weight_grads(self, stack, rows):
        dt = self.dW.dtype
        x, dy = stack("x", (rows, self.fan_in), dt), stack("dy", (rows, self.fan_out), dt)
        xp.matmul(x.T, dy, out=self.dW)  # one product over the whole step: K = rows, not a micro-batch
        xp.sum(dy, axis=0, out=self.db)

    def deferred_width(self, in_features):
        return self.fan_in + self.fan_out

    def shard(self, sharding, grads):
        self._shards, self._shard_grads = sharding, grads

    def _backward_shards(self, x, dy, first: int, need_dx: bool, ws):
        """Each shard's weight gradient into its own row of the per-shard buffer (``first``: the
        local index of the input's first shard), and the input gradient shard by shard."""
        n, sh = len(dy), self._shards
        dW, db = self._shard_grads["W"], self._shard_grads["b"]
        dx = ws("dx", (n, self.fan_in), dy.dtype) if need_dx else None

        def one(k):
            r = sh.rows_of(k, n)
            xp.matmul(x[r].T, dy[r], out=dW[first + k])
            xp.sum(dy[r], axis=0, out=db[first + k])
            if need_dx:
                xp.matmul(dy[r], self.W.T, out=dx[r])

        sh.workers.run(one, sh.blocks(n))
        return dx

    def out_features(self, in_features):
        assert in_features == self.fan_in, (in_features, self.fan_in)
        return self.fan_out

    def flops(self, in_features):
        return 6.0 * self.fan_in * self.fan_out  # forward x@W, backward dy@W.T and x.T@dy

    def spec(self):
        return {"type": "Dense", "fan_in": self.fan_in, "fan_out": self.fan_out, "init": self.init}

    def __repr__(self):
        return f"Dense({self.fan_in}, {self.fan_out})"


# Activations write into workspace arrays of their own rather than over their input: the input may
# be data the caller still owns (a stage's first layer) or kept by the layer before for backward.


class ReLU(Layer):
    def forward(self, x, saved, ws=FRESH):
        y = xp.maximum(x, 0, out=ws("y", x.shape, x.dtype))
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        # sign(y) is exactly 1 where the unit was active and 0 where not (y >= 0): a mask without
        # a boolean temporary.
        dx = xp.sign(saved.pop("y"), out=ws("dx", dy.shape, dy.dtype))
        dx *= dy
        return dx


class Sigmoid(Layer):
    def forward(self, x, saved, ws=FRESH):
        # 0.5 * (1 + tanh(x / 2)) is the logistic function without exp overflow for large |x|.
        y = xp.multiply(x, 0.5, out=ws("y", x.shape, x.dtype))
        xp.tanh(y, out=y)
        y += 1
        y *= 0.5
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        y = saved.pop("y")
        dx = xp.multiply(dy, y, out=ws("dx", dy.shape, dy.dtype))
        dx *= xp.subtract(1, y, out=ws("t", y.shape, y.dtype))  # dy * y * (1 - y)
        return dx


class Tanh(Layer):
    def forward(self, x, saved, ws=FRESH):
        y = xp.tanh(x, out=ws("y", x.shape, x.dtype))
        if saved is not None:
            saved["y"] = y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        y = saved.pop("y")
        t = xp.multiply(y, y, out=ws("t", y.shape, y.dtype))
        xp.subtract(1, t, out=t)
        return xp.multiply(dy, t, out=ws("dx", dy.shape, dy.dtype))  # dy * (1 - y * y)


class GELU(Layer):
    """GELU with the tanh approximation (as in GPT-2 and BERT)."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x, saved, ws=FRESH):
        # t = tanh(C * (x + 0.044715 x^3)); y = 0.5 x (1 + t)
        t = xp.multiply(x, x, out=ws("t", x.shape, x.dtype))
        t *= x
        t *= 0.044715
        t += x
        t *= self._C
        xp.tanh(t, out=t)
        y = xp.add(t, 1, out=ws("y", x.shape, x.dtype))
        y *= x
        y *= 0.5
        if saved is not None:
            saved["x"], saved["t"] = x, t
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        # dy * (0.5 (1 + t) + 0.5 x (1 - t^2) C (1 + 3 * 0.044715 x^2))
        x, t = saved.pop("x"), saved.pop("t")
        a = xp.multiply(x, x, out=ws("a", x.shape, x.dtype))
        a *= 3 * 0.044715 * self._C
        a += self._C
        a *= x
        a *= 0.5
        b = xp.multiply(t, t, out=ws("b", t.shape, t.dtype))
        xp.subtract(1, b, out=b)
        a *= b
        xp.add(t, 1, out=b)
        b *= 0.5
        a += b
        return xp.multiply(dy, a, out=ws("dx", dy.shape, dy.dtype))

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
