"""Checkpoints: the whole training state in one HDF5 file that any parallel layout can read.

The parts, each a module of this package:

- ``fileformat``: the file itself: its names (``ckpt-<step>.h5``), its layout of groups,
  datasets and attributes, ``Position`` and ``Info``, the model's architecture and how two differ,
  and the digests that cover every byte of content;
- ``reading``: ``inspect`` (attributes only) and ``read_stage`` (a stage's tensors into its flat
  buffers); any error a damaged file raises is a ``UserError`` naming it;
- ``writing``: ``save``, atomic (a temporary name, fsync, rename) and refused early when the
  file cannot fit; ``prune`` and the removal of interrupted writes' temporary files;
- ``writers``: the two HDF5 writers ``save`` chooses from, parallel (``mpio``) and gathered
  through rank 0 (``gather``), which write the same datasets;
- ``verification``: ``verify`` checks every digest and checksum; ``verify_bounded`` runs it in a
  child process that a damaged file cannot hang.

Everything a caller uses is importable from here (``from hpcnn.io.checkpoints import save``). To
replace a function for a test, patch it in the module that calls it.
"""

from hpcnn.io.checkpoints.fileformat import (
    DATA_ORDER,
    FORMAT_VERSION,
    KIND,
    LIBVER,
    NAME,
    READS,
    STATE,
    Info,
    Position,
    architecture,
    architecture_difference,
    checkpoints,
    content_digest,
    file_name,
    group_tensors,
    in_shape_of,
    keeps_state,
    layer_key,
    metadata,
    stage_tensors,
    step_of,
    tensor_digest,
)
from hpcnn.io.checkpoints.reading import (
    DAMAGE,
    damage_reason,
    inspect,
    read_stage,
)
from hpcnn.io.checkpoints.verification import (
    CHILD,
    CRASHES,
    STARTUP_S,
    VERIFY_STALL_S,
    verify,
    verify_bounded,
    verify_child,
)
from hpcnn.io.checkpoints.writers import CHUNK_BYTES
from hpcnn.io.checkpoints.writing import (
    DATASET_OVERHEAD,
    MPIO_MARGIN,
    TEMPORARY,
    estimate_bytes,
    free_bytes,
    h5py_parallel,
    prune,
    remove_temporaries,
    save,
    temporary_name,
    too_little_space,
)

__all__ = [
    "CHILD",
    "CHUNK_BYTES",
    "CRASHES",
    "DAMAGE",
    "DATASET_OVERHEAD",
    "DATA_ORDER",
    "FORMAT_VERSION",
    "KIND",
    "LIBVER",
    "MPIO_MARGIN",
    "NAME",
    "READS",
    "STATE",
    "STARTUP_S",
    "TEMPORARY",
    "VERIFY_STALL_S",
    "Info",
    "Position",
    "architecture",
    "architecture_difference",
    "checkpoints",
    "content_digest",
    "damage_reason",
    "estimate_bytes",
    "file_name",
    "group_tensors",
    "in_shape_of",
    "free_bytes",
    "h5py_parallel",
    "inspect",
    "keeps_state",
    "layer_key",
    "metadata",
    "prune",
    "read_stage",
    "remove_temporaries",
    "save",
    "stage_tensors",
    "step_of",
    "temporary_name",
    "tensor_digest",
    "too_little_space",
    "verify",
    "verify_bounded",
    "verify_child",
]
