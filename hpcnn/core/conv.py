"""Convolution and pooling layers on image rows ``(H, W, C)``: arrays ``(batch, H, W, C)``, channels last.

``Conv2D`` is im2col plus one matrix product: every output pixel's receptive field is copied into
a row of a workspace array ``cols`` ``(batch * Ho * Wo, KH * KW * C)`` (the ``(kh, kw, c)`` order of
the weight's rows), and ``cols @ W`` is the output ``(batch, Ho, Wo, Cout)`` directly, with no
transposition. In NHWC one row of a receptive field is ``KW * C`` contiguous values of the (padded)
image, so im2col is a single strided copy of such runs, and the product's result is already in the
layout the next layer reads (docs/architecture.md). Backward forms the weight gradient as
``cols.T @ dy``, one product over all pixels of the micro-batch. The input gradient is, for
"same" padding at stride 1, itself a convolution: im2col of the padded ``dy`` and one product with
the flipped kernel, into the ``cols`` array (dead once the weight gradient is formed). Otherwise it
is ``dy @ W.T`` there, added back onto the input pixels by col2im.

With one input channel a field's rows are only ``KW`` values long and the product has only
``KH * KW`` columns, both slow (numpy's per-run cost, a narrow matrix in BLAS); with a few channels,
col2im adds runs of only ``KW * C`` values. The columns are then *blocked*: one row per block of
``b`` output pixels side by side, holding the ``KH`` rows of ``(b - 1) * stride + KW`` input values
they read, and the kernel is the ``b`` shifted copies of ``W`` side by side (zeros elsewhere), so
that the product gives ``b`` pixels' outputs at once, still in the output's layout. This does more
arithmetic (the zeros) on a better-shaped product, and copies (and, in col2im, adds) fewer, longer
runs.

Pooling works on strided views of the input, one per window offset: whole-array operations, no
index arrays. ``MaxPool2D`` finds the window's first maximum again in backward, by comparing the
input with the output it kept.
"""

import math

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.layers import Layer
from hpcnn.core.params import ParamSpec
from hpcnn.core.privacy import ghost_conv_cheaper, rows_sq_norm
from hpcnn.core.workspace import FRESH


def pair(value) -> tuple[int, int]:
    """``(h, w)`` from an int (both) or an ``[h, w]`` pair."""
    if isinstance(value, (int, xp.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def _spec_value(value):
    """A size as its spec stores it: an int as it is, a pair as a list (what JSON gives back, so
    that a checkpoint's spec and the rebuilt layer's are equal)."""
    return (
        None if value is None else int(value) if isinstance(value, (int, xp.integer)) else list(pair(value))
    )


def _image(in_shape, who: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"{who} takes image rows (H, W, C), not rows of shape {tuple(in_shape)}")
    return tuple(int(n) for n in in_shape)


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _valid(size: int, out: int, k: int, stride: int, padding: int) -> tuple[int, int, int]:
    """For kernel offset ``k``: the output positions ``[o0, o1)`` whose input position
    ``o * stride + k - padding`` lies inside ``[0, size)``, and the input position of ``o0``."""
    o0 = max(0, -((k - padding) // stride))
    o1 = min(out, (size - 1 + padding - k) // stride + 1)
    return o0, max(o0, o1), o0 * stride + k - padding


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in every framework) of NHWC images.

    Parameters
    ----------
    in_channels, out_channels : channels of the input and output rows
    kernel, stride, padding : an int (both directions) or an ``[h, w]`` pair; ``padding`` zeros on
        each side
    bias : whether a per-channel bias is added
    init : ``W``'s initialisation (``he``: fan-in ``KH * KW * in_channels``)

    ``W`` has shape ``(KH, KW, in_channels, out_channels)``, ``b`` ``(out_channels,)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel,
        stride=1,
        padding=0,
        bias: bool = True,
        init: str = "he",
    ):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel, self.stride, self.padding = (
            _spec_value(kernel),
            _spec_value(stride),
            _spec_value(padding),
        )
        self.bias, self.init = bias, init
        self._k, self._s, self._p = pair(kernel), pair(stride), pair(padding)
        if min(self._k) < 1 or min(self._s) < 1 or min(self._p) < 0 or min(in_channels, out_channels) < 1:
            raise ValueError(
                f"Conv2D({in_channels}, {out_channels}, kernel={kernel}, stride={stride}, "
                f"padding={padding}): sizes must be positive (padding non-negative)"
            )
        self.fan_in = self._k[0] * self._k[1] * self.in_channels
        self._dW_part = self._db_part = None  # scratch for accumulated micro-batch gradients
        self._shards = self._shard_grads = None  # deterministic mode (``shard``)
        self._deferred_shape = None  # input row shape of the deferred backwards (``weight_grads``)
        self._cols_built = False  # this step's stacked columns are built (``_stacked``)
        self._Wt = None  # the transposed convolution's kernel (``_flipped``)
        self._T = self._dT = None  # the blocked kernel and its gradient (``_blocked``)

    def param_specs(self):
        kh, kw = self._k
        specs = [
            ParamSpec(
                "W",
                (kh, kw, self.in_channels, self.out_channels),
                self.init,
                self.fan_in,
                kh * kw * self.out_channels,
            )
        ]
        if self.bias:
            specs.append(ParamSpec("b", (self.out_channels,), "zeros"))
        return specs

    def bind(self, params, grads):
        # 2-D views (fan_in, out_channels) of the contiguous tensors: the products' operands
        self.W = params["W"].reshape(self.fan_in, self.out_channels)
        self.dW = grads["W"].reshape(self.fan_in, self.out_channels)
        self.b, self.db = (params["b"], grads["b"]) if self.bias else (None, None)
        self._dW_part = self._db_part = None

    # -- shapes -------------------------------------------------------------------------------------

    def out_shape(self, in_shape):
        h, w, c = _image(in_shape, repr(self))
        if c != self.in_channels:
            raise ValueError(
                f"{self!r} takes {self.in_channels} channels, not {c} (rows of shape {in_shape})"
            )
        ho, wo = (_out_size(n, k, s, p) for n, k, s, p in zip((h, w), self._k, self._s, self._p, strict=True))
        if ho < 1 or wo < 1:
            raise ValueError(
                f"{self!r} on {h}x{w} images leaves no output pixel (kernel larger than the padded image)"
            )
        return ho, wo, self.out_channels

    def flops(self, in_shape):
        ho, wo, _ = self.out_shape(in_shape)
        # three products of one size: y = cols W, dW = cols.T dy, and the input gradient's
        return 3 * 2.0 * ho * wo * self.fan_in * self.out_channels

    def products(self, in_shape):
        ho, wo, cout = self.out_shape(in_shape)
        return [(ho * wo, self.fan_in, cout)]  # cols (rows * Ho * Wo, KH * KW * C) @ W

    def workspace_width(self, in_shape):
        (h, w, c), (ho, wo) = in_shape, self._sizes(in_shape)
        width = self._cols_width(in_shape) + ho * wo  # cols (the columns of dy in backward), ones
        if self._p != (0, 0):
            width += (h + 2 * self._p[0]) * (w + 2 * self._p[1]) * c
            if self._block(in_shape):  # the padded input gradient of blocked col2im
                width += (h + 2 * self._p[0]) * (w + 2 * self._p[1]) * c
        if self._transposed():
            q = self._q()
            width += (ho + 2 * q[0]) * (wo + 2 * q[1]) * self.out_channels
        return width

    def deferred_width(self, in_shape):
        ho, wo, c = self.out_shape(in_shape)
        # the input and output-gradient rows, and the columns weight_grads rebuilds from them
        return math.prod(in_shape) + ho * wo * c + ho * wo * self.fan_in

    # -- im2col / col2im ----------------------------------------------------------------------------

    def _sizes(self, in_shape) -> tuple[int, int]:
        ho, wo, _ = self.out_shape(in_shape)
        return ho, wo

    def _transposed(self) -> bool:
        """Whether the input gradient is computed as a stride-1 convolution (of the output gradient
        padded by ``kernel - 1 - padding``, with the flipped, transposed kernel): im2col of ``dy``
        and one product, no scatter-add. Only for "same" padding: with less, the padded ``dy`` is
        larger than ``dy`` and the product multiplies mostly zeros (col2im is then cheaper)."""
        return self._s == (1, 1) and all(2 * p == k - 1 for p, k in zip(self._p, self._k, strict=True))

    def _cols_width(self, in_shape) -> int:
        """Values per row of the ``cols`` workspace: the forward's columns, and in backward those of
        ``dy`` for the transposed convolution (the same array: cols is dead by then)."""
        (h, w, c), (ho, wo) = in_shape, self._sizes(in_shape)
        width = ho * wo * self.fan_in
        if b := self._block(in_shape):
            width = max(width, ho * (wo // b) * self._k[0] * self._span(b) * c)
        if self._transposed():
            width = max(width, h * w * self._k[0] * self._k[1] * self.out_channels)
        return width

    def _block(self, in_shape) -> int:
        """Output pixels per blocked field (``_blocked``), 0 when the columns are not blocked: for
        one input channel, or short field rows (``KW * C`` values) whose input gradient would go
        through col2im (blocked col2im adds longer runs; the transposed convolution needs none);
        the block size must divide the output width."""
        c = in_shape[2]
        if c > 1 and (self._transposed() or self._k[1] * c >= _SHORT_ROW):
            return 0
        wo = self._sizes(in_shape)[1]
        return next((b for b in range(_BLOCK, 1, -1) if wo % b == 0), 0)

    def _span(self, b: int) -> int:
        """Input columns a block of ``b`` output pixels reads."""
        return (b - 1) * self._s[1] + self._k[1]

    def _blocked(self, b: int):
        """The kernel of the blocked product, ``(KH * span * C, b * Cout)``: for each of a block's
        ``b`` output pixels, ``W`` shifted to that pixel's columns of the field, zeros elsewhere
        (a small scratch array, rebuilt from ``W`` each forward)."""
        (kh, kw), sw, c, cout = self._k, self._s[1], self.in_channels, self.out_channels
        shape = (kh, self._span(b), c, b, cout)
        if self._T is None or self._T.shape != shape or self._T.dtype != self.W.dtype:
            self._T = xp.zeros(shape, self.W.dtype)
            self._dT = xp.empty(shape, self.W.dtype)
        w4 = self.W.reshape(kh, kw, c, cout)
        for j in range(b):
            self._T[:, j * sw : j * sw + kw, :, j] = w4
        return self._T.reshape(-1, b * cout)

    def _fold(self, dT, out) -> None:
        """``out`` (the ``W`` gradient) from the blocked kernel's gradient ``dT``: the sum over a
        block's pixels of each one's shifted copy of ``W``."""
        (kh, kw), sw, c, cout = self._k, self._s[1], self.in_channels, self.out_channels
        out4 = out.reshape(kh, kw, c, cout)
        xp.copyto(out4, dT[:, 0:kw, :, 0])
        for j in range(1, dT.shape[3]):
            out4 += dT[:, j * sw : j * sw + kw, :, j]

    def _blocked_col2im(self, dcols, dx, dpad, b: int) -> None:
        """Add the blocked fields' gradient ``dcols`` (n, Ho, Wo / b, KH, span * C) back onto ``dx``
        (n, H, W, C), which this fills, through ``dpad`` (the padded image's gradient, ``None``
        without padding). Blocks next to each other overlap by ``span - b * stride`` columns: each
        addition takes one piece of ``b * stride`` columns of every block's row (pieces of different
        blocks do not overlap), so there are a few additions per kernel row, over long runs."""
        (kh_, _), (sh, sw), (ph, pw) = self._k, self._s, self._p
        n, h, w, c = dx.shape
        _, ho, nb, _, width = dcols.shape
        if n == 0:  # a replica without rows of this batch (numpy gives empty arrays zero strides)
            return
        out = dx if dpad is None else dpad
        out[...] = 0
        flat, (s0, s1, _, s3) = out.reshape(-1), out.strides
        piece, row = b * sw * c, s1 // s3  # values per piece; per (padded) image row
        for kh in range(kh_):
            for u in range(0, width, piece):
                size = min(piece, width - u)
                view = xp.lib.stride_tricks.as_strided(
                    flat[kh * row + u :], (n, ho, nb, size), (s0, sh * s1, piece * s3, s3)
                )
                view += dcols[:, :, :, kh, u : u + size]
        if dpad is not None:
            xp.copyto(dx, dpad[:, ph : ph + h, pw : pw + w])

    def _cols(self, ws, name: str, n: int, in_shape, dtype):
        """The ``cols`` workspace of ``n`` rows (flat: its views below are contiguous)."""
        return ws(name, (n * self._cols_width(in_shape),), dtype)

    def _fields(self, x, pad, cols) -> None:
        """Receptive fields of ``x`` (n, H, W, C) into ``cols`` (n, Ho, Wo, KH, KW * C) through
        ``pad`` (the padded image, or ``None`` without padding)."""
        _fields(x, pad, self._p, self._k, self._s, cols)

    def _offset_cols(self, x, pad, cols) -> None:
        """One-channel im2col, kernel offset by kernel offset: ``cols[kh * KW + kw]`` (n, Ho, Wo)
        is the image shifted by that offset. With one channel the usual columns' runs are only
        ``KW`` values long, and the per-run cost of numpy's copy dominates; these copies run
        along image rows, and the products take the columns transposed (``cols.T @ W``)."""
        (kh_, kw_), (sh, sw) = self._k, self._s
        _, ho, wo = cols.shape[1:]
        src = _padded(x, pad, self._p)
        for kh in range(kh_):
            for kw in range(kw_):
                xp.copyto(
                    cols[kh * kw_ + kw],
                    src[:, kh : kh + (ho - 1) * sh + 1 : sh, kw : kw + (wo - 1) * sw + 1 : sw, 0],
                )

    def _offset_col2im(self, dcols, dx) -> None:
        """The inverse of ``_offset_cols``: each offset's ``dcols[kh * KW + kw]`` (n, Ho, Wo) added
        back onto the pixels it was copied from, in ``dx`` (n, H, W, 1), which this fills."""
        (kh_, kw_), (sh, sw), (ph, pw) = self._k, self._s, self._p
        _, h, w, _ = dx.shape
        _, _, ho, wo = dcols.shape
        dx[...] = 0
        for kh in range(kh_):
            i0, i1, hs = _valid(h, ho, kh, sh, ph)
            for kw in range(kw_):
                j0, j1, ws = _valid(w, wo, kw, sw, pw)
                if i1 > i0 and j1 > j0:
                    dx[
                        :, hs : hs + (i1 - i0 - 1) * sh + 1 : sh, ws : ws + (j1 - j0 - 1) * sw + 1 : sw, 0
                    ] += dcols[kh * kw_ + kw, :, i0:i1, j0:j1]

    def _col2im(self, dcols, dx) -> None:
        """Add each column of ``dcols`` (n, Ho, Wo, KH, KW, C) back onto its input pixel in ``dx``
        (n, H, W, C), which this fills. One addition per kernel row ``kh`` and output column ``j``:
        the ``KW * C`` values of a field's row are one contiguous run in both arrays (numpy's loops
        then run over runs that long, not over ``C`` values; with one channel, one addition per
        kernel offset is faster). A few images at a time, so that their ``dx`` stays in cache
        through the additions."""
        (kh_, kw_), (sh, sw), (ph, pw) = self._k, self._s, self._p
        n, h, w, c = dx.shape
        _, ho, wo = dcols.shape[:3]
        step = max(1, _CACHE_VALUES // (h * w * c))
        dx[...] = 0
        runs = []  # (rows of dx, columns of dx, rows of dcols, columns of dcols, kh, offsets kw)
        for kh in range(kh_):
            i0, i1, hs = _valid(h, ho, kh, sh, ph)
            if i1 == i0:
                continue
            rows = slice(hs, hs + (i1 - i0 - 1) * sh + 1, sh)
            if c == 1:  # runs of one value: an addition per (kh, kw) over strided columns is faster
                for kw in range(kw_):
                    j0, j1, ws = _valid(w, wo, kw, sw, pw)
                    if j1 > j0:
                        runs.append(
                            (rows, slice(ws, ws + (j1 - j0 - 1) * sw + 1, sw), i0, i1, slice(j0, j1), kh, kw)
                        )
                continue
            for j in range(wo):
                kw0, kw1 = max(0, pw - j * sw), min(kw_, w + pw - j * sw)
                if kw1 > kw0:
                    ws = j * sw + kw0 - pw
                    runs.append((rows, slice(ws, ws + kw1 - kw0), i0, i1, j, kh, slice(kw0, kw1)))
        for a in range(0, n, step):
            part, src = dx[a : a + step], dcols[a : a + step]
            for rows, cols, i0, i1, j, kh, kw in runs:
                part[:, rows, cols] += src[:, i0:i1, j, kh, kw]

    def _pad_ws(self, ws, name, n, shape, pad, dtype):
        if pad == (0, 0):
            return None
        h, w, c = shape
        return ws(name, (n, h + 2 * pad[0], w + 2 * pad[1], c), dtype)

    def _flipped(self):
        """``W`` as the kernel of the transposed convolution, ``(KH, KW, Cout, Cin)`` flipped in
        space (a small scratch array, made once)."""
        kh, kw = self._k
        if self._Wt is None or self._Wt.dtype != self.W.dtype:
            self._Wt = xp.empty((kh, kw, self.out_channels, self.in_channels), self.W.dtype)
        w4 = self.W.reshape(kh, kw, self.in_channels, self.out_channels)
        xp.copyto(self._Wt, w4[::-1, ::-1].transpose(0, 1, 3, 2))
        return self._Wt.reshape(-1, self.in_channels)

    def _input_grad(self, dy, dx, cols, dypad, Wt) -> None:
        """``dx`` (n, H, W, C) from ``dy`` (n, Ho, Wo, Cout), through the flat ``cols`` scratch."""
        n, h, w, c = dx.shape
        (kh, kw), cout = self._k, self.out_channels
        if Wt is not None:  # the transposed convolution: im2col of dy, one product
            tcols = cols[: n * h * w * kh * kw * cout].reshape(n, h, w, kh, kw * cout)
            q = (kh - 1 - self._p[0], kw - 1 - self._p[1])
            _fields(dy, dypad, q, self._k, (1, 1), tcols)
            xp.matmul(tcols.reshape(-1, kh * kw * cout), Wt, out=dx.reshape(-1, c))
            return
        ho, wo = dy.shape[1:3]
        dcols = cols[: n * ho * wo * self.fan_in].reshape(-1, self.fan_in)
        xp.matmul(dy.reshape(-1, cout), self.W.T, out=dcols)
        self._col2im(dcols.reshape(n, ho, wo, kh, kw, c), dx)

    # -- forward / backward -------------------------------------------------------------------------

    def forward(self, x, saved, ws=FRESH):
        n, shape = len(x), x.shape[1:]
        ho, wo, cout = self.out_shape(shape)
        (kh, kw), c = self._k, self.in_channels
        flat = self._cols(ws, "cols", n, shape, x.dtype)
        cols = flat[: n * ho * wo * self.fan_in].reshape(n, ho, wo, kh, kw * c)
        pad = self._pad_ws(ws, "pad", n, shape, self._p, x.dtype)
        y = ws("y", (n, ho, wo, cout), x.dtype)
        block = self._block(shape) if self._shards is None else 0
        by_offset = c == 1 and self._shards is None and not block
        if block:  # few channels: fields of a block of output pixels (see _blocked)
            span = self._span(block)
            cols = flat[: n * ho * (wo // block) * kh * span * c].reshape(n, ho, wo // block, kh, span * c)
            _fields(x, pad, self._p, (kh, span), (self._s[0], block * self._s[1]), cols)
            xp.matmul(
                cols.reshape(len(cols) * ho * (wo // block), kh * span * c),
                self._blocked(block),
                out=y.reshape(-1, block * cout),
            )
        elif by_offset:  # one channel: the columns kernel offset by kernel offset (see _offset_cols)
            cols = flat[: n * ho * wo * self.fan_in].reshape(self.fan_in, n * ho * wo)
            self._offset_cols(x, pad, cols.reshape(self.fan_in, n, ho, wo))
            xp.matmul(cols.T, self.W, out=y.reshape(-1, cout))
        elif self._shards is None:
            self._fields(x, pad, cols)
            xp.matmul(cols.reshape(-1, self.fan_in), self.W, out=y.reshape(-1, cout))
        else:
            sh = self._shards

            def one(k):
                r = sh.rows_of(k, n)
                self._fields(x[r], None if pad is None else pad[r], cols[r])
                xp.matmul(cols[r].reshape(-1, self.fan_in), self.W, out=y[r].reshape(-1, cout))

            sh.workers.run(one, sh.blocks(n))
        if self.bias:  # as one row of Ho * Wo * Cout values: numpy's loops would otherwise run over Cout
            row = ws("bias", (ho * wo, cout), x.dtype)
            xp.copyto(row, self.b)
            y.reshape(n, ho * wo * cout)[...] += row.reshape(-1)
        if saved is not None:
            saved["x"], saved["cols"], saved["flat"], saved["by_offset"] = x, cols, flat, by_offset
            saved["block"] = block
        return y

    def _bias_grad(self, dy2, out, ws) -> None:
        """``out = sum(dy2, axis=0)`` as a product with ones (numpy's column sum of a narrow
        matrix is several times slower)."""
        ones = ws("ones", (len(dy2),), dy2.dtype)
        ones.fill(1)
        xp.matmul(ones, dy2, out=out)

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        x, cols, flat = saved.pop("x"), saved.pop("cols"), saved.pop("flat")
        by_offset, block = saved.pop("by_offset"), saved.pop("block")
        n, cout = len(dy), self.out_channels
        if self._shards is not None:
            return self._backward_shards(x, dy, cols, flat, saved.get("shard", 0), need_dx, ws)
        dy2 = dy.reshape(-1, cout)  # (n * Ho * Wo, Cout)
        # (n * Ho * Wo, KH * KW * C), a transposed view of the (KH * KW, n * Ho * Wo) columns by offset;
        # blocked: (n * Ho * Wo / b, KH * span * C)
        # (not -1 in the reshape: 0 rows are allowed)
        cols2 = cols.T if by_offset else cols.reshape(math.prod(cols.shape[:3]), math.prod(cols.shape[3:]))
        if "defer" in saved:  # (first row, step rows, stack scope): weight gradients come later
            first, rows, stack = saved["defer"]
            self._deferred_shape, self._cols_built = x.shape[1:], False
            stack("x", (rows, *x.shape[1:]), x.dtype)[first : first + n] = x
            stack("dy", (rows, *dy.shape[1:]), dy.dtype)[first : first + n] = dy
        elif accumulate:
            if self._dW_part is None:  # once per run: micro-batches after the first add into dW
                self._dW_part = xp.empty_like(self.dW)
                self._db_part = xp.empty_like(self.db) if self.bias else None
            self._weight_grad(cols2, dy2, block, self._dW_part)
            self.dW += self._dW_part
            if self.bias:
                self._bias_grad(dy2, self._db_part, ws)
                self.db += self._db_part
        else:
            self._weight_grad(cols2, dy2, block, self.dW)
            if self.bias:
                self._bias_grad(dy2, self.db, ws)
        if not need_dx:
            return None
        dx = ws("dx", x.shape, dy.dtype)
        if block:  # dy @ T.T: the blocked fields' gradient, into the columns (dead now)
            dcols = flat[: cols.size].reshape(cols.shape)
            xp.matmul(
                dy.reshape(-1, block * cout),
                self._T.reshape(-1, block * cout).T,
                out=dcols.reshape(-1, cols.shape[3] * cols.shape[4]),
            )
            dpad = self._pad_ws(ws, "dxpad", n, x.shape[1:], self._p, dy.dtype)
            self._blocked_col2im(dcols, dx, dpad, block)
            return dx
        if by_offset:
            xp.matmul(self.W, dy2.T, out=cols)  # (KH * KW, n * Ho * Wo), over the columns
            self._offset_col2im(cols.reshape(self.fan_in, *dy.shape[:3]), dx)
            return dx
        transposed = self._transposed()
        dypad = self._pad_ws(ws, "dypad", n, dy.shape[1:], self._q(), dy.dtype) if transposed else None
        self._input_grad(dy, dx, flat, dypad, self._flipped() if transposed else None)
        return dx

    def _weight_grad(self, cols2, dy2, block: int, out) -> None:
        """``out = cols2.T @ dy2``, the ``W`` gradient (``dy2``: ``(n * Ho * Wo, Cout)``); blocked,
        the blocked kernel's gradient from the same product, folded into ``out``."""
        if not block:
            xp.matmul(cols2.T, dy2, out=out)
            return
        cout = self.out_channels
        xp.matmul(cols2.T, dy2.reshape(-1, block * cout), out=self._dT.reshape(-1, block * cout))
        self._fold(self._dT, out)

    def _q(self) -> tuple[int, int]:
        return self._k[0] - 1 - self._p[0], self._k[1] - 1 - self._p[1]

    def _stacked(self, stack, rows):
        """The step's columns (built from the stacked inputs once per step) and output gradients."""
        dt, shape = self.dW.dtype, self._deferred_shape
        ho, wo, cout = self.out_shape(shape)
        dy = stack("dy", (rows, ho, wo, cout), dt)
        cols = stack("cols", (rows, ho, wo, self._k[0], self._k[1] * self.in_channels), dt)
        if not self._cols_built:
            x = stack("x", (rows, *shape), dt)
            self._fields(x, self._pad_ws(stack, "pad", rows, shape, self._p, dt), cols)
            self._cols_built = True
        return cols, dy

    def weight_grads(self, stack, rows, factors=None):
        if self._deferred_shape is None:  # no deferred backward ran (no rows this step)
            return
        cols, dy = self._stacked(stack, rows)
        self._cols_built = False  # the next step's are other rows
        if factors is not None:
            dy *= factors[:, None, None, None]
        cout = self.out_channels
        dy2 = dy.reshape(-1, cout)
        xp.matmul(cols.reshape(-1, self.fan_in).T, dy2, out=self.dW)  # one product over the step's rows
        if self.bias:
            self._bias_grad(dy2, self.db, stack)

    def example_sq_norms(self, stack, rows):
        if self._deferred_shape is None:
            return [np.zeros(rows) for _ in self.param_specs()]
        cols, dy = self._stacked(stack, rows)
        positions, k, n = dy.shape[1] * dy.shape[2], self.fan_in, self.out_channels
        c3, d3 = cols.reshape(rows, positions, k), dy.reshape(rows, positions, n)
        ghost = ghost_conv_cheaper(positions, k, n)
        # examples at a time: each one's (P, P) Gram matrices or (K, N) gradient, a few MiB in all
        chunk = max(1, _CACHE_VALUES // (2 * positions * positions if ghost else k * n))
        w_sq = np.empty(rows)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            a, d = c3[part], d3[part]
            if ghost:  # ||sum_p a_p d_p^T||^2 = sum_{p,q} (a_p . a_q)(d_p . d_q)
                gram_a = xp.matmul(a, a.transpose(0, 2, 1))
                gram_d = xp.matmul(d, d.transpose(0, 2, 1))
                w_sq[part] = np.einsum("ipq,ipq->i", gram_a, gram_d, dtype=np.float64)
            else:
                w_sq[part] = rows_sq_norm(xp.matmul(a.transpose(0, 2, 1), d))
        return [w_sq, rows_sq_norm(d3.sum(axis=1))] if self.bias else [w_sq]

    def shard(self, sharding, grads):
        self._shards, self._shard_grads = sharding, grads

    def _backward_shards(self, x, dy, cols, flat, first: int, need_dx: bool, ws):
        """Each shard's weight gradients into its own row of the per-shard buffers (``first``: the
        local index of the input's first shard), and the input gradient shard by shard."""
        n, sh, cout = len(dy), self._shards, self.out_channels
        dW, db = self._shard_grads["W"], self._shard_grads.get("b")
        dx = ws("dx", x.shape, dy.dtype) if need_dx else None
        transposed = need_dx and self._transposed()
        dypad = self._pad_ws(ws, "dypad", n, dy.shape[1:], self._q(), dy.dtype) if transposed else None
        Wt = self._flipped() if transposed else None
        ones = ws("ones", (len(dy) * dy.shape[1] * dy.shape[2],), dy.dtype)
        ones.fill(1)
        width = len(flat) // max(n, 1)  # (a replica may hold no rows of a batch)

        def weights(k):
            r = sh.rows_of(k, n)
            dy2, cols2 = dy[r].reshape(-1, cout), cols[r].reshape(-1, self.fan_in)
            xp.matmul(cols2.T, dy2, out=dW[first + k].reshape(self.fan_in, cout))
            if db is not None:
                xp.matmul(ones[: len(dy2)], dy2, out=db[first + k])

        def inputs(k):  # after every shard's weights: its scratch may cover other shards' columns
            r = sh.rows_of(k, n)
            part = flat[r.start * width : r.stop * width]
            self._input_grad(dy[r], dx[r], part, None if dypad is None else dypad[r], Wt)

        sh.workers.run(weights, sh.blocks(n))
        if need_dx:
            sh.workers.run(inputs, sh.blocks(n))
        return dx

    def __repr__(self):
        extra = "".join(
            f", {name}={value}"
            for name, value, default in (("stride", self.stride, 1), ("padding", self.padding, 0))
            if pair(value) != pair(default)
        )
        return f"Conv2D({self.in_channels}, {self.out_channels}, {self.kernel}{extra})"


_BLOCK = 4  # output pixels per blocked field at most (``Conv2D._blocked``)
_SHORT_ROW = 32  # field rows of fewer values are blocked (``Conv2D._block``)
_CACHE_VALUES = 1 << 19  # input-gradient values col2im adds into at a time (2 MiB in float32)


def _padded(x, pad, padding):
    """``x`` (n, H, W, C) with ``padding`` zeros around each image, in ``pad`` (``None``: no padding,
    ``x`` itself)."""
    if pad is None:
        return x
    (ph, pw), h, w = padding, x.shape[1], x.shape[2]
    pad[:, :ph], pad[:, ph + h :], pad[:, ph : ph + h, :pw], pad[:, ph : ph + h, pw + w :] = 0, 0, 0, 0
    pad[:, ph : ph + h, pw : pw + w] = x
    return pad


def _fields(x, pad, padding, kernel, stride, cols) -> None:
    """im2col: the receptive fields of ``x`` (n, H, W, C) into ``cols`` (n, Ho, Wo, KH, KW * C), one
    strided copy (a field's rows are runs of ``KW * C`` contiguous values of the padded image).
    ``pad``: an array of the padded image's shape (its border is zeroed here), ``None`` when
    ``padding`` is zero."""
    x = _padded(x, pad, padding)
    if not x.flags.c_contiguous:  # a field's runs must be contiguous
        x = xp.ascontiguousarray(x)
    n, ho, wo, kh, row = cols.shape
    s0, s1, s2, s3 = x.strides
    fields = xp.lib.stride_tricks.as_strided(
        x, (n, ho, wo, kh, row), (s0, stride[0] * s1, stride[1] * s2, s1, s3), writeable=False
    )
    xp.copyto(cols, fields)


class _Pool2D(Layer):
    """Pooling over ``kernel`` windows every ``stride`` pixels (default: ``kernel``, windows side by
    side), each channel on its own; no padding: rows and columns no window reaches are left out."""

    def __init__(self, kernel, stride=None):
        self.kernel, self.stride = _spec_value(kernel), _spec_value(stride)
        self._k = pair(kernel)
        self._s = self._k if stride is None else pair(stride)
        if min(self._k) < 1 or min(self._s) < 1:
            raise ValueError(
                f"{type(self).__name__}(kernel={kernel}, stride={stride}): sizes must be positive"
            )

    def out_shape(self, in_shape):
        h, w, c = _image(in_shape, repr(self))
        ho, wo = _out_size(h, self._k[0], self._s[0], 0), _out_size(w, self._k[1], self._s[1], 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} on {h}x{w} images leaves no output pixel")
        return ho, wo, c

    def flops(self, in_shape):
        ho, wo, c = self.out_shape(in_shape)
        return 3.0 * ho * wo * c * self._k[0] * self._k[1]

    def workspace_width(self, in_shape):
        return 0

    def _windows(self, a, ho: int, wo: int):
        """``(offset, view)`` for each window offset: the ``(n, ho, wo, C)`` strided view of ``a``
        holding that offset's element of every window."""
        (kh_, kw_), (sh, sw) = self._k, self._s
        for kh in range(kh_):
            for kw in range(kw_):
                yield kh * kw_ + kw, a[:, kh : kh + (ho - 1) * sh + 1 : sh, kw : kw + (wo - 1) * sw + 1 : sw]

    def _tiles(self, in_shape) -> bool:
        """Whether the windows cover every input pixel exactly once (backward then writes, no adds)."""
        h, w, _ = in_shape
        (kh, kw), (sh, sw) = self._k, self._s
        return (kh, kw) == (sh, sw) and h % kh == 0 and w % kw == 0

    def __repr__(self):
        stride = "" if self.stride is None else f", stride={self.stride}"
        return f"{type(self).__name__}({self.kernel}{stride})"


class MaxPool2D(_Pool2D):
    """The largest value of each window; the gradient goes to the window's first largest value
    (in row-major order of the window).

    Windows that tile the image (stride = kernel, sizes divisible) take the maximum in two passes:
    along each row of a window (views whose innermost runs are ``C`` values), then down the rows
    (runs of ``Wo * C`` contiguous values): fewer operations on short runs than one pass per
    window offset, and backward routes the gradient through the same two steps, which picks the
    same first maximum (the first row holding the window's maximum, then its first column there).
    """

    def forward(self, x, saved, ws=FRESH):
        n, h, w, c = x.shape
        ho, wo, _ = self.out_shape(x.shape[1:])
        y = ws("y", (n, ho, wo, c), x.dtype)
        if self._tiles(x.shape[1:]):
            (kh, kw), rows = self._k, x
            if kw > 1:  # the maximum along each window row: (n, H, Wo, C)
                rows = ws("rows", (n, h, wo, c), x.dtype)
                _maximum(_offsets(x.reshape(n, h, wo, kw, c), 3), rows)
            _maximum(_offsets(rows.reshape(n, ho, kh, wo * c), 2), y.reshape(n, ho, wo * c))
            if saved is not None:
                saved["x"], saved["rows"], saved["y"] = x, rows, y
            return y
        _maximum([v for _, v in self._windows(x, ho, wo)], y)
        if saved is not None:
            saved["x"], saved["y"] = x, y
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        # Where each window's first maximum is, found again from the input and the output: cheaper
        # than tracking it in forward (masked copies are slow), and no state kept between the two.
        x, y = saved.pop("x"), saved.pop("y")
        n, h, w, c = x.shape
        ho, wo = dy.shape[1:3]
        dx = ws("dx", x.shape, dy.dtype)
        if "rows" in saved:
            rows, (kh, kw) = saved.pop("rows"), self._k
            drows = ws("drows", rows.shape, dy.dtype) if kw > 1 else dx
            shape = (n, ho, wo * c)
            _route(
                _offsets(rows.reshape(n, ho, kh, wo * c), 2),
                y.reshape(shape),
                dy.reshape(shape),
                _offsets(drows.reshape(n, ho, kh, wo * c), 2),
                ws,
                "down",
            )
            if kw > 1:
                _route(
                    _offsets(x.reshape(n, h, wo, kw, c), 3),
                    rows,
                    drows,
                    _offsets(dx.reshape(n, h, wo, kw, c), 3),
                    ws,
                    "along",
                )
            return dx
        dx[...] = 0  # windows overlap (added) or leave pixels out (zero)
        _route(
            [v for _, v in self._windows(x, ho, wo)],
            y,
            dy,
            [d for _, d in self._windows(dx, ho, wo)],
            ws,
            "windows",
            add=True,
        )
        return dx

    def workspace_width(self, in_shape):
        ho, wo, c = self.out_shape(in_shape)
        h = in_shape[0]
        return 2 * h * wo * c + 2 * ho * wo * c  # row maxima and their gradient, two masks (bytes)


def _offsets(a, axis: int) -> list:
    """The views of ``a`` at each index of ``axis`` (one window offset each)."""
    return [a[(slice(None),) * axis + (i,)] for i in range(a.shape[axis])]


def _maximum(values, out) -> None:
    xp.copyto(out, values[0])
    for v in values[1:]:
        xp.maximum(out, v, out=out)


def _route(values, best, grad, outs, ws, name: str, add: bool = False) -> None:
    """``grad`` into ``outs[p]`` where ``values[p]`` is the first of ``values`` to equal ``best`` (their
    maximum), zeros elsewhere (added to ``outs`` with ``add``: overlapping windows)."""
    if len(values) == 1:
        xp.copyto(outs[0], grad) if not add else xp.add(outs[0], grad, out=outs[0])
        return
    found, mask = ws(name + "-found", best.shape, bool), ws(name + "-mask", best.shape, bool)
    part = ws(name + "-part", grad.shape, grad.dtype) if add else None
    last = len(values) - 1
    for p, (v, d) in enumerate(zip(values, outs, strict=True)):
        if p == 0:
            m = xp.equal(v, best, out=found)
        elif p == last:  # the maximum is here when at no earlier offset
            m = xp.logical_not(found, out=mask)
        else:
            m = xp.equal(v, best, out=mask)
            xp.greater(m, found, out=m)  # a maximum, and none at an earlier offset
            xp.logical_or(found, m, out=found)
        if add:
            d += xp.multiply(grad, m, out=part)
        else:
            xp.multiply(grad, m, out=d)


class AvgPool2D(_Pool2D):
    """The mean of each window."""

    def forward(self, x, saved, ws=FRESH):
        n = len(x)
        ho, wo, c = self.out_shape(x.shape[1:])
        y = ws("y", (n, ho, wo, c), x.dtype)
        windows = self._windows(x, ho, wo)
        xp.copyto(y, next(windows)[1])
        for _, v in windows:
            y += v
        y *= 1.0 / (self._k[0] * self._k[1])
        if saved is not None:
            saved["shape"] = x.shape
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        shape = saved.pop("shape")
        dx = ws("dx", shape, dy.dtype)
        tiles = self._tiles(shape[1:])
        scale = 1.0 / (self._k[0] * self._k[1])
        if tiles:
            for _, v in self._windows(dx, *dy.shape[1:3]):
                xp.multiply(dy, scale, out=v)
            return dx
        dx[...] = 0
        part = xp.multiply(dy, scale, out=ws("part", dy.shape, dy.dtype))
        for _, v in self._windows(dx, *dy.shape[1:3]):
            v += part
        return dx


class GlobalAvgPool(Layer):
    """The mean of each channel over the image: ``(H, W, C) -> (C,)``."""

    def forward(self, x, saved, ws=FRESH):
        n, h, w, c = x.shape
        y = xp.sum(x.reshape(n, h * w, c), axis=1, out=ws("y", (n, c), x.dtype))
        y *= 1.0 / (h * w)
        if saved is not None:
            saved["shape"] = x.shape
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        shape = saved.pop("shape")
        dx = ws("dx", shape, dy.dtype)
        xp.multiply(dy[:, None, None, :], 1.0 / (shape[1] * shape[2]), out=dx)
        return dx

    def out_shape(self, in_shape):
        return (_image(in_shape, repr(self))[2],)

    def flops(self, in_shape):
        return 2.0 * math.prod(in_shape)

    def workspace_width(self, in_shape):
        return 0


class Flatten(Layer):
    """Image rows as flat rows: ``(H, W, C) -> (H * W * C,)``, a view (no copy)."""

    def forward(self, x, saved, ws=FRESH):
        if saved is not None:
            saved["shape"] = x.shape
        return x.reshape(len(x), math.prod(x.shape[1:]))  # (not -1: a replica may have 0 rows)

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        return dy.reshape(saved.pop("shape"))

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def flops(self, in_shape):
        return 0.0

    def workspace_width(self, in_shape):
        return 0
