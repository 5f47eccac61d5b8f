"""Normalisation layers: ``BatchNorm`` (per channel, over the batch) and ``LayerNorm`` (per row).

Both take flat rows ``(batch, features)`` and images ``(batch, H, W, C)`` (channels last); the
normalised axis is the last one. docs/normalization.md says what each computes in every parallel
mode; in short:

``BatchNorm(channels)``: in training, each channel is normalised with the mean and (biased)
variance of its values over every other axis of the *group* of rows it is computed over, then
scaled and shifted by a learned gain ``g`` and bias ``b``: ``y = g * (x - mean) / sqrt(var + eps) + b``.
The group is the micro-batch's rows on every data-parallel replica of the stage: the per-channel
sums are added over the replicas (``saved["stats"]``, ``hpcnn.parallel.batchstats``) and divided
by the group's row count, so with ``micro_batches = 1`` the statistics are those of the whole
global batch at any number of replicas (N ranks compute what one rank does, to rounding). With
micro-batches, micro-batch ``m`` of every replica forms one group (GPipe's choice): the result then
depends on ``(replicas, micro_batches)``. Statistics are accumulated in float64, in two passes (the
sum, then the sum of squared deviations from the group mean: no cancellation). Backward needs two
more per-channel sums over the group (``sum dy``, ``sum dy * xhat``): also added over the
replicas. The running mean and (unbiased) variance, ``running = (1 - momentum) * running +
momentum * batch`` once per micro-batch in order, are layer state (``state_specs``): the same on
every replica, untouched by the optimizer, stored in checkpoints, and what inference normalises
with (no communication).

Deterministic mode (``shard``): each fixed row shard's sums are placed in its row of a
``(global shards, k)`` array that is zero elsewhere; the sum over the replicas is then exact (one
non-zero per entry), and the shards are added in shard order: the same bits at any layout (with
``micro_batches = 1``). The weight gradients go per shard into the per-shard gradient rows.

``LayerNorm(features)``: each row's last axis (each pixel's channels, for images) is normalised
with its own mean and variance, then ``g * xhat + b``; row by row, so nothing is communicated and
deterministic mode only needs per-shard ``g``/``b`` gradients.

Weight gradients (per-channel sums) are cheap, so both layers form them in backward also where a
pipeline stage defers those of other layers (``saved["defer"]``): written, or added with
``accumulate``.
"""

import math

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.layers import Layer
from hpcnn.core.params import ParamSpec
from hpcnn.core.privacy import rows_sq_norm
from hpcnn.core.workspace import FRESH

F64 = np.float64


def _channels(layer, in_shape, n: int) -> None:
    if not in_shape or in_shape[-1] != n:
        raise ValueError(
            f"{layer!r} normalises the last axis of {n} values; rows of shape {tuple(in_shape)} do not fit"
        )


class BatchNorm(Layer):
    """Batch normalisation over every axis but the last (channels): ``(n, C)`` or ``(n, H, W, C)``.

    Parameters
    ----------
    channels : values of the last axis
    eps : added to the variance
    momentum : weight of each batch's statistics in the running ones (PyTorch's convention)
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self._shards = self._shard_grads = None  # deterministic mode (``shard``)
        self._part = None  # scratch for micro-batches after the first (accumulate)

    def param_specs(self):
        return [ParamSpec("g", (self.channels,), "ones"), ParamSpec("b", (self.channels,), "zeros")]

    def state_specs(self):
        return [ParamSpec("mean", (self.channels,), "zeros"), ParamSpec("var", (self.channels,), "ones")]

    def bind(self, params, grads):
        self.g, self.b, self.dg, self.db = params["g"], params["b"], grads["g"], grads["b"]
        self._part = None

    def bind_state(self, views):
        self.running_mean, self.running_var = views["mean"], views["var"]

    def shard(self, sharding, grads):
        self._shards, self._shard_grads = sharding, grads

    # --- the group's sums ------------------------------------------------------------------------

    def _group_sum(self, row_sums, width: int, n: int, saved, ws, name: str, reduce: bool = True):
        """``row_sums(rows, out)`` (float64 ``(width,)`` over a slice of the batch's rows) summed
        over the group: this forward's rows and, through ``saved["stats"]``, the other replicas'.
        In deterministic mode per shard, in shard order. Returns ``(total, this forward's per-shard
        sums)`` (``None`` outside deterministic mode); ``reduce=False``: the per-shard sums only."""
        stats, key = saved.get("stats"), saved.get("key")
        sh = self._shards
        if sh is None:
            total = row_sums(slice(None), ws(name, (width,), F64))
            if stats is not None:
                stats.sum(total)
            return total, None
        row, batch_rows = (key.row, key.batch_rows) if key is not None else (0, n)
        first, count = row // sh.rows, sh.blocks(n)
        parts = ws(name + "_shards", (-(-batch_rows // sh.rows), width), F64)
        parts.fill(0)
        for k in range(count):
            row_sums(sh.rows_of(k, n), parts[first + k])
        mine = parts[first : first + count]
        if not reduce:
            return None, mine
        if stats is not None:
            stats.sum(parts)  # one non-zero value per entry: exact in any order
        total = ws(name, (width,), F64)
        total[...] = parts[0]
        for k in range(1, len(parts)):  # a fixed order: the same bits at any layout
            total += parts[k]
        return total, mine

    # --- forward and backward --------------------------------------------------------------------

    def forward(self, x, saved, ws=FRESH):
        n, c, dt = len(x), self.channels, x.dtype
        y = ws("y", x.shape, dt)
        if saved is None:  # inference: the running statistics
            scale = xp.add(self.running_var, self.eps, out=ws("scale", (c,), dt))
            xp.sqrt(scale, out=scale)
            xp.divide(self.g, scale, out=scale)
            shift = xp.multiply(self.running_mean, scale, out=ws("shift", (c,), dt))
            xp.subtract(self.b, shift, out=shift)
            xp.multiply(x, scale, out=y)
            y += shift
            return y
        per_row = math.prod(x.shape[1:-1])  # values of a channel in one row (pixels)
        x3 = x.reshape(n, per_row, c)

        def sums(rows, out):  # count and per-channel sum
            block = x3[rows]
            out[0] = block.shape[0] * per_row
            xp.sum(block.reshape(-1, c), axis=0, dtype=F64, out=out[1:])
            return out

        s1, _ = self._group_sum(sums, c + 1, n, saved, ws, "s1")
        count = float(s1[0])
        mean = xp.divide(s1[1:], max(count, 1.0), out=ws("mean", (c,), F64))
        xc = xp.subtract(x, mean.astype(dt, copy=False), out=ws("xhat", x.shape, dt))
        xc3 = xc.reshape(n, per_row, c)

        def squares(rows, out):  # per-channel sum of squared deviations from the group mean
            block = xc3[rows].reshape(-1, c)
            xp.einsum("ij,ij->j", block, block, dtype=F64, out=out)
            return out

        s2, _ = self._group_sum(squares, c, n, saved, ws, "s2")
        var = xp.divide(s2, max(count, 1.0), out=ws("var", (c,), F64))
        inv = xp.add(var, self.eps, out=ws("inv", (c,), F64))
        xp.sqrt(inv, out=inv)
        xp.divide(1.0, inv, out=inv)
        xc *= inv.astype(dt, copy=False)  # xhat
        xp.multiply(xc, self.g, out=y)
        y += self.b
        if count > 0:  # the running statistics, from the group's (the same on every replica)
            m = self.momentum
            self.running_mean *= 1 - m
            self.running_mean += m * mean
            self.running_var *= 1 - m
            self.running_var += (m * count / max(count - 1.0, 1.0)) * var
        saved["xhat"], saved["inv"], saved["count"] = xc, inv, count
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        xhat, inv, count = saved.pop("xhat"), saved.pop("inv"), saved.pop("count")
        n, c, dt = len(dy), self.channels, dy.dtype
        per_row = math.prod(dy.shape[1:-1])
        dy3, xh3 = dy.reshape(n, per_row, c), xhat.reshape(n, per_row, c)

        def sums(rows, out):  # [sum dy, sum dy * xhat] per channel
            d, h = dy3[rows].reshape(-1, c), xh3[rows].reshape(-1, c)
            xp.sum(d, axis=0, dtype=F64, out=out[:c])
            xp.einsum("ij,ij->j", d, h, dtype=F64, out=out[c:])
            return out

        if self._shards is not None:  # per-shard sums: the shards' weight gradients, then the group's
            total, mine = self._group_sum(sums, 2 * c, n, saved, ws, "s3", need_dx)
            first = saved.get("shard", 0)
            for k, part in enumerate(mine):
                self._shard_grads["b"][first + k] = part[:c]
                self._shard_grads["g"][first + k] = part[c:]
        else:
            local = sums(slice(None), ws("local", (2 * c,), F64))
            self._weight_grads(local, accumulate)
            if need_dx:
                total = ws("s3", (2 * c,), F64)
                total[...] = local
                stats = saved.get("stats")
                if stats is not None:
                    stats.sum(total)
        if not need_dx:
            return None
        # dx = g * inv * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M), sums over the group's M values
        total /= max(count, 1.0)
        dx = xp.subtract(dy, total[:c].astype(dt, copy=False), out=ws("dx", dy.shape, dt))
        t = xp.multiply(xhat, total[c:].astype(dt, copy=False), out=ws("t", dy.shape, dt))
        dx -= t
        scale = xp.multiply(inv, self.g, out=ws("gin", (c,), F64))
        dx *= scale.astype(dt, copy=False)
        return dx

    def _weight_grads(self, local, accumulate: bool) -> None:
        """dg = sum dy * xhat, db = sum dy over this forward's rows (the reduction adds replicas)."""
        c = self.channels
        if accumulate:
            self.db += local[:c].astype(self.db.dtype, copy=False)
            self.dg += local[c:].astype(self.dg.dtype, copy=False)
        else:
            self.db[...] = local[:c]
            self.dg[...] = local[c:]

    def out_shape(self, in_shape):
        _channels(self, in_shape, self.channels)
        return tuple(in_shape)

    def flops(self, in_shape):
        return 16.0 * math.prod(in_shape)

    def workspace_width(self, in_shape):
        return 2 * math.prod(in_shape)

    def __repr__(self):
        return f"BatchNorm({self.channels})"


class LayerNorm(Layer):
    """``y = g * (x - mean(x)) / sqrt(var(x) + eps) + b`` over each row's last axis (``features``)."""

    def __init__(self, features: int, eps: float = 1e-5):
        self.features, self.eps = features, eps
        self._part = None  # scratch for micro-batches after the first (accumulate)
        self._shards = self._shard_grads = None  # deterministic mode (``shard``)
        self._per = 1  # pixels per row of the deferred backwards (``weight_grads``)

    def param_specs(self):
        return [ParamSpec("g", (self.features,), "ones"), ParamSpec("b", (self.features,), "zeros")]

    def bind(self, params, grads):
        self.g, self.b, self.dg, self.db = params["g"], params["b"], grads["g"], grads["b"]
        self._part = None

    def shard(self, sharding, grads):
        self._shards, self._shard_grads = sharding, grads

    def forward(self, x, saved, ws=FRESH):
        f, dt = self.features, x.dtype
        x2 = x.reshape(-1, f)  # one row per pixel for images
        m = len(x2)
        mean = xp.mean(x2, axis=1, out=ws("mean", (m,), dt))
        xhat = xp.subtract(x2, mean[:, None], out=ws("xhat", x2.shape, dt))
        inv = xp.einsum("ij,ij->i", xhat, xhat, out=ws("inv", (m,), dt))  # 1 / std, per row
        inv /= f
        inv += self.eps
        xp.sqrt(inv, out=inv)
        xp.divide(1, inv, out=inv)
        xhat *= inv[:, None]
        y = xp.multiply(xhat, self.g, out=ws("y", x2.shape, dt))
        y += self.b
        if saved is not None:
            saved["xhat"], saved["inv"] = xhat, inv
        return y.reshape(x.shape)

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        xhat, inv = saved.pop("xhat"), saved.pop("inv")
        f, dt = self.features, dy.dtype
        dy2 = dy.reshape(-1, f)
        if "defer" in saved and self._shards is None:  # (first row, step rows, stack scope)
            first, rows, stack = saved["defer"]
            if len(dy):
                self._per = len(dy2) // len(dy)  # pixels per row (1 for flat rows)
            at = slice(first * self._per, (first + len(dy)) * self._per)
            stack("xhat", (rows * self._per, f), dt)[at] = xhat
            stack("dy", (rows * self._per, f), dt)[at] = dy2
        else:
            self._weight_grads(dy, dy2, xhat, saved, accumulate)
        if not need_dx:
            return None
        # dx = inv * (d - mean(d) - xhat * mean(d * xhat)), d = dy * g: the gradient through xhat
        m = len(dy2)
        d = xp.multiply(dy2, self.g, out=ws("d", dy2.shape, dt))
        m1 = xp.mean(d, axis=1, out=ws("m1", (m,), dt))
        m2 = xp.einsum("ij,ij->i", d, xhat, out=ws("m2", (m,), dt))
        m2 /= f
        dx = xp.multiply(xhat, m2[:, None], out=ws("dx", dy2.shape, dt))
        xp.subtract(d, dx, out=dx)
        dx -= m1[:, None]
        dx *= inv[:, None]
        return dx.reshape(dy.shape)

    def _weight_grads(self, dy, dy2, xhat, saved, accumulate) -> None:
        """dg = sum of dy * xhat, db = sum of dy over rows: per shard, written or added."""
        if self._shards is not None:  # deterministic mode: each shard's sums into its own row
            first, sh, n = saved.get("shard", 0), self._shards, len(dy)
            per = len(dy2) // max(n, 1)  # pixels per row
            dg, db = self._shard_grads["g"], self._shard_grads["b"]

            def one(k):
                r = sh.rows_of(k, n)
                rows = slice(r.start * per, r.stop * per)
                xp.einsum("ij,ij->j", dy2[rows], xhat[rows], out=dg[first + k])
                xp.sum(dy2[rows], axis=0, out=db[first + k])

            sh.workers.run(one, sh.blocks(n))
        elif accumulate:
            if self._part is None:
                self._part = (xp.empty_like(self.dg), xp.empty_like(self.db))
            self.dg += xp.einsum("ij,ij->j", dy2, xhat, out=self._part[0])
            self.db += xp.sum(dy2, axis=0, out=self._part[1])
        else:
            xp.einsum("ij,ij->j", dy2, xhat, out=self.dg)
            xp.sum(dy2, axis=0, out=self.db)

    def _stacked(self, stack, rows):
        shape, dt = (rows * self._per, self.features), self.dg.dtype
        return stack("xhat", shape, dt), stack("dy", shape, dt)

    def weight_grads(self, stack, rows, factors=None):
        xhat, dy2 = self._stacked(stack, rows)
        if factors is not None:
            dy2.reshape(rows, self._per, self.features)[...] *= factors[:, None, None]
        xp.einsum("ij,ij->j", dy2, xhat, out=self.dg)
        xp.sum(dy2, axis=0, out=self.db)

    def example_sq_norms(self, stack, rows):
        xhat, dy2 = self._stacked(stack, rows)
        d3 = dy2.reshape(rows, self._per, self.features)
        dg = xp.einsum("ipj,ipj->ij", d3, xhat.reshape(d3.shape))  # each example's g gradient
        return [rows_sq_norm(dg), rows_sq_norm(d3.sum(axis=1))]

    def deferred_width(self, in_shape):
        return 2 * math.prod(in_shape)

    def out_shape(self, in_shape):
        _channels(self, in_shape, self.features)
        return tuple(in_shape)

    def flops(self, in_shape):
        return 20.0 * math.prod(in_shape)

    def workspace_width(self, in_shape):
        return 3 * math.prod(in_shape)

    def __repr__(self):
        return f"LayerNorm({self.features})"
