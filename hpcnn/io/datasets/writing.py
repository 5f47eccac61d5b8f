"""Writing datasets in hpcnn's HDF5 layout (``layout``): what ``python -m hpcnn.data`` does.

``write_h5`` writes arrays (gzip-compressed, chunked by rows), ``write_synthetic`` the synthetic set
block by block (any size in bounded memory; as images with ``image``), and ``convert`` turns
``.npz`` or ``.npy`` files into such a file (3-D and 4-D inputs stay images, in their layout).
"""

import math

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


def write_synthetic(path, rows, test_rows, features, classes, seed, image=None) -> None:
    """Write the synthetic dataset block by block, so any size fits in bounded memory.

    ``image``: ``(H, W, C)``: write the rows as images (rows, C, H, W), which ``--image-layout
    nchw`` (the default) reads back as the rows of ``--synthetic-image CxHxW`` (``features`` is then
    H * W * C)."""
    import h5py

    stored = (features,) if image is None else (image[2], image[0], image[1])  # (C, H, W)
    assert math.prod(stored) == features, (image, features)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_classes"] = int(classes)
        f.attrs["source"] = f"hpcnn synthetic: seed {seed}, {classes} Gaussian clusters"
        for suffix, n, stream in (("", rows, 0), ("_test", test_rows, 1)):
            chunk = (min(max(n, 1), 1024), *stored)
            x = f.create_dataset("x" + suffix, (n, *stored), np.float32, chunks=chunk)
            y = f.create_dataset("y" + suffix, (n,), np.int64, chunks=(chunk[0],))
            for start, xb, yb in synthetic_blocks(n, features, classes, seed, stream):
                if image is not None:  # hpcnn's rows are (H, W, C) images: stored channels first
                    xb = xb.reshape(len(xb), *image).transpose(0, 3, 1, 2)
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
    if x.ndim == 1 or x.ndim > 4:
        x = x.reshape(len(x), math.prod(x.shape[1:]))  # (rows, features)
        xt = None if xt is None else xt.reshape(len(xt), math.prod(xt.shape[1:]))
    if xt is not None and xt.shape[1:] != x.shape[1:]:
        raise UserError(f"held-out inputs have rows of shape {xt.shape[1:]}, inputs {x.shape[1:]}")
    if len(x) != len(y):
        raise UserError(f"inputs have {len(x)} rows but labels have {len(y)}")
    write_h5(out, x, y, xt, yt, _classes_of(y, yt))  # images as they are: --image-layout reads them
    rows = " x ".join(map(str, x.shape[1:]))
    kind = f"images of {rows} ((C, H, W) or (H, W, C): see --image-layout)" if x.ndim == 4 else None
    kind = kind or (f"images of {rows} (H, W, one channel)" if x.ndim == 3 else f"{x.shape[1]} features")
    return f"wrote {out}: {len(x)} rows x {kind}" + (f", {len(xt)} held-out rows" if xt is not None else "")
