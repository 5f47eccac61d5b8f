"""The HDF5 layout hpcnn reads, its checks, and ``open_dataset``, which opens what ``--data`` names.

The HDF5 layout hpcnn reads (and ``python -m hpcnn.data`` writes, ``writing``):

- ``x``: float array (rows, features), or images: (rows, C, H, W) or (rows, H, W, C) as
  ``--image-layout`` says (nchw or nhwc), or (rows, H, W) of one channel; each rank reads its rows
  and turns them into hpcnn's flat rows, images channels last (``sources.as_rows``; the dataset's
  ``shape`` is then ``(H, W, C)``); ``y``: integer class labels (rows,), or floats (rows, outputs)
  for regression with ``--loss mse``;
- optional held-out pair ``x_test`` / ``y_test`` of the same kinds;
- optional attribute ``num_classes`` on the file (otherwise the labels' maximum + 1, found by the
  ranks together, each reading one block of labels), at most ``MAX_CLASSES``.

Names are configurable (``--x-key`` and friends). Anything else (a group or a dangling link where a
dataset is expected, strings, booleans, complex numbers, no features, a wrong ``num_classes``, a
chunk HDF5 cannot read) is a ``UserError`` naming the file, the dataset and what to change.
``open_dataset`` also opens the built-in datasets: ``digits`` (a file shipped with hpcnn, 8x8
images of one channel), ``xor`` and ``synthetic`` (arrays in memory, ``inmemory``; images with
``--synthetic-image``).
"""

import math
import os
from importlib import resources
from pathlib import Path

import numpy as np

from hpcnn.errors import UserError
from hpcnn.io.datasets.inmemory import synthetic_arrays, xor_arrays
from hpcnn.io.datasets.sampler import split_counts
from hpcnn.io.datasets.sources import (
    MAX_CLASSES,
    ArraySource,
    Dataset,
    H5Source,
    Split,
    UnreadableRows,
    image_shape,
    read_rows,
    set_num_classes,
)

BUILTIN = ("digits", "xor", "synthetic")
SPLIT_SEED = 0  # held-out split by fraction: fixed, so every seed of a sweep sees the same split


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


def _h5_pair(f, x_key: str, y_key: str, required: bool, layout: str = "nchw"):
    x, y = _dataset(f, x_key, required), _dataset(f, y_key, required)
    if x is None and y is None:
        return None
    if x is None or y is None:  # one of a held-out pair: _dataset says which is missing
        _dataset(f, x_key if x is None else y_key, True)
    _numbers(f, x_key, x, "inputs")
    _numbers(f, y_key, y, "labels or targets")
    if x.shape is None or x.ndim not in (2, 3, 4):
        raise UserError(f"{f.filename}: {x_key!r} must be (rows, features) or images {IMAGES}; got {x.shape}")
    if y.shape is None or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise UserError(
            f"{f.filename}: {x_key!r} must be (rows, features) and {y_key!r} (rows,) or "
            f"(rows, outputs) with the same rows; got {x.shape} and {y.shape}"
        )
    if 0 in x.shape[1:]:
        raise UserError(f"{f.filename}: {x_key!r} has 0 features per row {x.shape}")
    if y.ndim == 2 and y.shape[1] == 0:
        raise UserError(f"{f.filename}: {y_key!r} has 0 outputs per row {y.shape}")
    return H5Source(f, x_key, y_key, layout)


IMAGES = "(rows, C, H, W), (rows, H, W, C) or (rows, H, W)"


def input_dataset(f, key: str):
    """The dataset ``key`` of ``f``, checked to be numbers, ``(rows, features)`` or images
    (inputs alone; ``as_rows`` makes a block of them hpcnn's rows)."""
    d = _dataset(f, key, True)
    _numbers(f, key, d, "inputs")
    if d.shape is None or d.ndim not in (2, 3, 4) or 0 in d.shape[1:]:
        raise UserError(
            f"{f.filename}: {key!r} must be (rows, features) with features > 0, or images {IMAGES}; "
            f"got {d.shape}"
        )
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
        seed, shape = cfg.synthetic_seed, None
        if cfg.synthetic_image:  # images: the same clusters, each row read as (H, W, C)
            c, h, w = (int(n) for n in cfg.synthetic_image.lower().split("x"))  # checked by Config
            shape = (h, w, c)
            feats = math.prod(shape)
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
        return Dataset("synthetic", train_split, test_split, feats, classes, classes, shape=shape), None
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
    train = _h5_pair(f, cfg.x_key, cfg.y_key, True, cfg.image_layout)
    test = _h5_pair(f, cfg.test_x_key, cfg.test_y_key, False, cfg.image_layout)
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
    features = math.prod(train.x.shape[1:])
    # digits' 64 pixels are stored flat, row by row: as images they are 8x8, one channel
    shape = (8, 8, 1) if cfg.data == "digits" else image_shape(train.x.shape[1:], cfg.image_layout)
    if train.y.ndim == 2 or not np.issubdtype(train.y.dtype, np.integer):
        if cfg.loss != "mse":
            kind = f"2-D targets {train.y.shape}" if train.y.ndim == 2 else f"{train.y.dtype} targets"
            raise UserError(
                f"{path}: {cfg.y_key!r} holds {kind}; class labels for {cfg.loss} are 1-D integers "
                "(use --loss mse for regression targets)"
            )
        outputs = int(train.y.shape[1]) if train.y.ndim == 2 else 1
        return Dataset(name, Split(train, train_ids), test_split, features, None, outputs, shape=shape), None
    ds = Dataset(name, Split(train, train_ids), test_split, features, None, 0, shape=shape)
    if "num_classes" in f.attrs:
        set_num_classes(ds, _num_classes_attribute(f), "attribute num_classes")
    try:
        blocks = [_label_block(s, rank, size) for s in (train, test) if s is not None]
    except UnreadableRows as exc:
        ds.unreadable, blocks = str(exc), [NO_LABELS]
    return ds, (min(b[0] for b in blocks), max(b[1] for b in blocks))
