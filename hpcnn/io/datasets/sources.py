"""Where rows come from: row sources (an HDF5 file's datasets, arrays in memory) and the splits
and datasets made of them.

**Each rank reads only the rows it needs**: the sampler hands every rank the row ids of its slice
of each global batch, and ``H5Source.read`` asks HDF5 for exactly those rows (a hyperslab for a
contiguous run, a sorted point list otherwise). A read HDF5 refuses (a corrupt compressed chunk, a
truncated file) is an ``UnreadableRows`` naming the file, the dataset and the rows (``read_rows``).
NaN/Inf values are found where rows are read (training steps, evaluation): ``first_nonfinite`` and
``describe_nonfinite`` name the row and the value.
"""

import math
from dataclasses import dataclass

import numpy as np

from hpcnn.errors import UserError

# One value per class in the output layer, in every batch's outputs and gradients: a label of 2**40
# or a num_classes typo would otherwise ask for terabytes. 65,536 is above any MLP classification
# task hpcnn is meant for (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 65536


class ArraySource:
    """Rows held in memory (built-in and synthetic data)."""

    def __init__(self, x, y, name: str):
        self.x, self.y, self.name = x, y, name
        self.path, self.x_key, self.y_key = name, "x", "y"  # what messages name
        self.rows, self.rows_read = len(x), 0

    def read(self, ids, inputs: bool = True, labels: bool = True, out=None):
        """Rows ``ids`` of the inputs and/or labels; with ``out`` (a workspace scope) into arrays
        reused from step to step rather than fresh copies."""
        self.rows_read += len(ids)
        return (self._take(self.x, ids, "x", out) if inputs else None), (
            self._take(self.y, ids, "y", out) if labels else None
        )

    @staticmethod
    def _take(a, ids, name, out):
        if out is None:
            return a[ids]
        # mode="clip": the default mode buffers the whole result before copying it to out (ids
        # come from the sampler and are always in range)
        return np.take(a, ids, axis=0, out=out(name, (len(ids), *a.shape[1:]), a.dtype), mode="clip")

    def close(self) -> None:
        pass


def image_shape(stored: tuple, layout: str) -> tuple | None:
    """hpcnn's shape of one input row, ``(H, W, C)``, for inputs stored with rows of shape
    ``stored``: ``(C, H, W)`` (``layout`` nchw) or ``(H, W, C)`` (nhwc), or ``(H, W)`` (one
    channel); ``None`` for flat rows ``(features,)``."""
    if len(stored) == 1:
        return None
    if len(stored) == 2:
        return (*stored, 1)
    assert len(stored) == 3 and layout in ("nchw", "nhwc"), (stored, layout)
    return (stored[1], stored[2], stored[0]) if layout == "nchw" else tuple(stored)


def as_rows(block, layout: str):
    """Inputs as stored (rows, ...) as hpcnn's flat rows (rows, features): an image's values in
    (H, W, C) order, channels last (a copy for ``nchw`` images, else a view where numpy can)."""
    if block.ndim == 4 and layout == "nchw":
        block = block.transpose(0, 2, 3, 1)  # (rows, H, W, C)
    return block.reshape(len(block), math.prod(block.shape[1:]))  # (not -1: 0 rows are allowed)


class H5Source:
    """Rows of two datasets in an HDF5 file, read on demand, one selection per call; inputs
    stored as images (3-D or 4-D, ``layout``) come out as flat rows in hpcnn's order (``as_rows``)."""

    def __init__(self, f, x_key: str, y_key: str, layout: str = "nchw"):
        self.file, self.x, self.y = f, f[x_key], f[y_key]
        self.name = f"{f.filename}:{x_key}/{y_key}"
        self.path, self.x_key, self.y_key = f.filename, x_key, y_key
        self.rows, self.rows_read = self.x.shape[0], 0
        self.layout = layout

    def read(self, ids, inputs: bool = True, labels: bool = True, out=None):
        """Rows ``ids`` (any order, no repeats) of the inputs and/or labels, in that order.

        A pipeline's first stage asks for inputs only, its last stage for labels only. Each read
        returns new arrays (h5py's); ``out`` is accepted for the in-memory sources' interface.
        """
        self.rows_read += len(ids)
        x = None
        if inputs:
            x = self._rows(self.x, ids)
            x = as_rows(x, self.layout) if x.ndim > 2 else x
        return x, (self._rows(self.y, ids) if labels else None)

    @staticmethod
    def _rows(dset, ids):
        if len(ids) == 0:
            return np.empty((0,) + dset.shape[1:], dset.dtype)
        order = np.argsort(ids, kind="stable")
        ids_sorted = ids[order]
        lo, hi = int(ids_sorted[0]), int(ids_sorted[-1]) + 1
        # A contiguous run is one hyperslab; otherwise h5py wants increasing point lists.
        rows = read_rows(dset, slice(lo, hi) if hi - lo == len(ids) else ids_sorted, lo, hi)
        if np.all(order[1:] > order[:-1]):
            return rows
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return rows[inverse]

    def close(self) -> None:
        self.file.close()  # h5py: closing a closed file is a no-op, so shared files are fine


class UnreadableRows(UserError):
    """Rows HDF5 cannot read; ``row`` is the first of them."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


def read_rows(dset, selection, lo: int, hi: int):
    """``dset[selection]``, rows within ``lo..hi-1``; a read HDF5 refuses (a corrupt compressed
    chunk, a truncated file) is an ``UnreadableRows`` naming the file, the dataset and the rows."""
    try:
        return dset[selection]
    except OSError as exc:
        first, last = _unreadable(dset, lo, hi)
        raise UnreadableRows(
            f"{dset.file.filename}: rows {first}-{last} of dataset {dset.name!r} cannot be read "
            f"({exc}): the file is damaged or truncated; write it again",
            first,
        ) from None


def _unreadable(dset, lo: int, hi: int) -> tuple[int, int]:
    """The first and last row of the first chunk (of rows) in ``lo..hi-1`` that HDF5 cannot read,
    or ``(lo, hi - 1)`` if it cannot be narrowed down (only on the error path: reads it again)."""
    step = dset.chunks[0] if dset.chunks else hi - lo
    for start in range(lo - lo % step, hi, step):
        a, b = max(start, lo), min(start + step, hi)
        try:
            dset[a:b]
        except OSError:
            return a, b - 1
    return lo, hi - 1


def first_nonfinite(a) -> int | None:
    """Index of the first row of ``a`` (rows, ...) holding NaN or Inf, or ``None``."""
    if a.size == 0:
        return None
    # min and max are NaN or infinite exactly when some value is, without a boolean temporary
    if math.isfinite(float(a.min())) and math.isfinite(float(a.max())):
        return None
    flat = a.reshape(len(a), math.prod(a.shape[1:]))
    return int(np.flatnonzero(~np.isfinite(flat).all(axis=1))[0])


def describe_nonfinite(key: str, row: int, stored, seen, what: str = "input") -> tuple[str, str]:
    """Why row ``row`` of dataset ``key`` holds NaN/Inf as cast for the model (``seen``, that row
    after the cast): ``(headline, detail)``. ``stored`` is the row as the file holds it (``(columns,)``
    or, for 1-D targets, a scalar), so that a value that is finite in the file but beyond the
    model's dtype is told apart from a NaN or Inf in the file (an image row as stored, ``(C, H, W)``
    say, and ``seen`` in the same order: the value is named by its index in the file).
    ``what``: ``input`` or ``target``."""
    seen, stored = np.asarray(seen), np.asarray(stored)
    col = int(np.flatnonzero(~np.isfinite(seen.reshape(-1)))[0])
    index = ", ".join(str(int(i)) for i in np.unravel_index(col, stored.shape)) if stored.ndim else ""
    where = f"{key!r}[{row}, {index}]" if stored.ndim > 0 else f"{key!r}[{row}]"
    value = stored.reshape(-1)[col]
    with np.errstate(over="ignore"):  # the overflow is what is looked for
        overflows = bool(np.isfinite(value)) and not np.isfinite(value.astype(seen.dtype))
    if overflows:
        name = seen.dtype.name
        return (
            f"has {'an' if what == 'input' else 'a'} {what} value beyond the range of {name}",
            f"{where} = {value:.6g} ({name} reaches {np.finfo(seen.dtype).max:.4g}); rescale the "
            f"{what}s{' or train with --dtype float64' if name != 'float64' else ''}",
        )
    return f"has a non-finite {what} value (NaN or Inf)", f"{where} = {seen.reshape(-1)[col]}"


@dataclass
class Split:
    """Rows ``ids`` of ``source``: a training set or a held-out set."""

    source: object
    ids: np.ndarray  # (rows,) row indices into source
    name: str = "training"  # or "held-out": what messages call these rows

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split | None  # None: no held-out rows; evaluation then reports the training rows
    features: int
    num_classes: int | None  # None: regression targets
    outputs: int
    unreadable: str | None = None  # why this rank's block of labels cannot be read (open_dataset)
    shape: tuple | None = None  # one input row as an image (H, W, C); None: flat rows of ``features``

    @property
    def in_shape(self) -> tuple:
        """The shape the model takes one input row in: ``(H, W, C)`` for images, else ``(features,)``."""
        return tuple(self.shape) if self.shape else (self.features,)

    def close(self) -> None:
        self.train.source.close()
        if self.test is not None:
            self.test.source.close()


def set_num_classes(ds: Dataset, num_classes: int, source: str = "the largest label + 1") -> None:
    """Set the class count (from ``source``: the file's attribute or the labels), checked."""
    if num_classes < 2:
        raise UserError(f"{ds.name}: labels must be 0..C-1 with C >= 2 classes, found C = {num_classes}")
    if num_classes > MAX_CLASSES:
        raise UserError(
            f"{ds.name}: {num_classes:,} classes ({source}) is more than hpcnn's limit of "
            f"{MAX_CLASSES:,}; labels must be class indices 0..C-1"
        )
    ds.num_classes = ds.outputs = num_classes
