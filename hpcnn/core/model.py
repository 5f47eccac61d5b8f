"""A model is an ordered list of layers over one pair of flat buffers.

``Sequential`` runs forward in order and backward in reverse. A pipeline stage is a ``Sequential``
of a consecutive run of the layers (with buffers of its own), initialised as the whole model would
be (``FlatParams.initialize(rng, skip=...)``). ``build_mlp`` is one way to make the layer list;
the core types do not assume it.

A training forward tells each layer where it stands (``Key``, in ``saved["key"]``): the run's
seed and step and the layer's global index come from the model's ``context`` (set by the training
loop), the first row's index in the global batch from ``forward(row=...)``. ``context.stats`` sums
per-channel statistics over the stage's data-parallel replicas (``saved["stats"]``;
``hpcnn.parallel.batchstats``); ``None`` sums over this forward's rows only.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

from hpcnn.core.backend import xp
from hpcnn.core.layers import ACTIVATIONS, INIT_FOR, Dense
from hpcnn.core.params import FlatParams
from hpcnn.core.workspace import Workspace


def as_shape(shape) -> tuple:
    """A row shape as a tuple: ``5`` (features) is ``(5,)``."""
    return (int(shape),) if isinstance(shape, (int, xp.integer)) else tuple(int(n) for n in shape)


class Key(NamedTuple):
    """Where a training forward stands, for layers whose forward depends on more than its rows."""

    seed: int  # the run's seed
    step: int  # optimizer steps taken before this one
    layer: int  # the layer's index in the whole model (not in its pipeline stage)
    row: int  # the index in the global batch of the forward's first row
    batch_rows: int  # rows of the global batch


@dataclass
class Context:
    """What a training forward of a ``Sequential`` passes to its layers (``Key``, ``stats``)."""

    seed: int = 0
    step: int = 0
    first_layer: int = 0  # the index of the model's first layer in the whole model (pipeline stages)
    batch_rows: int = 0  # rows of the global batch (0: the forward's own rows)
    stats: object = None  # ``sum(values)`` over the stage's replicas in place; None: these rows only


class Sequential:
    """Layers applied in order, parameters in one ``FlatParams``.

    Parameters
    ----------
    layers : list of Layer
    dtype : dtype of parameters, gradients and activations (a ``Trainer`` uses its ``dtype`` setting)
    in_shape : the shape of one input row, ``(features,)`` or ``(H, W, C)``; when given, flat rows
        ``(batch, prod(in_shape))`` (what data sources and pipeline transfers carry) are viewed as
        ``(batch, *in_shape)`` on the way in, and output gradients as the output's shape on the way
        back. ``None``: inputs arrive in the shape the first layer takes.
    """

    def __init__(self, layers, dtype=xp.float32, in_shape=None):
        self.layers = list(layers)
        self.dtype = dtype
        self.in_shape = None if in_shape is None else as_shape(in_shape)
        self.out_shape = None if in_shape is None else self.shape_after(self.layers, self.in_shape)
        self.params = FlatParams(self.layers, dtype)
        self.workspace = Workspace()
        self._tape = None
        self.sharding = None  # how the layers compute in deterministic mode (``shard``)
        self.context = Context()  # seed, step, ...: what a training forward tells the layers

    def forward(
        self, x, train: bool = True, tape: list | None = None, slot: int = 0, on_layer_done=None, row: int = 0
    ):
        """Run the layers; with ``train``, what backward needs is kept on ``tape``.

        ``tape`` is one dict per layer; by default the model keeps one for the latest forward.
        A pipeline stage passes one tape per micro-batch in flight, and the micro-batch as
        ``slot``. ``row``: the index of ``x``'s first row in the global batch (each tape entry
        gets the ``Key`` of its layer). The result is a workspace array, overwritten by the next
        forward of the same slot and mode: copy it to keep it.
        """
        if train and tape is None:
            tape = self._tape = [{} for _ in self.layers]
        slot = ("train" if train else "infer", slot)
        if self.in_shape is not None and x.shape[1:] != self.in_shape:
            x = x.reshape(len(x), *self.in_shape)  # flat rows as images: a view
        c = self.context
        for i, layer in enumerate(self.layers):
            if train:
                tape[i]["key"] = Key(c.seed, c.step, c.first_layer + i, row, c.batch_rows or len(x))
                tape[i]["stats"] = c.stats
            x = layer.forward(x, tape[i] if train else None, self.workspace.scope(i, slot))
            if on_layer_done is not None:  # a pipeline stage moves its pending transfers on
                on_layer_done(i)
        return x

    def backward(
        self, dout, need_input_grad=False, tape=None, accumulate=False, slot: int = 0, on_layer_done=None
    ):
        """Fill ``params.grad`` (overwriting it, or adding to it with ``accumulate``) from the
        forward recorded on ``tape``; return the input gradient if asked.

        ``on_layer_done(i)`` is called as soon as layer ``i``'s gradients are final (the data-parallel
        reduction of a complete bucket starts there, while backward goes on).
        """
        tape = self._tape if tape is None else tape
        slot = ("train", slot)
        if self.out_shape is not None and dout.shape[1:] != self.out_shape:
            dout = dout.reshape(len(dout), *self.out_shape)  # flat rows from a pipeline transfer
        for i in range(len(self.layers) - 1, -1, -1):
            scope = self.workspace.scope(i, slot)
            dout = self.layers[i].backward(dout, tape[i], need_input_grad or i > 0, accumulate, scope)
            tape[i].pop("key", None)  # the training forward's context: nothing is kept past backward
            tape[i].pop("stats", None)
            if on_layer_done is not None:
                on_layer_done(i)
        return dout

    def weight_grads(self, rows: int, on_layer_done=None, factors=None) -> None:
        """After deferred backwards (``tape`` entries ``defer``) over ``rows`` rows in all: form
        every layer's weight gradients, last layer first (the order backward would finish them);
        ``factors``: each row's output gradients scaled by its factor (DP-SGD's clipping)."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer, stack = self.layers[i], self.stack(i)
            # (factors only when clipping: a user layer's weight_grads(stack, rows) keeps working)
            layer.weight_grads(stack, rows) if factors is None else layer.weight_grads(stack, rows, factors)
            if on_layer_done is not None:
                on_layer_done(i)

    def shard(self, sharding, grads=None) -> None:
        """Make the layers compute in the fixed row blocks of ``sharding`` (a
        ``hpcnn.parallel.deterministic.Sharding``; ``None``: as usual), each block's weight
        gradients into its own row of ``grads`` ``(blocks, params.size)``, laid out like
        ``params.grad`` (``None``: inference only)."""
        self.sharding = sharding
        for i, layer in enumerate(self.layers):
            views = None
            if grads is not None:
                n = len(grads)
                views = {
                    s.name: grads[:, s.offset : s.offset + s.size].reshape(n, *s.shape)
                    for s in self.params.slots
                    if s.layer == i
                } or None
            layer.shard(sharding, views)

    def stack(self, i: int):
        """The workspace scope where layer ``i`` keeps what deferred backwards leave for
        ``weight_grads``."""
        return self.workspace.rows_scope(i)

    @staticmethod
    def layer_flops(layers, in_shape) -> list[float]:
        """Per-layer floating-point operations per row (forward + backward)."""
        costs, shape = [], as_shape(in_shape)
        for layer in layers:
            costs.append(layer.flops(shape))
            shape = as_shape(layer.out_shape(shape))
        return costs

    @staticmethod
    def shapes(layers, in_shape) -> list[tuple]:
        """The row shape entering each layer and, last, the one leaving the last layer."""
        out = [as_shape(in_shape)]
        for layer in layers:
            out.append(as_shape(layer.out_shape(out[-1])))
        return out

    @staticmethod
    def shape_after(layers, in_shape) -> tuple:
        return Sequential.shapes(layers, in_shape)[-1]

    def describe(self) -> str:
        return describe(self.layers)


def describe(layers) -> str:
    """One line naming ``layers`` and their parameter count (needs no buffers: a whole model that
    lives cut into pipeline stages is described from its layer list)."""
    count = sum(math.prod(spec.shape) for layer in layers for spec in layer.param_specs())
    return " -> ".join(map(repr, layers)) + f"  ({count:,} parameters)"


def build_mlp(sizes, activation: str, dtype, output_activation: str = "identity") -> Sequential:
    """Dense layers of ``sizes[i] -> sizes[i+1]`` with ``activation`` between them.

    ``output_activation`` follows the last Dense (``identity`` for logits fed to the fused softmax
    cross-entropy; ``sigmoid`` for the tutorial's MSE network).
    """
    return Sequential(mlp_layers(sizes, activation, output_activation), dtype)


def mlp_layers(sizes, activation: str, output_activation: str = "identity") -> list:
    """The layer list of ``build_mlp``, without parameter buffers (to be cut into stages)."""
    act = ACTIVATIONS[activation]
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        last = i == len(sizes) - 2
        nonlinearity = output_activation if last else activation
        layers.append(Dense(fan_in, fan_out, init=INIT_FOR[nonlinearity]))
        if not last:
            layers.append(act())
        elif output_activation != "identity":
            layers.append(ACTIVATIONS[output_activation]())
    return layers
