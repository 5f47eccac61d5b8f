"""Convolution and pooling layers on image rows ``(H, W, C)``: arrays ``(batch, H, W, C)``, channels last.

``Conv2D`` is im2col plus one matrix product: every output pixel's receptive field is copied into
a row of a workspace array ``cols`` ``(batch * Ho * Wo, KH * KW * C)`` (the ``(kh, kw, c)`` order of
the weight's rows), and ``cols @ W`` is the output ``(batch, Ho, Wo, Cout)`` directly, with no
transposition: in NHWC a pixel's channels are contiguous, so the copies move whole channel vectors
and the product's result is already in the layout the next layer reads. Backward forms the weight
gradient as ``cols.T @ dy`` (one product over all pixels of the micro-batch) and the input gradient
as ``dy @ W.T`` into the same ``cols`` array (dead once the weight gradient is formed), which
col2im then adds back onto the input pixels, one kernel offset ``(kh, kw)`` at a time. Padding is
never materialised: each offset copies (and adds back) only the output pixels whose input pixel is
inside the image, and the padded pixels' columns are zeros.

Pooling works on the ``KH * KW`` strided views of the input that one window offset picks out of
every window: a handful of whole-array operations, no index arrays. ``MaxPool2D`` keeps, per
output value, the offset of its window's first maximum (one byte), and backward routes the whole
gradient there.
"""

import math

from hpcnn.core.backend import xp
from hpcnn.core.layers import Layer
from hpcnn.core.params import ParamSpec
from hpcnn.core.workspace import FRESH


def pair(value) -> tuple[int, int]:
    """``(h, w)`` from an int (both) or an ``[h, w]`` pair."""
    if isinstance(value, (int, xp.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


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

    def __init__(self, in_channels: int, out_channels: int, kernel, stride=1, padding=0, bias: bool = True,
                 init: str = "he"):  # fmt: skip
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel, self.stride, self.padding, self.bias, self.init = kernel, stride, padding, bias, init
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

    def param_specs(self):
        kh, kw = self._k
        specs = [ParamSpec("W", (kh, kw, self.in_channels, self.out_channels), self.init, self.fan_in,
                           kh * kw * self.out_channels)]  # fmt: skip
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
            raise ValueError(f"{self!r} takes {self.in_channels} channels, not {c} (rows of shape {in_shape})")
        ho, wo = (_out_size(n, k, s, p) for n, k, s, p in zip((h, w), self._k, self._s, self._p, strict=True))
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} on {h}x{w} images leaves no output pixel (kernel larger than the "
                             "padded image)")  # fmt: skip
        return ho, wo, self.out_channels

    def flops(self, in_shape):
        ho, wo, _ = self.out_shape(in_shape)
        return 3 * 2.0 * ho * wo * self.fan_in * self.out_channels  # y = cols W, dW = cols.T dy, dcols = dy W.T

    def workspace_width(self, in_shape):
        ho, wo, _ = self.out_shape(in_shape)
        return ho * wo * self.fan_in  # cols (and, in backward, dcols in the same array)

    def deferred_width(self, in_shape):
        ho, wo, c = self.out_shape(in_shape)
        # the input and output-gradient rows, and the columns weight_grads rebuilds from them
        return math.prod(in_shape) + ho * wo * c + ho * wo * self.fan_in

    # -- im2col / col2im ----------------------------------------------------------------------------

    def _im2col(self, x, cols) -> None:
        """Receptive fields of ``x`` (n, H, W, C) into ``cols`` (n, Ho, Wo, KH, KW, C); zeros where
        a field overlaps the padding."""
        (kh_, kw_), (sh, sw), (ph, pw) = self._k, self._s, self._p
        _, h, w, _ = x.shape
        _, ho, wo = cols.shape[:3]
        for kh in range(kh_):
            i0, i1, hs = _valid(h, ho, kh, sh, ph)
            for kw in range(kw_):
                j0, j1, ws = _valid(w, wo, kw, sw, pw)
                dst = cols[:, :, :, kh, kw, :]
                if i0 > 0 or i1 < ho or j0 > 0 or j1 < wo:  # the padding's columns
                    dst[:, :i0] = 0
                    dst[:, i1:] = 0
                    dst[:, i0:i1, :j0] = 0
                    dst[:, i0:i1, j1:] = 0
                if i1 > i0 and j1 > j0:
                    dst[:, i0:i1, j0:j1] = x[:, hs : hs + (i1 - i0 - 1) * sh + 1 : sh,
                                             ws : ws + (j1 - j0 - 1) * sw + 1 : sw]  # fmt: skip

    def _col2im(self, dcols, dx) -> None:
        """Add each column of ``dcols`` (n, Ho, Wo, KH, KW, C) back onto its input pixel in ``dx``
        (n, H, W, C), which this fills."""
        (kh_, kw_), (sh, sw), (ph, pw) = self._k, self._s, self._p
        _, h, w, _ = dx.shape
        _, ho, wo = dcols.shape[:3]
        dx[...] = 0
        for kh in range(kh_):
            i0, i1, hs = _valid(h, ho, kh, sh, ph)
            for kw in range(kw_):
                j0, j1, ws = _valid(w, wo, kw, sw, pw)
                if i1 > i0 and j1 > j0:
                    dx[:, hs : hs + (i1 - i0 - 1) * sh + 1 : sh, ws : ws + (j1 - j0 - 1) * sw + 1 : sw] += (
                        dcols[:, i0:i1, j0:j1, kh, kw]
                    )

    # -- forward / backward -------------------------------------------------------------------------

    def forward(self, x, saved, ws=FRESH):
        n = len(x)
        ho, wo, cout = self.out_shape(x.shape[1:])
        (kh, kw), c = self._k, self.in_channels
        cols = ws("cols", (n, ho, wo, kh, kw, c), x.dtype)
        y = ws("y", (n, ho, wo, cout), x.dtype)
        if self._shards is None:
            self._im2col(x, cols)
            xp.matmul(cols.reshape(-1, self.fan_in), self.W, out=y.reshape(-1, cout))
        else:
            sh = self._shards

            def one(k):
                r = sh.rows_of(k, n)
                self._im2col(x[r], cols[r])
                xp.matmul(cols[r].reshape(-1, self.fan_in), self.W, out=y[r].reshape(-1, cout))

            sh.workers.run(one, sh.blocks(n))
        if self.bias:
            y += self.b
        if saved is not None:
            saved["x"], saved["cols"] = x, cols
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        x, cols = saved.pop("x"), saved.pop("cols")
        n, cout = len(dy), self.out_channels
        dy2 = dy.reshape(-1, cout)  # (n * Ho * Wo, Cout)
        cols2 = cols.reshape(-1, self.fan_in)  # (n * Ho * Wo, KH * KW * C)
        if self._shards is not None:
            return self._backward_shards(x, dy, cols, saved.get("shard", 0), need_dx, ws)
        if "defer" in saved:  # (first row, step rows, stack scope): weight gradients come later
            first, rows, stack = saved["defer"]
            self._deferred_shape = x.shape[1:]
            stack("x", (rows, *x.shape[1:]), x.dtype)[first : first + n] = x
            stack("dy", (rows, *dy.shape[1:]), dy.dtype)[first : first + n] = dy
        elif accumulate:
            if self._dW_part is None:  # once per run: micro-batches after the first add into dW
                self._dW_part = xp.empty_like(self.dW)
                self._db_part = xp.empty_like(self.db) if self.bias else None
            xp.matmul(cols2.T, dy2, out=self._dW_part)
            self.dW += self._dW_part
            if self.bias:
                xp.sum(dy2, axis=0, out=self._db_part)
                self.db += self._db_part
        else:
            xp.matmul(cols2.T, dy2, out=self.dW)
            if self.bias:
                xp.sum(dy2, axis=0, out=self.db)
        if not need_dx:
            return None
        xp.matmul(dy2, self.W.T, out=cols2)  # dcols, over cols: the weight gradient is formed
        dx = ws("dx", x.shape, dy.dtype)
        self._col2im(cols, dx)
        return dx

    def weight_grads(self, stack, rows):
        if self._deferred_shape is None:  # no deferred backward ran (no rows this step)
            return
        dt, shape = self.dW.dtype, self._deferred_shape
        ho, wo, cout = self.out_shape(shape)
        x, dy = stack("x", (rows, *shape), dt), stack("dy", (rows, ho, wo, cout), dt)
        cols = stack("cols", (rows, ho, wo, *self._k, self.in_channels), dt)
        self._im2col(x, cols)
        dy2 = dy.reshape(-1, cout)
        xp.matmul(cols.reshape(-1, self.fan_in).T, dy2, out=self.dW)  # one product over the step's rows
        if self.bias:
            xp.sum(dy2, axis=0, out=self.db)

    def shard(self, sharding, grads):
        self._shards, self._shard_grads = sharding, grads

    def _backward_shards(self, x, dy, cols, first: int, need_dx: bool, ws):
        """Each shard's weight gradients into its own row of the per-shard buffers (``first``: the
        local index of the input's first shard), and the input gradient shard by shard."""
        n, sh, cout = len(dy), self._shards, self.out_channels
        dW, db = self._shard_grads["W"], self._shard_grads.get("b")
        dx = ws("dx", x.shape, dy.dtype) if need_dx else None

        def one(k):
            r = sh.rows_of(k, n)
            dy2, cols2 = dy[r].reshape(-1, cout), cols[r].reshape(-1, self.fan_in)
            xp.matmul(cols2.T, dy2, out=dW[first + k].reshape(self.fan_in, cout))
            if db is not None:
                xp.sum(dy2, axis=0, out=db[first + k])
            if need_dx:
                xp.matmul(dy2, self.W.T, out=cols2)
                self._col2im(cols[r], dx[r])

        sh.workers.run(one, sh.blocks(n))
        return dx

    def __repr__(self):
        extra = "".join(
            f", {name}={value}"
            for name, value, default in (("stride", self.stride, 1), ("padding", self.padding, 0))
            if pair(value) != pair(default)
        )
        return f"Conv2D({self.in_channels}, {self.out_channels}, {self.kernel}{extra})"


class _Pool2D(Layer):
    """Pooling over ``kernel`` windows every ``stride`` pixels (default: ``kernel``, windows side by
    side), each channel on its own; no padding: rows and columns no window reaches are left out."""

    def __init__(self, kernel, stride=None):
        self.kernel, self.stride = kernel, stride
        self._k = pair(kernel)
        self._s = self._k if stride is None else pair(stride)
        if min(self._k) < 1 or min(self._s) < 1:
            raise ValueError(f"{type(self).__name__}(kernel={kernel}, stride={stride}): sizes must be positive")

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
    """The largest value of each window; the gradient goes to the window's first largest value."""

    def forward(self, x, saved, ws=FRESH):
        n = len(x)
        ho, wo, c = self.out_shape(x.shape[1:])
        y = ws("y", (n, ho, wo, c), x.dtype)
        windows = self._windows(x, ho, wo)
        xp.copyto(y, next(windows)[1])
        if saved is None:
            for _, v in windows:
                xp.maximum(y, v, out=y)
            return y
        arg = ws("arg", y.shape, xp.uint8)  # which offset holds the window's (first) maximum
        arg[...] = 0
        larger = ws("larger", y.shape, bool)
        for p, v in windows:
            xp.greater(v, y, out=larger)  # strictly: a tie keeps the earlier offset
            xp.copyto(y, v, where=larger)
            xp.copyto(arg, p, where=larger)
        saved["shape"], saved["arg"] = x.shape, arg
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        shape, arg = saved.pop("shape"), saved.pop("arg")
        dx = ws("dx", shape, dy.dtype)
        tiles = self._tiles(shape[1:])
        if not tiles:
            dx[...] = 0
        mask = ws("mask", dy.shape, bool)
        part = None if tiles else ws("part", dy.shape, dy.dtype)
        for p, v in self._windows(dx, *dy.shape[1:3]):
            xp.equal(arg, p, out=mask)
            if tiles:
                xp.multiply(dy, mask, out=v)
            else:
                v += xp.multiply(dy, mask, out=part)
        return dx

    def workspace_width(self, in_shape):
        ho, wo, c = self.out_shape(in_shape)
        return 2 * ho * wo * c  # offsets and masks (bytes, counted as values: an upper bound)


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
        return x.reshape(len(x), -1)

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        return dy.reshape(saved.pop("shape"))

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def flops(self, in_shape):
        return 0.0

    def workspace_width(self, in_shape):
        return 0
