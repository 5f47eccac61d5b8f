"""Writing datasets in hpcnn's HDF5 layout (``layout``): what ``python -m hpcnn.data`` does.

``write_h5`` writes arrays (gzip-compressed, chunked by rows), ``write_synthetic`` the synthetic set
block by block (any size in bounded memory), and ``convert`` turns ``.npz`` or ``.npy`` files into
such a file.
"""

import numpy as np

from hpcnn.errors import UserError
from hpcnn.io.datasets.inmemory import synthetic_blocks

FORMAT_VERSION = 1


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
