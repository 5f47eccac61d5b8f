"""Data held in memory: the built-in ``xor`` and ``synthetic`` sets and a user's arrays (``arrays``).

The synthetic set is seeded Gaussian class clusters, generated block by block
(``synthetic_blocks``) so that a file written in bounded memory (``writing.write_synthetic``)
holds exactly the rows of the in-memory set. ``arrays`` wraps a user's numpy arrays, checked as a
file's datasets are, for a ``Trainer``.
"""

import numpy as np

from hpcnn.errors import UserError
from hpcnn.io.datasets.sources import ArraySource, Dataset, Split, as_rows, image_shape, set_num_classes


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


def arrays(
    x, y, x_test=None, y_test=None, num_classes: int | None = None, name: str = "arrays",
    image_layout: str = "nchw",
) -> Dataset:  # fmt: skip
    """In-memory data for a ``Trainer``: numpy arrays, used where they are (not copied, but for
    images in (rows, C, H, W), copied once into hpcnn's channels-last rows).

    ``x``: inputs (rows, features), or images: (rows, C, H, W) (``image_layout="nchw"``, the
    default) or (rows, H, W, C) (``"nhwc"``), or (rows, H, W) of one channel; the dataset's
    ``shape`` is then the images' ``(H, W, C)``. ``y``: integer class labels (rows,), or float
    targets (rows,) or (rows, outputs) for regression (``loss="mse"``). ``x_test``/``y_test``: an
    optional held-out pair of the same kinds, what evaluation scores. ``num_classes``: the class
    count (default: the largest label + 1). Every rank of a job passes the same arrays; the sampler
    hands each rank the row ids of its slices, and only those rows are read at each step. NaN/Inf
    values are found where rows are read, as for files. Raises ``UserError`` naming what does not fit.
    """
    if image_layout not in ("nchw", "nhwc"):
        raise UserError(f"{name}: image_layout = {image_layout!r}: expected nchw or nhwc")
    x, y = np.asarray(x), np.asarray(y)
    _check_pair(x, y, name, "x", "y")
    stored, shape = x.shape[1:], image_shape(x.shape[1:], image_layout)
    x = as_rows(x, image_layout) if x.ndim > 2 else x  # (rows, features)
    test = None
    if (x_test is None) != (y_test is None):
        raise UserError(f"{name}: give both x_test and y_test, or neither")
    if x_test is not None:
        x_test, y_test = np.asarray(x_test), np.asarray(y_test)
        _check_pair(x_test, y_test, name, "x_test", "y_test")
        if x_test.shape[1:] != stored:
            raise UserError(f"{name}: x_test has rows of shape {x_test.shape[1:]}, x {stored}")
        x_test = as_rows(x_test, image_layout) if x_test.ndim > 2 else x_test
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
        outputs = int(y.shape[1]) if y.ndim == 2 else 1
        return Dataset(name, train, test, int(x.shape[1]), None, outputs, shape=shape)
    ds = Dataset(name, train, test, int(x.shape[1]), None, 0, shape=shape)
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
    if x.ndim not in (2, 3, 4) or 0 in x.shape[1:]:
        raise UserError(
            f"{name}: {x_key} has shape {x.shape}; inputs are (rows, features) or images (rows, C, H, W), "
            "(rows, H, W, C) or (rows, H, W)"
        )
    if y.ndim not in (1, 2):
        raise UserError(f"{name}: {y_key} has shape {y.shape}; labels are (rows,), targets (rows, outputs)")
    for key, a in ((x_key, x), (y_key, y)):
        if a.dtype.kind not in "iuf":
            raise UserError(f"{name}: {key} holds {a.dtype} values; expected integers or floats")
    if len(x) != len(y):
        raise UserError(f"{name}: {x_key} has {len(x)} rows, {y_key} {len(y)}")
    if len(x) == 0 and x_key == "x":
        raise UserError(f"{name}: {x_key} has no rows")
