"""Layers: forward and backward on views into the flat buffers.

A layer declares the tensors it needs (``param_specs``), receives views of them (``bind``), and
implements ``forward(x, saved, ws)`` and ``backward(dy, saved, need_dx, accumulate, ws)``. Arrays are
``(batch, *shape)``: ``(batch, features)`` for flat rows, ``(batch, H, W, C)`` for images (channels
last: docs/architecture.md says why); a layer declares the shape of its output rows from that of its
input rows (``out_shape``). What backward needs from forward goes into ``saved``, a dict the caller owns
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

import inspect
import json
import math

from hpcnn.core.backend import xp
from hpcnn.core.params import ParamSpec
from hpcnn.core.privacy import rows_sq_norm
from hpcnn.core.workspace import FRESH
from hpcnn.errors import UserError

# Every Layer subclass by class name, registered when the class is defined (``Layer.__init_subclass__``):
# what ``layer_from_spec`` rebuilds checkpoints' layers from.
LAYER_TYPES: dict = {}


class Layer:
    """Base class of every layer, and itself a parameter-free identity.

    A layer of your own subclasses ``Layer`` and overrides what it needs:

    - ``param_specs()``: the tensors it owns, ``ParamSpec(name, shape, init, fan_in, fan_out)``;
      ``bind(params, grads)`` then receives views of them (and of their gradients) in the model's
      flat buffers, by name.
    - ``forward(x, saved, ws)``: the output for rows ``x`` (batch, features); what backward needs
      goes into the dict ``saved`` (``None`` at inference). Arrays from ``ws(name, shape, dtype)``
      are reused step after step.
    - ``backward(dy, saved, need_dx, accumulate, ws)``: writes the parameter gradients into the
      bound gradient views (adds to them with ``accumulate``) and returns the input gradient
      (``None`` may be returned when not ``need_dx``).
    - ``state_specs()`` / ``bind_state(views)``: tensors the layer changes in training that are no
      parameters (``BatchNorm``'s running statistics): kept in ``FlatParams.state``, untouched by
      the optimizer and the gradient reduction, stored in checkpoints.
    - In a training forward, ``saved`` already holds ``saved["key"]``, a ``hpcnn.core.model.Key``
      ``(seed, step, layer, row, batch_rows)``: the run's seed, the optimizer step, this layer's
      index in the whole model, the index in the global batch of ``x``'s first row, and the global
      batch's rows. Random numbers drawn from it (``Dropout``) are the same for a row whatever the
      layout. ``saved["stats"]`` sums float64 statistics in place over the stage's data-parallel
      replicas (``stats.sum(values)``; ``BatchNorm``), every replica calling it in the same order.
    - ``out_shape(in_shape)`` when it changes the shape of a row (``in_shape``: ``(features,)`` or
      ``(H, W, C)``; raise ``ValueError`` for a shape it cannot take), ``flops(in_shape)`` (balances
      pipeline stages), ``workspace_width(in_shape)`` (values per row of its temporaries, for
      ``--dry-run``'s memory estimate).

    Every subclass is registered by its class name when it is defined, and a checkpoint stores
    each layer as ``spec()``: ``{"type": class name, **the constructor's keyword arguments}``, from
    which ``layer_from_spec`` rebuilds it (resume and evaluation import the module that defines the
    layer first). The default ``spec()`` reads each argument of ``__init__`` from the attribute of
    the same name, so a layer that keeps its arguments as ``self.<argument>`` needs no ``spec`` of
    its own; the values must be JSON (numbers, strings, booleans, lists, dicts). Two different
    classes with one name are an error when the second is defined. Check a new layer's backward
    with ``hpcnn.testing.check_gradients(layer, in_shape)``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        known = LAYER_TYPES.get(name)
        # The same class defined again (a module reloaded, a notebook cell run twice) replaces itself.
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise UserError(
                f"layer class {cls.__module__}.{cls.__qualname__}: the name {name!r} is already taken by "
                f"{known.__module__}.{known.__qualname__}; checkpoints name layers by class name, so "
                "give the new class another name"
            )
        LAYER_TYPES[name] = cls

    def param_specs(self) -> list[ParamSpec]:
        return []

    def bind(self, params: dict, grads: dict) -> None:
        assert not params and not grads

    def state_specs(self) -> list[ParamSpec]:
        """Tensors this layer changes in training that are no parameters (``init`` zeros or ones)."""
        return []

    def bind_state(self, views: dict) -> None:
        """Views of the ``state_specs`` tensors in the model's state buffer, by name."""

    def forward(self, x, saved: dict | None, ws=FRESH):
        return x

    def backward(self, dy, saved: dict, need_dx: bool = True, accumulate: bool = False, ws=FRESH):
        return dy

    def weight_grads(self, stack, rows: int, factors=None) -> None:
        """Form the weight gradients from the ``rows`` rows deferred backwards put in ``stack``;
        ``factors`` ``(rows,)``: each row's output gradient scaled by its factor first (DP-SGD's
        clipping; the stacked rows may be scaled in place)."""

    def example_sq_norms(self, stack, rows: int) -> list:
        """DP-SGD: each example's squared gradient norm, one float64 ``(rows,)`` array per tensor of
        ``param_specs`` (in that order), from what deferred backwards put in ``stack``. A layer
        with parameters must override it to train privately (``hpcnn.core.privacy``)."""
        if self.param_specs():
            raise NotImplementedError(f"{self!r} has no per-example gradient norms")
        return []

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

    def deferred_width(self, in_shape: tuple) -> int:
        """Values per row that a deferred backward keeps until ``weight_grads``."""
        return 0

    def out_shape(self, in_shape: tuple) -> tuple:
        """The shape of one output row for input rows of shape ``in_shape``; ``ValueError`` naming
        the problem if the layer cannot take such rows."""
        return tuple(in_shape)

    def flops(self, in_shape: tuple) -> float:
        """Floating-point operations per row, forward and backward (for balancing stages)."""
        return 4.0 * math.prod(in_shape)  # elementwise: a few passes over the row

    def workspace_width(self, in_shape: tuple) -> int:
        """Values per row of the temporaries a training step keeps besides the output and the input
        gradient (``--dry-run``'s memory estimate): an elementwise layer keeps about one more."""
        return math.prod(in_shape)

    def products(self, in_shape: tuple) -> list[tuple[int, int, int]]:
        """The matrix products of its forward pass as ``(m, k, n)`` per input row: ``(rows * m, k) @
        (k, n)``; backward then costs ``(rows * m, n) @ (n, k)`` (input gradient) and ``(k, rows *
        m) @ (rows * m, n)`` (weight gradient). What ``python -m hpcnn.bench`` times as the GEMM
        ceiling; none for a layer without products."""
        return []

    def spec(self) -> dict:
        """What rebuilds this layer (``layer_from_spec``): checkpoints store the architecture as data.

        ``{"type": class name, **constructor keyword arguments}``, each argument read from the
        attribute of the same name."""
        cls = type(self)
        out = {"type": cls.__name__}
        if cls.__init__ is object.__init__:
            return out
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise UserError(
                    f"layer {cls.__name__}: spec() records the constructor's argument {name!r} from "
                    f"self.{name}, which is not set: keep it there, or define {cls.__name__}.spec()"
                )
            out[name] = getattr(self, name)
        try:
            json.dumps(out, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"layer {cls.__name__}: spec() {out!r} is not JSON ({exc}): checkpoints store it as JSON"
            ) from None
        return out

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
        if x.ndim != 2:  # image rows (after a convolution or pooling): flattened, a view
            if saved is not None:
                saved["shape"] = x.shape
            x = x.reshape(len(x), self.fan_in)
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
        x, shape = saved.pop("x"), saved.pop("shape", None)
        if self._shards is not None:
            dx = self._backward_shards(x, dy, saved.get("shard", 0), need_dx, ws)
            return dx if dx is None or shape is None else dx.reshape(shape)
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
        dx = xp.matmul(dy, self.W.T, out=ws("dx", (len(dy), self.fan_in), dy.dtype))  # (batch, fan_in)
        return dx if shape is None else dx.reshape(shape)

    def _stacked(self, stack, rows):
        dt = self.dW.dtype
        return stack("x", (rows, self.fan_in), dt), stack("dy", (rows, self.fan_out), dt)

    def weight_grads(self, stack, rows, factors=None):
        x, dy = self._stacked(stack, rows)
        if factors is not None:
            dy *= factors[:, None]
        xp.matmul(x.T, dy, out=self.dW)  # one product over the whole step: K = rows, not a micro-batch
        xp.sum(dy, axis=0, out=self.db)

    def example_sq_norms(self, stack, rows):
        # an example's dW is the outer product x_i dy_i: its squared norm is ||x_i||^2 ||dy_i||^2
        x, dy = self._stacked(stack, rows)
        dy_sq = rows_sq_norm(dy)
        return [rows_sq_norm(x) * dy_sq, dy_sq]

    def deferred_width(self, in_shape):
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

    def out_shape(self, in_shape):
        # Rows of any shape with fan_in values are taken as flat rows (images after a convolution).
        if math.prod(in_shape) != self.fan_in:
            raise ValueError(f"it takes rows of {self.fan_in} values, not of shape {tuple(in_shape)}")
        return (self.fan_out,)

    def flops(self, in_shape):
        return 6.0 * self.fan_in * self.fan_out  # forward x@W, backward dy@W.T and x.T@dy

    def workspace_width(self, in_shape):
        return 0

    def products(self, in_shape):
        return [(1, self.fan_in, self.fan_out)]

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


# The normal tail Q(a) = 1 - Phi(a), a >= 0, as phi(a) * t * g(2t - 1) with t = K / (K + a): g (the
# Mills ratio Q / phi divided by t) is smooth on t in [0, 1], down to a -> infinity at t = 0, so one
# Chebyshev series serves every a. Its coefficients are the series of g computed in 130-digit decimal
# arithmetic (tests/test_gradients.py derives them again); the terms after the last one kept are
# below 1e-15 of the first, and after the 12th below 2e-9 (enough for float32).
_GELU_K = 4.0
_GELU_SERIES = (
    0.6081401071287602, 0.47106364364487097, 0.13923916227409544, 0.030403993036051166,
    0.004340177035931918, 0.00020090530018242875, -6.300873370139459e-05, -1.1845929817656808e-05,
    6.331472841361596e-07, 3.8510174585337786e-07, -2.118740141665576e-09, -1.2963346437966372e-08,
    -7.070316554447231e-11, 4.871640590931037e-10, -6.229877724805988e-12, -1.9893087177536017e-11,
    1.1544376565808534e-12, 8.22675261247241e-13, -1.0903777880599819e-13, -3.0683788843077764e-14,
    8.194833700514437e-15, 8.049116928532385e-16,
)  # fmt: skip
_FLOAT32_TERMS = 12
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_cdf(x, out, ws=FRESH):
    """``Phi(x) = (1 + erf(x / sqrt(2))) / 2`` into ``out``, to a few units in the last place of
    ``x``'s dtype (numpy has no ``erf``): no parameter- or activation-sized allocation with a
    workspace ``ws``."""
    shape, dt = x.shape, x.dtype
    series = _GELU_SERIES[: _FLOAT32_TERMS if dt.itemsize <= 4 else None]
    a = xp.abs(x, out=ws("a", shape, dt))
    t = xp.add(a, _GELU_K, out=ws("t", shape, dt))
    xp.divide(_GELU_K, t, out=t)  # in (0, 1]
    u2 = xp.multiply(t, 4, out=ws("u2", shape, dt))
    u2 -= 2  # 2 * (2t - 1): Clenshaw's recurrence b_m = c_m + 2u b_{m+1} - b_{m+2}
    b1, b2, b0 = ws("b1", shape, dt), ws("b2", shape, dt), ws("b0", shape, dt)
    b1.fill(series[-1])
    b2.fill(0)
    for c in series[-2:0:-1]:
        xp.multiply(u2, b1, out=b0)
        b0 -= b2
        b0 += c
        b1, b2, b0 = b0, b1, b2
    xp.multiply(u2, b1, out=b0)  # g = c_0 + u b_1 - b_2
    b0 *= 0.5
    b0 -= b2
    b0 += series[0]
    b0 *= t
    xp.multiply(a, a, out=a)  # Q(|x|) = phi(|x|) t g
    a *= -0.5
    xp.exp(a, out=a)
    a *= _INV_SQRT_2PI
    b0 *= a
    xp.subtract(1, b0, out=out)  # Phi(x) = 1 - Q(x) for x >= 0, Q(-x) for x < 0
    xp.copyto(out, b0, where=xp.less(x, 0, out=ws("negative", shape, bool)))
    return out


class GELU(Layer):
    """``y = x Phi(x)`` (Phi: the standard normal distribution function), exact or approximated.

    ``approximate="none"`` (the default, as in PyTorch) computes ``Phi`` through ``erf``;
    ``approximate="tanh"`` uses ``Phi(x) ~ (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2``, as in
    GPT-2 and BERT, which is cheaper (the exact form takes about six times as long with numpy). A checkpoint
    records the form; one written before GELU had a choice (``{"type": "GELU"}``) computed the tanh
    form, and rebuilds as it (``layer_from_spec``).
    """

    FORMS = ("none", "tanh")
    _C = math.sqrt(2.0 / math.pi)

    def __init__(self, approximate: str = "none"):
        if approximate not in self.FORMS:
            raise ValueError(f"GELU approximate = {approximate!r}: expected one of {', '.join(self.FORMS)}")
        self.approximate = approximate

    def forward(self, x, saved, ws=FRESH):
        if self.approximate == "none":
            cdf = normal_cdf(x, ws("cdf", x.shape, x.dtype), ws)
            y = xp.multiply(x, cdf, out=ws("y", x.shape, x.dtype))
            if saved is not None:
                saved["x"], saved["cdf"] = x, cdf
            return y
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
        if self.approximate == "none":
            # dy * (Phi(x) + x phi(x))
            x, cdf = saved.pop("x"), saved.pop("cdf")
            a = xp.multiply(x, x, out=ws("a", x.shape, x.dtype))
            a *= -0.5
            xp.exp(a, out=a)
            a *= _INV_SQRT_2PI
            a *= x
            a += cdf
            return xp.multiply(dy, a, out=ws("dx", dy.shape, dy.dtype))
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

    def flops(self, in_shape):
        if self.approximate == "none":
            return (3.0 * len(_GELU_SERIES) + 30.0) * math.prod(in_shape)
        return 20.0 * math.prod(in_shape)

    def workspace_width(self, in_shape):
        return (8 if self.approximate == "none" else 3) * math.prod(in_shape)

    def __repr__(self):
        return "GELU" if self.approximate == "none" else f"GELU(approximate={self.approximate!r})"


def _gelu_tanh():
    return GELU(approximate="tanh")


# Activation names (``--activation``) -> what makes one such layer.
ACTIVATIONS = {
    "relu": ReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "gelu": GELU,
    "gelu_tanh": _gelu_tanh,
    "identity": Layer,
}

# The initialisation that keeps activations' variance steady through each nonlinearity.
INIT_FOR = {
    "relu": "he",
    "gelu": "he",
    "gelu_tanh": "he",
    "sigmoid": "xavier",
    "tanh": "xavier",
    "identity": "xavier",
}

LAYER_TYPES[Layer.__name__] = Layer


def current_spec(spec: dict) -> dict:
    """``spec`` as this hpcnn writes it: a spec written before a layer gained an argument gets the
    value that computes what the layer computed then (``GELU`` before ``approximate``: the tanh
    form)."""
    if spec.get("type") == "GELU" and "approximate" not in spec:
        return {**spec, "approximate": "tanh"}
    return spec


# hpcnn's layers defined outside this module (they import it): loaded when a spec names a type
# not registered yet
BUILTIN_MODULES = ("hpcnn.core.conv", "hpcnn.core.norm", "hpcnn.core.dropout")


def layer_from_spec(spec: dict) -> Layer:
    """The layer ``spec`` describes (the inverse of ``Layer.spec``)."""
    kwargs = dict(current_spec(spec))
    kind = kwargs.pop("type")
    if kind not in LAYER_TYPES:
        import importlib

        for module in BUILTIN_MODULES:
            importlib.import_module(module)
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise UserError(
            f"unknown layer type {kind!r}: import the module that defines class {kind} (a Layer "
            f"subclass) before loading this model; known types: {', '.join(sorted(LAYER_TYPES))}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:  # the spec's arguments do not fit the class's constructor (any more)
        raise UserError(f"cannot rebuild layer {kind} from {spec}: {exc}") from None
