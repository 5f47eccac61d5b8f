"""Datasets: HDF5 files read by rows, built-in datasets, and the per-rank sampler.

The parts, each a module of this package:

- ``layout``: the HDF5 layout hpcnn reads, its checks (each problem a ``UserError`` naming the
  file, the dataset and what to change), and ``open_dataset``, which opens what ``--data`` names;
- ``sources``: row sources (``H5Source`` reads exactly the rows asked for, ``ArraySource`` holds
  them in memory), unreadable and non-finite rows, and the ``Split`` and ``Dataset`` made of them;
- ``inmemory``: the built-in ``xor`` and ``synthetic`` sets and a user's arrays (``arrays``);
- ``writing``: files in the layout (``python -m hpcnn.data``: ``convert``, the synthetic set);
- ``sampler``: each rank's rows of every global batch (``EpochSampler``; ``PoissonSampler`` for
  private training) and near-equal slices.

Everything a caller uses is importable from here (``from hpcnn.io.datasets import open_dataset``).
To replace a function for a test, patch it in the module that calls it.
"""

from hpcnn.io.datasets.inmemory import SYNTHETIC_BLOCK, arrays, synthetic_arrays, synthetic_blocks, xor_arrays
from hpcnn.io.datasets.layout import BUILTIN, NO_LABELS, SPLIT_SEED, input_dataset, open_dataset, open_h5
from hpcnn.io.datasets.sampler import EpochSampler, PoissonSampler, split_counts, split_units
from hpcnn.io.datasets.sources import (
    MAX_CLASSES,
    ArraySource,
    Dataset,
    H5Source,
    Split,
    UnreadableRows,
    as_rows,
    describe_nonfinite,
    first_nonfinite,
    image_shape,
    read_rows,
    set_num_classes,
)
from hpcnn.io.datasets.writing import FORMAT_VERSION, convert, write_h5, write_synthetic

__all__ = [
    "BUILTIN",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "NO_LABELS",
    "SPLIT_SEED",
    "SYNTHETIC_BLOCK",
    "ArraySource",
    "Dataset",
    "EpochSampler",
    "PoissonSampler",
    "H5Source",
    "Split",
    "UnreadableRows",
    "arrays",
    "as_rows",
    "convert",
    "describe_nonfinite",
    "first_nonfinite",
    "image_shape",
    "input_dataset",
    "open_dataset",
    "open_h5",
    "read_rows",
    "set_num_classes",
    "split_counts",
    "split_units",
    "synthetic_arrays",
    "synthetic_blocks",
    "write_h5",
    "write_synthetic",
    "xor_arrays",
]
