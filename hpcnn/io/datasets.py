"""Datasets: HDF5 files read by rows, built-in datasets, and the per-rank sampler.

The HDF5 layout hpcnn reads (and ``python -m hpcnn.data`` writes):

- ``x``: float array (rows, features); ``y``: integer class labels (rows,), or floats
  (rows, outputs) for regression with ``--loss mse``;
- optional held-out pair ``x_test`` / ``y_test`` of the same kinds;
- optional attribute ``num_classes`` on the file (otherwise the labels' maximum + 1, found by the
  ranks together, each reading one block of labels), at most ``MAX_CLASSES``.

Anything else (a group or a dangling link where a dataset is expected, strings, booleans, complex
numbers, no features, a wrong ``num_classes``, a chunk HDF5 cannot read) is a ``UserError`` naming
the file, the dataset and what to change. NaN/Inf values are found where rows are read (training
steps, evaluation): ``first_nonfinite`` and ``describe_nonfinite`` name the row and the value.

Names are configurable (``--x-key`` and friends). **Each rank reads only the rows it needs**: the
sampler hands every rank the row ids of its slice of each global batch, and ``H5Source.read`` asks
HDF5 for exactly those rows (a hyperslab for a contiguous run, a sorted point list otherwise).

Sampling: each epoch's order is a permutation drawn from ``(seed, epoch)``, identical on every rank;
global batch ``b`` is rows ``[b*B, (b+1)*B)`` of it, split into ``size`` contiguous slices that
differ by at most one row. Every row is used exactly once per epoch across all ranks, without
padding; the last partial batch is kept unless ``drop_last``.
"""

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hpcnn.errors import UserError

BUILTIN = ("digits", "xor", "synthetic")
SPLIT_SEED = 0  # held-out split by fraction: fixed, so every seed of a sweep sees the same split
FORMAT_VERSION = 1
# One value per class in the output layer, in every batch's outputs and gradients: a label of 2**40
# or a num_classes typo would otherwise ask for terabytes. 65,536 is above any MLP classification
# task hpcnn is meant for (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 65536


def split_counts(n: int, parts: int, index: int) -> tuple[int, int]:
    """Start and length of slice ``index`` when ``n`` rows are cut into ``parts`` near-equal slices."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (index < extra)


def split_units(n: int, unit: int, parts: int, index: int) -> tuple[int, int]:
    """``split_counts`` in whole units of ``unit`` rows (only the last unit may be short): start and
    length, in rows, of slice ``index`` of ``n`` rows (``unit = 1`` is ``split_counts``)."""
    first, count = split_counts(-(-n // unit), parts, index)
    start = min(n, first * unit)
    return start, min(n, (first + count) * unit) - start


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


class H5Source:
    """Rows of two datasets in an HDF5 file, read on demand, one selection per call."""

    def __init__(self, f, x_key: str, y_key: str):
        self.file, self.x, self.y = f, f[x_key], f[y_key]
        self.name = f"{f.filename}:{x_key}/{y_key}"
        self.path, self.x_key, self.y_key = f.filename, x_key, y_key
        self.rows, self.rows_read = self.x.shape[0], 0

    def read(self, ids, inputs: bool = True, labels: bool = True, out=None):
        """Rows ``ids`` (any order, no repeats) of the inputs and/or labels, in that order.

        A pipeline's first stage asks for inputs only, its last stage for labels only. Each read
        returns new arrays (h5py's); ``out`` is accepted for the in-memory sources' interface.
        """
        self.rows_read += len(ids)
        return (self._rows(self.x, ids) if inputs else None), (self._rows(self.y, ids) if labels else None)

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
    flat = a.reshape(len(a), -1)
    return int(np.flatnonzero(~np.isfinite(flat).all(axis=1))[0])


def describe_nonfinite(key: str, row: int, stored, seen, what: str = "input") -> tuple[str, str]:
    """Why row ``row`` of dataset ``key`` holds NaN/Inf as cast for the model (``seen``, that row
    after the cast): ``(headline, detail)``. ``stored`` is the row as the file holds it (``(columns,)``
    or, for 1-D targets, a scalar), so that a value that is finite in the file but beyond the
    model's dtype is told apart from a NaN or Inf in the file. ``what``: ``input`` or ``target``."""
    seen, stored = np.asarray(seen), np.asarray(stored)
    col = int(np.flatnonzero(~np.isfinite(seen.reshape(-1)))[0])
    where = f"{key!r}[{row}, {col}]" if stored.ndim > 0 else f"{key!r}[{row}]"
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

    def close(self) -> None:
        self.train.source.close()
        if self.test is not None:
            self.test.source.close()


def xor_arrays():
    """The tutorial's four XOR points and their labels 0, 1, 1, 0."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)  # (4, 2)
    return x, np.array([0, 1, 1, 0], dtype=np.int64)


SYNTHETIC_BLOCK = 65536


def synthetic_blocks(rows: int, features: int, classes: int, seed: int, stream: int = 0):
    """Seeded Gaussian class clusters, ``x = centre[y] + noise``, as ``(start, x, y)`` blocks.

    Block ``b`` comes from its own generator ``(seed, stream, b)``, so a file written block by
    block (bounded memory) holds exactly the rows of the in-memory dataset. Stream 1 is held out.
    """
    # Centres ~ N(0, 4 / features): any two lie about 2.8 noise deviations apart whatever the width,
    # so the task stays learnable but not trivial at any feature count.
    centres = np.random.default_rng((seed, 2**31)).normal(0.0, 2.0 / np.sqrt(features), (classes, features))
    for b, start in enumerate(range(0, rows, SYNTHETIC_BLOCK)):
        n = min(SYNTHETIC_BLOCK, rows - start)
        rng = np.random.default_rng((seed, stream, b))
        y = rng.integers(0, classes, n)  # (n,)
        x = (centres[y] + rng.standard_normal((n, features))).astype(np.float32)  # (n, features)
        yield start, x, y


def synthetic_arrays(rows: int, features: int, classes: int, seed: int, stream: int = 0):
    """The whole synthetic dataset in memory (see ``synthetic_blocks``)."""
    x = np.empty((rows, features), np.float32)
    y = np.empty(rows, np.int64)
    for start, xb, yb in synthetic_blocks(rows, features, classes, seed, stream):
        x[start : start + len(xb)], y[start : start + len(yb)] = xb, yb
    return x, y


def open_h5(path, what: str = "data file"):
    """Open an HDF5 file read-only; a missing or unreadable file is a ``UserError`` naming ``what``."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; name an HDF5 file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path} cannot be read: permission denied")
    try:
        # Readers need no lock, and many parallel file systems refuse HDF5's flock ("unable to lock
        # file"): open without one where this h5py/HDF5 allows it.
        try:
            return h5py.File(path, "r", locking=False)
        except (TypeError, ValueError):  # h5py < 3.5 or HDF5 without the option
            return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{what} {path} is not a readable HDF5 file ({exc})") from None


def _dataset(f, key: str, required: bool):
    """The dataset ``key`` names in ``f``; ``None`` if nothing has that name and it is not
    ``required``. A group, a dangling link or another object there is a ``UserError``."""
    import h5py

    try:
        link = f.get(key, getlink=True)
    except Exception:  # noqa: BLE001  (h5py raises several kinds for names such as "." or "x/y")
        link = None
    if link is None and not required:
        return None
    where = f"{f.filename}: {key!r}"
    try:
        obj = f[key]
    except (KeyError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(link, h5py.SoftLink):
            raise UserError(f"{where} is a soft link to {link.path!r}, which does not exist") from None
        if isinstance(link, h5py.ExternalLink):
            raise UserError(
                f"{where} is an external link to {link.path!r} in {link.filename}, which cannot be "
                f"opened ({exc}); copy the data into the file or fix the link"
            ) from None
        raise UserError(
            f"{f.filename}: no dataset {key!r} (datasets in the file: {sorted(f.keys())}); "
            "set --x-key/--y-key (or --test-x-key/--test-y-key) to the names used"
        ) from None
    if isinstance(obj, h5py.Group):
        inside = sorted(obj.keys())
        held = f"it holds {inside[:8]}" if inside else "an empty group"
        hint = f" such as {key.rstrip('/')}/{inside[0]}" if inside else ""
        raise UserError(f"{where} is a group, not a dataset ({held}); name a dataset{hint}")
    if not isinstance(obj, h5py.Dataset):
        raise UserError(f"{where} is a {type(obj).__name__}, not a dataset")
    return obj


def _kind(d) -> str | None:
    """What is wrong with the element type of dataset ``d`` for hpcnn (``None``: a number)."""
    import h5py

    try:
        dtype = d.dtype
    except TypeError as exc:  # HDF5 types numpy has no equivalent for (bitfields, references, ...)
        return f"an HDF5 type numpy cannot read ({exc})"
    if h5py.check_string_dtype(dtype) is not None or dtype.kind in "SU":
        return "strings"
    if dtype.kind == "b":
        return "booleans (store them as integers 0/1)"
    if dtype.kind == "c":
        return "complex numbers (store the real and imaginary parts as two features)"
    if dtype.names:
        return f"records with fields {list(dtype.names)} (store each field as a column of one array)"
    if dtype.kind not in "iuf":
        return f"{dtype} values"
    return None


def _numbers(f, key: str, d, what: str) -> None:
    """Dataset ``d`` (``key`` of ``f``) must hold integers or floats (``what``: its role)."""
    kind = _kind(d)
    if kind is not None:
        raise UserError(f"{f.filename}: {key!r} holds {kind}; {what} must be integers or floats")


def _h5_pair(f, x_key: str, y_key: str, required: bool):
    x, y = _dataset(f, x_key, required), _dataset(f, y_key, required)
    if x is None and y is None:
        return None
    if x is None or y is None:  # one of a held-out pair: _dataset says which is missing
        _dataset(f, x_key if x is None else y_key, True)
    _numbers(f, x_key, x, "inputs")
    _numbers(f, y_key, y, "labels or targets")
    if x.shape is None or y.shape is None or x.ndim != 2 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise UserError(
            f"{f.filename}: {x_key!r} must be (rows, features) and {y_key!r} (rows,) or "
            f"(rows, outputs) with the same rows; got {x.shape} and {y.shape}"
        )
    if x.shape[1] == 0:
        raise UserError(f"{f.filename}: {x_key!r} has 0 features per row {x.shape}")
    if y.ndim == 2 and y.shape[1] == 0:
        raise UserError(f"{f.filename}: {y_key!r} has 0 outputs per row {y.shape}")
    return H5Source(f, x_key, y_key)


def input_dataset(f, key: str):
    """The dataset ``key`` of ``f``, checked to be ``(rows, features)`` numbers (inputs alone)."""
    d = _dataset(f, key, True)
    _numbers(f, key, d, "inputs")
    if d.shape is None or d.ndim != 2 or d.shape[1] == 0:
        raise UserError(f"{f.filename}: {key!r} must be (rows, features) with features > 0; got {d.shape}")
    return d


NO_LABELS = (2**62, -1)  # (min, max) of an empty block: neutral under MIN and MAX reductions


def _label_block(source: H5Source, rank: int, size: int) -> tuple[int, int]:
    """``(min, max)`` of this rank's contiguous block of labels."""
    start, count = split_counts(source.rows, size, rank)
    block = read_rows(source.y, slice(start, start + count), start, start + count)
    return (int(block.min()), int(block.max())) if count else NO_LABELS


def _num_classes_attribute(f) -> int:
    """The file's ``num_classes`` attribute as an integer; anything else is a ``UserError``."""
    try:
        value = np.asarray(f.attrs["num_classes"])
    except Exception as exc:  # noqa: BLE001  (an attribute of a type h5py cannot read)
        raise UserError(f"{f.filename}: attribute num_classes cannot be read ({exc})") from None
    item = value.reshape(()).item() if value.size == 1 else value.tolist()
    integral = isinstance(item, int) or (isinstance(item, float) and item.is_integer())
    if isinstance(item, bool) or not integral:
        raise UserError(f"{f.filename}: attribute num_classes = {item!r}: expected an integer")
    return int(item)


def open_dataset(cfg, rank: int, size: int) -> tuple[Dataset, tuple[int, int] | None]:
    """Open the dataset ``cfg.data`` names, reading no rows but one block of labels.

    For class labels in a file, also returns this rank's ``(min, max)`` over its blocks of the
    training and held-out labels (``None`` for built-in data and regression targets); the
    caller reduces these across ranks, checks them and calls ``set_num_classes``, so that a bad
    label is a clear error before training instead of an index error in the middle of it. A block
    HDF5 cannot read is left in ``Dataset.unreadable`` for the caller to report once for all ranks
    (only the ranks whose block it is find it). No collective operations happen here.
    """
    if cfg.data in ("xor", "synthetic") and cfg.test_fraction:
        raise UserError(f"--test-fraction applies to data files; the built-in {cfg.data} has a fixed split")
    if cfg.data == "xor":
        x, y = xor_arrays()
        src = ArraySource(x, y, "xor")
        # Under MSE, the textbook 2-H-1 network: one output unit whose target is the label itself
        # (a 2-class problem with one output, see losses); under cross-entropy, two logits.
        outputs = 1 if cfg.loss == "mse" else 2
        return Dataset("xor", Split(src, np.arange(4)), None, 2, 2, outputs), None
    if cfg.data == "synthetic":
        rows, feats, classes = cfg.synthetic_rows, cfg.synthetic_features, cfg.synthetic_classes
        seed = cfg.synthetic_seed
        if classes > MAX_CLASSES:
            raise UserError(f"synthetic_classes = {classes}: at most {MAX_CLASSES:,} classes")
        n_test = max(1, rows // 5)
        try:
            train = ArraySource(*synthetic_arrays(rows, feats, classes, seed, 0), "synthetic")
            test = ArraySource(*synthetic_arrays(n_test, feats, classes, seed, 1), "synthetic-test")
        except MemoryError:
            raise UserError(
                f"synthetic_rows x synthetic_features = {rows:,} x {feats:,} does not fit in memory; "
                "write it to a file instead (python -m hpcnn.data synthetic)"
            ) from None
        train_split = Split(train, np.arange(rows))
        test_split = Split(test, np.arange(n_test), "held-out")
        return Dataset("synthetic", train_split, test_split, feats, classes, classes), None
    if cfg.data == "digits":
        if cfg.test_fraction:
            raise UserError("--test-fraction applies to data files; the built-in digits has a fixed split")
        path = Path(str(resources.files("hpcnn") / "datasets" / "digits.h5"))
    else:
        path = Path(cfg.data)
        if path.suffix not in (".h5", ".hdf5", ".hdf") and not path.exists():
            raise UserError(
                f"--data {cfg.data!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                "nor an existing HDF5 file"
            )
    name = cfg.data if cfg.data in BUILTIN else str(path)
    f = open_h5(path)
    try:
        return _open_file(f, cfg, path, name, rank, size)
    except MemoryError as exc:  # e.g. a dataset that declares 10**12 rows
        f.close()
        raise UserError(f"{path}: the datasets do not fit in this process's memory ({exc})") from None
    except BaseException:
        f.close()
        raise


def _open_file(f, cfg, path, name: str, rank: int, size: int):
    """``open_dataset`` for the open HDF5 file ``f``."""
    train = _h5_pair(f, cfg.x_key, cfg.y_key, required=True)
    test = _h5_pair(f, cfg.test_x_key, cfg.test_y_key, required=False)
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise UserError(
            f"{path}: held-out rows have shape {test.x.shape[1:]}, training rows {train.x.shape[1:]}"
        )
    labels = lambda y: y.ndim == 1 and y.dtype.kind in "iu"  # noqa: E731  (else regression targets)
    if test is not None and (labels(test.y), test.y.shape[1:]) != (labels(train.y), train.y.shape[1:]):
        raise UserError(
            f"{path}: held-out {cfg.test_y_key!r} is {test.y.dtype} {test.y.shape}, training {cfg.y_key!r} "
            f"is {train.y.dtype} {train.y.shape}: both must be class labels (rows,) or targets with the "
            "same outputs"
        )
    if test is not None and test.rows == 0:
        test = None  # an empty held-out pair is no held-out set
    if train.rows == 0:
        raise UserError(f"{path}: {cfg.x_key!r} has no rows")
    train_ids = np.arange(train.rows)
    test_split = Split(test, np.arange(test.rows), "held-out") if test is not None else None
    if test is not None and cfg.test_fraction:
        raise UserError(
            f"{path} has held-out datasets {cfg.test_x_key!r}/{cfg.test_y_key!r}; drop --test-fraction"
        )
    if cfg.test_fraction:
        perm = np.random.default_rng(SPLIT_SEED).permutation(train.rows)
        n_test = int(round(cfg.test_fraction * train.rows))
        if not 0 < n_test < train.rows:
            raise UserError(
                f"--test-fraction {cfg.test_fraction} leaves no training or no held-out rows of {train.rows}"
            )
        test_split = Split(train, np.sort(perm[:n_test]), "held-out")
        train_ids = np.sort(perm[n_test:])
    features = int(train.x.shape[1])
    if train.y.ndim == 2 or not np.issubdtype(train.y.dtype, np.integer):
        if cfg.loss != "mse":
            kind = f"2-D targets {train.y.shape}" if train.y.ndim == 2 else f"{train.y.dtype} targets"
            raise UserError(
                f"{path}: {cfg.y_key!r} holds {kind}; class labels for {cfg.loss} are 1-D integers "
                "(use --loss mse for regression targets)"
            )
        outputs = int(train.y.shape[1]) if train.y.ndim == 2 else 1
        return Dataset(name, Split(train, train_ids), test_split, features, None, outputs), None
    ds = Dataset(name, Split(train, train_ids), test_split, features, None, 0)
    if "num_classes" in f.attrs:
        set_num_classes(ds, _num_classes_attribute(f), "attribute num_classes")
    try:
        blocks = [_label_block(s, rank, size) for s in (train, test) if s is not None]
    except UnreadableRows as exc:
        ds.unreadable, blocks = str(exc), [NO_LABELS]
    return ds, (min(b[0] for b in blocks), max(b[1] for b in blocks))


def arrays(x, y, x_test=None, y_test=None, num_classes: int | None = None, name: str = "arrays") -> Dataset:
    """In-memory data for a ``Trainer``: numpy arrays, used where they are (not copied).

    ``x``: inputs (rows, features); ``y``: integer class labels (rows,), or float targets (rows,) or
    (rows, outputs) for regression (``loss="mse"``). ``x_test``/``y_test``: an optional held-out pair
    of the same kinds, what evaluation scores. ``num_classes``: the class count (default: the largest
    label + 1). Every rank of a job passes the same arrays; the sampler hands each rank the row ids of
    its slices, and only those rows are read at each step. NaN/Inf values are found where rows are
    read, as for files. Raises ``UserError`` naming what does not fit.
    """
    x, y = np.asarray(x), np.asarray(y)
    _check_pair(x, y, name, "x", "y")
    test = None
    if (x_test is None) != (y_test is None):
        raise UserError(f"{name}: give both x_test and y_test, or neither")
    if x_test is not None:
        x_test, y_test = np.asarray(x_test), np.asarray(y_test)
        _check_pair(x_test, y_test, name, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"{name}: x_test has rows of shape {x_test.shape[1:]}, x {x.shape[1:]}")
        if (_labels(y_test), y_test.shape[1:]) != (_labels(y), y.shape[1:]):
            raise UserError(
                f"{name}: y_test is {y_test.dtype} {y_test.shape}, y is {y.dtype} {y.shape}: both must be "
                "class labels (rows,) or targets with the same outputs"
            )
        test = Split(ArraySource(x_test, y_test, f"{name}-test"), np.arange(len(x_test)), "held-out")
    train = Split(ArraySource(x, y, name), np.arange(len(x)))
    if not _labels(y):  # regression targets
        if num_classes is not None:
            raise UserError(f"{name}: num_classes = {num_classes} needs integer class labels; y is {y.dtype}")
        return Dataset(name, train, test, int(x.shape[1]), None, int(y.shape[1]) if y.ndim == 2 else 1)
    ds = Dataset(name, train, test, int(x.shape[1]), None, 0)
    ys = [a for a in (y, y_test) if a is not None and len(a)]
    lo, hi = min(int(a.min()) for a in ys), max(int(a.max()) for a in ys)
    if lo < 0:
        raise UserError(f"{name}: labels must be class indices >= 0, found {lo}")
    if num_classes is not None and hi >= num_classes:
        raise UserError(f"{name}: label {hi} is out of range for num_classes = {num_classes}")
    set_num_classes(ds, hi + 1 if num_classes is None else int(num_classes), "num_classes")
    return ds


def _labels(y) -> bool:
    """Whether ``y`` holds class labels (1-D integers) rather than regression targets."""
    return y.ndim == 1 and y.dtype.kind in "iu"


def _check_pair(x, y, name: str, x_key: str, y_key: str) -> None:
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"{name}: {x_key} has shape {x.shape}; inputs are (rows, features)")
    if y.ndim not in (1, 2):
        raise UserError(f"{name}: {y_key} has shape {y.shape}; labels are (rows,), targets (rows, outputs)")
    for key, a in ((x_key, x), (y_key, y)):
        if a.dtype.kind not in "iuf":
            raise UserError(f"{name}: {key} holds {a.dtype} values; expected integers or floats")
    if len(x) != len(y):
        raise UserError(f"{name}: {x_key} has {len(x)} rows, {y_key} {len(y)}")
    if len(x) == 0 and x_key == "x":
        raise UserError(f"{name}: {x_key} has no rows")


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


class EpochSampler:
    """Row ids of this rank's slice of every global batch.

    Parameters
    ----------
    ids : (rows,) the training row ids
    batch_size : global batch size (rows over all ranks)
    rank, size : this rank and the number of data-parallel ranks
    seed : shuffling seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``
    drop_last : drop the last batch if it is partial
    shard_rows : if set, each rank's slice is whole shards of this many consecutive rows
    """

    def __init__(self, ids, batch_size: int, rank: int, size: int, seed: int, drop_last=False, shard_rows=0):
        self.ids, self.batch_size, self.rank, self.size = ids, batch_size, rank, size
        self.seed, self.drop_last, self.shard_rows = seed, drop_last, shard_rows

    def __len__(self) -> int:
        n, b = len(self.ids), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch: int):
        """Yield ``(local_ids, global_rows)`` for each global batch of ``epoch``."""
        order = self.ids[np.random.default_rng((self.seed, 0xDA7A, epoch)).permutation(len(self.ids))]
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            # whole shards of shard_rows rows each (--deterministic), else near-equal rows
            start, count = split_units(len(batch), self.shard_rows or 1, self.size, self.rank)
            yield batch[start : start + count], len(batch)


# --- python -m hpcnn.data: write datasets in the layout above -------------------------------------


def write_h5(path, x, y, x_test=None, y_test=None, num_classes=None, attrs=None) -> None:
    """Write arrays in hpcnn's dataset layout (gzip-compressed, chunked by rows)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        if num_classes is not None:
            f.attrs["num_classes"] = int(num_classes)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        pairs = [("x", x), ("y", y)] + (
            [("x_test", x_test), ("y_test", y_test)] if x_test is not None else []
        )
        for key, arr in pairs:
            f.create_dataset(key, data=arr, compression="gzip", shuffle=True)


def write_synthetic(path, rows, test_rows, features, classes, seed) -> None:
    """Write the synthetic dataset block by block, so any size fits in bounded memory."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_classes"] = int(classes)
        f.attrs["source"] = f"hpcnn synthetic: seed {seed}, {classes} Gaussian clusters"
        for suffix, n, stream in (("", rows, 0), ("_test", test_rows, 1)):
            chunk = (min(max(n, 1), 1024), features)
            x = f.create_dataset("x" + suffix, (n, features), np.float32, chunks=chunk)
            y = f.create_dataset("y" + suffix, (n,), np.int64, chunks=(chunk[0],))
            for start, xb, yb in synthetic_blocks(n, features, classes, seed, stream):
                x[start : start + len(xb)], y[start : start + len(yb)] = xb, yb


def _classes_of(*labels) -> int | None:
    ys = [y for y in labels if y is not None]
    if all(np.issubdtype(y.dtype, np.integer) and y.ndim == 1 for y in ys):
        return int(max(int(y.max()) for y in ys if len(y)) + 1)
    return None


def convert(inputs: list[str], out: str, x_key: str, y_key: str) -> str:
    """Arrays from ``.npz`` (keys x, y, optional x_test, y_test) or two ``.npy`` files -> HDF5."""
    if len(inputs) == 1 and inputs[0].endswith(".npz"):
        with np.load(inputs[0]) as z:
            arrays = {k: z[k] for k in z.files}
        if x_key not in arrays or y_key not in arrays:
            raise UserError(f"{inputs[0]} has arrays {sorted(arrays)}; expected {x_key!r} and {y_key!r}")
        x, y = arrays[x_key], arrays[y_key]
        xt, yt = arrays.get(f"{x_key}_test"), arrays.get(f"{y_key}_test")
        if (xt is None) != (yt is None):
            raise UserError(
                f"{inputs[0]} has only one of {x_key}_test and {y_key}_test; give both or neither"
            )
    elif len(inputs) == 2 and all(p.endswith(".npy") for p in inputs):
        x, y = (np.load(p) for p in inputs)
        xt = yt = None
    else:
        raise UserError("convert takes one .npz file or two .npy files (inputs, then labels)")
    if x.ndim == 1 or x.ndim > 2:
        x = x.reshape(len(x), -1)  # images and such become (rows, features)
        xt = None if xt is None else xt.reshape(len(xt), -1)
    if len(x) != len(y):
        raise UserError(f"inputs have {len(x)} rows but labels have {len(y)}")
    write_h5(out, x, y, xt, yt, _classes_of(y, yt))
    return f"wrote {out}: {len(x)} rows x {x.shape[1]} features" + (
        f", {len(xt)} held-out rows" if xt is not None else ""
    )
