"""Dropout with masks that depend on the row, not on the layout: the same training at any rank count.

In training, ``Dropout(p)`` zeroes each value with probability ``p`` and scales the others by
``1 / (1 - p)`` (inverted dropout: inference is the identity, nothing to rescale). The mask comes
from a counter-based generator (``mask_uniforms``): numpy's ``Philox`` with a key drawn from
``(seed, step, layer)`` (the run's seed, the optimizer step, the layer's index in the whole model)
and the counter at ``row * ceil(values_per_row / 4)`` (each counter gives 4 64-bit words; ``row``:
the row's index in the global batch). A row's mask therefore does not depend on which replica,
pipeline stage or micro-batch computes it: 1, 2, 4 or 8 ranks, any pipeline layout and any
micro-batching draw the same masks, deterministic mode included, and a resumed run draws what an
uninterrupted one would (the step is part of the key: there is no generator state to save). One
block of words is drawn per forward (micro-batch); word ``u`` becomes ``(u >> 11) * 2**-53`` in
``[0, 1)`` (numpy's ``Generator.random``, written into a reused array) and the value is kept where
that is ``>= p``.

The training forward learns ``(seed, step, layer, row)`` from ``saved["key"]`` (``Sequential``
puts it there; see ``hpcnn.core.model.Key``); a layer used on its own, without one, draws the mask
of ``(0, 0, 0, 0)``: the same mask every call.
"""

import math

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.layers import Layer
from hpcnn.core.workspace import FRESH

_DOMAIN = 0x44524F50  # "DROP": keeps these keys apart from other uses of (seed, step, layer)


def philox_key(seed: int, step: int, layer: int) -> np.ndarray:
    """The Philox key (2 x 64 bits) of one layer at one step of a run."""
    words = [int(seed) % 2**64, int(step), int(layer), _DOMAIN]
    return np.random.SeedSequence(words).generate_state(2, np.uint64)


def mask_uniforms(seed: int, step: int, layer: int, row: int, rows: int, width: int, out=None):
    """Uniforms in ``[0, 1)``, ``(rows, width)`` (a view of ``out``, float64 ``(rows, 4 *
    ceil(width / 4))`` if given): row ``i`` is global row ``row + i``'s, whatever else is drawn."""
    blocks = -(-width // 4)  # counters per row
    if out is None:
        out = np.empty((rows, 4 * blocks))
    bits = np.random.Philox(counter=row * blocks, key=philox_key(seed, step, layer))
    np.random.Generator(bits).random(out=out)
    return out[:, :width]


class Dropout(Layer):
    """Zero each value with probability ``p`` in training, scale the rest by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p = {p}: expected 0 <= p < 1")
        self.p = p

    def forward(self, x, saved, ws=FRESH):
        if saved is None or self.p == 0.0:
            return x
        n, dt = len(x), x.dtype
        width = math.prod(x.shape[1:])
        key = saved.get("key")
        seed, step, layer, row = (key.seed, key.step, key.layer, key.row) if key is not None else (0, 0, 0, 0)
        u = ws("u", (n, 4 * -(-width // 4)), np.float64)
        u = mask_uniforms(seed, step, layer, row, n, width, out=u)
        keep = xp.greater_equal(u, self.p, out=ws("keep", (n, width), bool))
        mask = xp.multiply(keep, 1.0 / (1.0 - self.p), out=ws("mask", (n, width), dt))
        mask = mask.reshape(x.shape)
        saved["mask"] = mask
        return xp.multiply(x, mask, out=ws("y", x.shape, dt))

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        mask = saved.pop("mask", None)
        if mask is None:  # p = 0: the identity
            return dy
        return xp.multiply(dy, mask, out=ws("dx", dy.shape, dy.dtype))

    def flops(self, in_shape):
        return 8.0 * math.prod(in_shape)

    def workspace_width(self, in_shape):
        return 4 * math.prod(in_shape)  # the uniforms (float64), the mask and the output

    def __repr__(self):
        return f"Dropout({self.p})"
