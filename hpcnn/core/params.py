"""Flat parameter and gradient buffers, and the per-layer views into them.

All parameters of a model live in one contiguous array and all gradients in another of the same
size and layout. Layers never own arrays: they receive views into these buffers. The gradient
reduction is therefore one buffer (or a few contiguous buckets of it), and an optimizer step is a
handful of whole-buffer vector operations.

The layout is **the order backward produces gradients**: the last layer's tensors first, the first
layer's last (within a layer, the order it declares). A bucket of consecutive layers is then one
contiguous range, complete as soon as backward has passed its first layer, and its reduction can
start while backward goes on (``data_parallel``). Everything else (initialisation, checkpoints)
works per tensor in model order and does not see the layout.

Layers may also keep **state**: tensors that training changes but that are no parameters (a
``BatchNorm``'s running mean and variance). They live in a third flat buffer, ``FlatParams.state``,
laid out the same way (``Layer.state_specs()``, bound by ``Layer.bind_state(views)``), which the
optimizer and the gradient reduction never see (no weight decay, no gradient) and checkpoints store
under a group of their own. State starts at its ``init`` (``"zeros"`` or ``"ones"``), draws nothing
from the parameters' random generator, and is the same on every replica.
"""

import math
from dataclasses import dataclass

from hpcnn.core.backend import xp


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor a layer asks for; ``init`` is ``"he"``, ``"xavier"``, ``"zeros"`` or
    ``"ones"`` (``fan_in`` and ``fan_out`` scale the first two)."""

    name: str
    shape: tuple
    init: str
    fan_in: int = 0
    fan_out: int = 0


@dataclass(frozen=True)
class Slot:
    """Where a tensor lives in the flat buffer: ``buffer[offset:offset+size].reshape(shape)``."""

    layer: int  # index of the owning layer in model order
    spec: ParamSpec
    offset: int
    size: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> tuple:
        return self.spec.shape


class FlatParams:
    """Contiguous parameter and gradient buffers for a list of layers.

    Parameters
    ----------
    layers : sequence of layers, each with ``param_specs()`` and ``bind(params, grads)``
    dtype : array dtype of both buffers
    """

    def __init__(self, layers, dtype):
        self.slots: list[Slot] = layout(layers)  # model order; offsets in backward order
        self.size = sum(s.size for s in self.slots)
        self.dtype = dtype
        self.data = xp.zeros(self.size, dtype=dtype)  # (n_params,)
        self.grad = xp.zeros(self.size, dtype=dtype)  # (n_params,)
        for i, layer in enumerate(layers):
            mine = [s for s in self.slots if s.layer == i]
            layer.bind(
                {s.name: self.view(self.data, s) for s in mine},
                {s.name: self.view(self.grad, s) for s in mine},
            )
        # layer state (running statistics): not parameters, never seen by the optimizer
        self.state_slots: list[Slot] = layout(layers, state=True)
        self.state = xp.zeros(sum(s.size for s in self.state_slots), dtype=dtype)  # (n_state,)
        for slot in self.state_slots:
            self.view(self.state, slot)[...] = _draw(None, slot.spec)
        for i, layer in enumerate(layers):
            mine = [s for s in self.state_slots if s.layer == i]
            if mine:
                layer.bind_state({s.name: self.view(self.state, s) for s in mine})

    @staticmethod
    def view(buffer, slot: Slot):
        """The view of one tensor inside a flat buffer (shares memory, never copies)."""
        return buffer[slot.offset : slot.offset + slot.size].reshape(slot.shape)

    def initialize(self, rng, skip=()) -> None:
        """Fill the parameters in slot order from one ``numpy.random.Generator``.

        ``skip`` lists the ``ParamSpec`` of the tensors that come before these in the whole model
        (earlier pipeline stages): their values are drawn and dropped, so that a stage starts with
        exactly the values the whole model would have, without ever holding the whole model.

        He (normal, std sqrt(2 / fan_in)) suits ReLU-like layers, Xavier (uniform, limit
        sqrt(6 / (fan_in + fan_out))) suits sigmoid/tanh; biases start at zero. Drawing in a fixed
        order from one seeded generator makes the initial model identical on every rank.
        """
        for spec in skip:
            _draw(rng, spec)
        for slot in self.slots:
            spec, view = slot.spec, self.view(self.data, slot)
            view[...] = _draw(rng, spec)


class FlatShard:
    """The part ``[lo, hi)`` of a ``FlatParams``'s flat buffers that one rank updates when the
    optimizer state is sharded over the replicas (``hpcnn.parallel.zero``): what an optimizer is
    bound to there. ``data`` is a view of the parameters (the update lands in the whole buffer);
    ``grad`` is this part's reduced gradient (a view of ``params.grad``, or a buffer of its own
    where the rank keeps no whole gradient). ``size`` is the whole buffer's length: checkpoints
    place the optimizer's shard-sized state at ``lo`` of whole tensors."""

    def __init__(self, params, lo: int, hi: int, grad):
        assert 0 <= lo <= hi <= params.size and len(grad) == hi - lo, (lo, hi, params.size, len(grad))
        self.params, self.lo, self.hi, self.size = params, lo, hi, params.size
        self.data, self.grad, self.dtype = params.data[lo:hi], grad, params.dtype


def layout(layers, state: bool = False) -> list[Slot]:
    """Where each tensor of ``layers`` lives in a flat buffer: slots listed in model order (layer,
    then declared order), offsets assigned in backward order (last layer first). ``state``: the
    layers' state tensors (``state_specs``) instead of their parameters."""
    specs = (lambda layer: layer.state_specs()) if state else (lambda layer: layer.param_specs())
    slots, offset = {}, 0
    for i in range(len(layers) - 1, -1, -1):
        for spec in specs(layers[i]):
            size = math.prod(spec.shape)
            slots[i, spec.name] = Slot(i, spec, offset, size)
            offset += size
    return [slots[i, spec.name] for i, layer in enumerate(layers) for spec in specs(layer)]


def layer_ranges(slots: list[Slot]) -> dict[int, tuple[int, int]]:
    """``layer -> (start, stop)`` of each parameter-holding layer's contiguous range."""
    ranges = {}
    for s in slots:
        lo, hi = ranges.get(s.layer, (s.offset, s.offset + s.size))
        ranges[s.layer] = (min(lo, s.offset), max(hi, s.offset + s.size))
    return ranges


def _draw(rng, spec: ParamSpec):
    if spec.init == "zeros":
        return 0
    if spec.init == "ones":  # (a gain, a scale)
        return 1
    if spec.init == "he":
        return rng.normal(0.0, (2.0 / spec.fan_in) ** 0.5, size=spec.shape)
    if spec.init == "xavier":
        limit = (6.0 / (spec.fan_in + spec.fan_out)) ** 0.5
        return rng.uniform(-limit, limit, size=spec.shape)
    raise ValueError(
        f"unknown initialisation {spec.init!r} for {spec.name}: expected he, xavier, zeros or ones"
    )
