"""Flat parameter and gradient buffers, and the per-layer views into them.

All parameters of a model live in one contiguous array and all gradients in another of the same
size and layout. Layers never own arrays: they receive views into these buffers in a fixed order
(model order, then the order each layer declares). The gradient reduction is therefore one
buffer, and an optimizer step is a handful of whole-buffer vector operations.
"""

from dataclasses import dataclass

from hpcnn.backend import xp


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor a layer asks for; ``init`` is ``"he"``, ``"xavier"`` or ``"zeros"``."""

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
        self.slots: list[Slot] = []
        offset = 0
        for i, layer in enumerate(layers):
            for spec in layer.param_specs():
                size = 1
                for d in spec.shape:
                    size *= d
                self.slots.append(Slot(i, spec, offset, size))
                offset += size
        self.size = offset
        self.dtype = dtype
        self.data = xp.zeros(offset, dtype=dtype)  # (n_params,)
        self.grad = xp.zeros(offset, dtype=dtype)  # (n_params,)
        for i, layer in enumerate(layers):
            mine = [s for s in self.slots if s.layer == i]
            layer.bind(
                {s.name: self.view(self.data, s) for s in mine},
                {s.name: self.view(self.grad, s) for s in mine},
            )

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


def _draw(rng, spec: ParamSpec):
    if spec.init == "zeros":
        return 0
    if spec.init == "he":
        return rng.normal(0.0, (2.0 / spec.fan_in) ** 0.5, size=spec.shape)
    if spec.init == "xavier":
        limit = (6.0 / (spec.fan_in + spec.fan_out)) ** 0.5
        return rng.uniform(-limit, limit, size=spec.shape)
    raise ValueError(f"unknown initialisation {spec.init!r} for {spec.name}")
