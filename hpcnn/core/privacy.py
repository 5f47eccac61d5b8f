"""DP-SGD's arithmetic: per-example gradient norms without per-example gradients, clip factors,
keyed Gaussian noise, keyed Poisson sampling.

DP-SGD (Abadi et al. 2016) clips each example's whole gradient to norm ``C`` and adds Gaussian noise
of standard deviation ``sigma * C`` to the sum. The clipped sum needs only each example's gradient
*norm*: an example's gradient is ``g_i``, and ``sum_i f_i g_i`` with ``f_i = min(1, C / ||g_i||)``
is, for every layer, the usual weight-gradient product with the output-gradient rows scaled by
``f_i`` (the products are linear in them). So a private step defers every layer's weight gradient
(the same step-long stacks a pipeline stage keeps: each layer's input and output-gradient rows),
asks each layer for its examples' squared gradient norms from them (``Layer.example_sq_norms``: for
``Dense``, ``||x_i||^2 ||dy_i||^2`` and ``||dy_i||^2``, "ghost" norms with no per-example
gradient), sums them over the layers of every pipeline stage, and forms each weight gradient once
from the scaled rows. The norms are per tensor, summed in model order (``total_sq_norms``): the same
bits whatever the stage cut.

Noise and sampling are drawn from generators seeded by the run's seed and the step
(and the tensor's index in the model): every layout draws the same numbers, and a resumed run draws
what an uninterrupted one would, with no generator state to save.
"""

import math

import numpy as np

from hpcnn.core.backend import xp

_NOISE = 0x4E4F4953  # "NOIS": keeps these keys apart from dropout's and sampling's
_SAMPLE = 0x504F4953  # "POIS"


def _seed(seed: int, a: int, b: int, domain: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) % 2**64, int(a), int(b), domain])


def total_sq_norms(parts, rows: int):
    """Each example's squared gradient norm from ``parts``, per-tensor columns ``(tensors, rows)`` in
    model order, added one tensor after the other: the same bits however the tensors were cut."""
    total = np.zeros(rows)
    for column in parts:
        total += column
    return total


def clip_factors(sq, max_norm: float, scale: float):
    """``min(1, C / ||g_i||)`` per example; ``sq`` are squared norms of the gradients as computed,
    i.e. of ``scale * g_i`` (the loss gradient's ``1 / batch`` scale)."""
    norms = np.sqrt(sq) / scale
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, max_norm / norms)


def gaussian_noise(seed: int, step: int, tensor: int, size: int, std: float, dtype):
    """``size`` normal deviates of standard deviation ``std`` for tensor ``tensor`` (its index in the
    whole model) at step ``step``, in ``dtype``.

    Box-Muller over a keyed ``SFC64`` stream of 32-bit integers: the first half give ``u1`` in
    ``(0, 1]``, the second ``u2`` in ``[0, 1)``, and each pair two deviates ``sqrt(-2 ln u1)
    (cos, sin)(2 pi u2)`` (cosines first, then sines), computed in ``dtype``. Drawing the bits is what
    costs (numpy's ziggurat spends ~3x longer per deviate here, a third of a step of the reference
    network); the transcendental functions are vectorised. ``u1 >= 2**-32`` bounds the deviates'
    magnitude at 6.66 ``std``, like any floating-point sampler's tail cut (Opacus's included)."""
    half = -(-size // 2)
    words = np.random.SFC64(_seed(seed, step, tensor, _NOISE)).random_raw(half)
    u = xp.asarray(words.view(np.uint32), dtype=dtype)  # 2 * half uniform 32-bit integers
    u1, u2 = u[:half], u[half:]
    u1 += 1
    u *= 2.0**-32
    u2 *= 2 * math.pi
    radius = xp.log(u1, out=u1)
    radius *= -2
    xp.sqrt(radius, out=radius)
    radius *= std
    out = xp.empty(2 * half, dtype=dtype)
    xp.cos(u2, out=out[:half])
    xp.sin(u2, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out[:size]


def poisson_batch(seed: int, epoch: int, batch: int, ids, rate: float):
    """The rows of global batch ``batch`` of ``epoch`` under Poisson sampling: each of ``ids`` is in
    it with probability ``rate``, independently (the sampling the privacy accountant assumes). Every
    rank draws the same inclusions from one keyed stream and keeps its own slice of the rows drawn."""
    rng = np.random.Generator(np.random.SFC64(_seed(seed, epoch, batch, _SAMPLE)))
    return ids[rng.random(len(ids)) < rate]


def ghost_conv_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    """Whether a convolution's per-example norms are cheaper as "ghost" norms (``P^2 (K + N)``
    products per example, from the Gram matrices of its ``P`` columns and output-gradient rows) than
    by forming each example's ``K x N`` gradient (``P K N``)."""
    return positions * (fan_in + fan_out) < fan_in * fan_out


def rows_sq_norm(a):
    """``||a_i||^2`` per row of ``a`` (any shape: rows first), summed in float64."""
    flat = a.reshape(len(a), math.prod(a.shape[1:]))  # (not -1: an empty batch has 0 rows)
    return np.einsum("ij,ij->i", flat, flat, dtype=np.float64)


def steps_per_epoch(rate: float) -> int:
    """Poisson-sampled batches per epoch: ``round(1 / rate)`` (each row drawn once on average)."""
    return max(1, int(math.floor(1.0 / rate + 0.5)))
