"""Writing a checkpoint: ``save``, the free-space check before it, and the directory's upkeep.

A checkpoint is written to a hidden temporary name in the same directory
(``.ckpt-<step>.h5.<host>.<pid>.tmp``: one per run), flushed and fsynced, then renamed over the
final name (and the directory fsynced): a crash at any moment leaves the previous checkpoints
intact. Temporary files of interrupted writes are removed (``remove_temporaries``) only by the run
that holds the directory's lock; ``prune`` keeps the newest ``keep`` checkpoints.

A write that cannot succeed fails with one message and ``EXIT_IO``: before writing, rank 0 compares
the free space (``os.statvfs``) with an estimate of the file's size (``estimate_bytes``) and refuses
early; a write error during the write (a disk that filled meanwhile, an I/O error, a directory
removed) removes the temporary file. Which writer writes the file (``writers``: parallel ``mpio``
or ``gather`` through rank 0) is chosen here; with little room to spare, ``auto`` takes the
gathering writer, whose failures are plain errors on rank 0.
"""

import contextlib
import math
import os
import re
import socket
from pathlib import Path

import numpy as np

from hpcnn.core.backend import to_host
from hpcnn.errors import EXIT_IO, JobError, UserError
from hpcnn.io.checkpoints.fileformat import (
    STATE,
    Position,
    checkpoints,
    file_name,
    group_tensors,
    keeps_state,
    metadata,
    stage_tensors,
    step_of,
    tensor_digest,
)
from hpcnn.io.checkpoints.writers import Part, chunk_shape, write_gathered, write_mpio

TEMPORARY = re.compile(r"^\.ckpt-\d+\.h5(\..+)?\.tmp$")  # a write in progress, or one a dead run left
# Bytes per dataset besides its values: HDF5's object header and chunk index, and its entry in
# tensor_digests (measured 390-520 for format 2 files, HDF5 1.10 layout)
DATASET_OVERHEAD = 640
MPIO_MARGIN = 2  # with io "auto", less free space than this x the estimate: write with "gather"


def temporary_name(name: str) -> str:
    """The name ``name`` is written under by this process: two runs never share one."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def remove_temporaries(directory) -> list[str]:
    """Delete the temporary files of interrupted writes in ``directory``; only call it while holding
    the directory's lock (``hpcnn.io.dirlock``): then no other run is writing one."""
    removed = []
    try:
        for path in sorted(Path(directory).iterdir()):
            if TEMPORARY.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    except OSError as exc:  # e.g. a directory without read permission, another user's file
        raise UserError(f"checkpoint_dir {directory}: cannot remove the temporary files of interrupted "
                        f"writes: {exc}") from None  # fmt: skip
    return removed


def h5py_parallel() -> bool:
    """Whether this h5py was built against parallel HDF5 (the ``mpio`` driver)."""
    import h5py

    return bool(h5py.get_config().mpi)


def estimate_bytes(layers, buffers: int, itemsize: int, meta: dict | None = None) -> int:
    """About how large a checkpoint of ``layers`` is (a little more, not less): the values of every
    parameter tensor ``buffers`` times (parameters and each optimizer state) and of every state
    tensor once, their checksums, HDF5's structures per dataset, and the attributes of ``meta``
    (16 KiB when not known yet)."""

    def size(tensors) -> int:
        values = sum(math.prod(shape) for _, _, shape in tensors) * itemsize
        chunks = sum(-(-shape[0] // chunk_shape(shape, itemsize)[0]) for _, _, shape in tensors)
        return values + 4 * chunks + DATASET_OVERHEAD * len(tensors)

    attrs = 16384
    if meta is not None:
        found = [v for group in meta.values() for v in group.values()]
        attrs = sum(v.nbytes if isinstance(v, np.ndarray) else len(str(v)) for v in found) + 4096
    params = size(stage_tensors(layers, 0, len(layers)))
    return buffers * params + size(stage_tensors(layers, 0, len(layers), state=True)) + attrs


def free_bytes(directory) -> int | None:
    """Bytes an unprivileged process may still write in ``directory``'s file system (``None``:
    unknown). Quotas are not seen here; a write that exceeds one fails and is reported then."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_blocks == 0:  # a file system that reports no size (some FUSE mounts): not "full"
        return None
    return st.f_bavail * st.f_frsize


def too_little_space(directory, needed: int) -> str | None:
    """A sentence saying that ``needed`` bytes do not fit into ``directory``, or ``None``."""
    free = free_bytes(directory)
    if free is None or free >= needed:
        return None
    return (
        f"not enough space in {directory}: a checkpoint needs about {_amount(needed)}, "
        f"{_amount(free)} are free"
    )


def _amount(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


def _buffers(layers, model, opt) -> list[tuple[str, object]]:
    """This stage's flat buffers and the HDF5 group each one's tensors go under (the layer state's
    where any layer of the whole model keeps state: the same list on every rank). Optimizer state
    sharded over the replicas (``--zero``: the optimizer is bound to a ``FlatShard``) is a ``Part``."""
    state = [(STATE, model.params.state)] if keeps_state(layers) else []
    lo = getattr(opt.params, "lo", None)  # a FlatShard's first element

    def optimizer(n):
        return opt.state[n] if lo is None else Part(opt.state[n], lo, model.params.size)

    return (
        [("model", model.params.data)] + [(f"optimizer/{n}", optimizer(n)) for n in sorted(opt.state)] + state
    )


def save(
    directory, cfg, layers, in_shape, bounds, grid, model, opt, position: Position, io="auto", fault=None
):
    """Write a checkpoint of ``position.step`` into ``directory`` (collective over ``grid.world``).

    Returns the path written. Raises ``JobError`` (``EXIT_IO``) on every rank if there is not
    enough free space or the write failed, with one message naming the directory, the bytes
    needed and free; the temporary file is removed and existing checkpoints are never touched.
    ``fault``: the training probe's ``fault`` (``HPCNN_FAULT`` at the ``checkpoint`` site).
    """
    world = grid.world
    auto = io == "auto"
    io = ("mpio" if h5py_parallel() and world.size > 1 else "gather") if auto else io
    buffers = _buffers(layers, model, opt)
    digests = _tensor_digests(grid, layers, bounds, buffers)
    directory = Path(directory)
    final = directory / file_name(position.step)
    failure, tmp, meta, needed = None, None, None, 0
    if world.is_root:  # the file's attributes, and a refusal before writing anything if it cannot fit
        tmp = directory / temporary_name(final.name)
        meta = metadata(cfg, layers, in_shape, bounds, grid, opt, position, io, digests)
        params = len(buffers) - (buffers[-1][0] == STATE)  # parameter-shaped buffers
        needed = estimate_bytes(layers, params, to_host(buffers[0][1]).dtype.itemsize, meta)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            short = too_little_space(directory, needed)
            free = free_bytes(directory)
            if short:
                failure = f"writing checkpoint {final} failed: {short}; nothing was written, earlier "
                failure += "checkpoints are intact"
            elif io == "mpio" and auto and free is not None and free < MPIO_MARGIN * needed:
                # Parallel HDF5 cannot recover from a write that fails half-way (ranks part in
                # different collectives: a hang or a crash); with little room to spare, the
                # gathering writer, whose failures are plain errors on rank 0, writes this one.
                io = "gather"
                meta = metadata(cfg, layers, in_shape, bounds, grid, opt, position, io, digests)
        except OSError as exc:
            failure = f"writing checkpoint {final} failed: cannot create the directory: {exc}"
    failure, tmp, meta = world.bcast((failure, tmp, meta))
    if failure is not None:
        raise JobError(failure, EXIT_IO)
    io = meta["layout"]["io"]
    write = write_mpio if io == "mpio" else write_gathered
    fault = fault or (lambda site: None)
    failure = write(tmp, meta, grid, layers, bounds, buffers, fault)  # agreed by every rank
    if world.is_root:  # rank 0 alone touches the file system from here: no collective may fail
        if failure is None:
            try:
                _fsync(tmp)
                os.replace(tmp, final)
                # The file is whole under its name now: a directory that cannot be fsynced (some
                # network file systems refuse it) costs only the rename's durability in a crash.
                with contextlib.suppress(OSError):
                    _fsync(directory)
            except OSError as exc:
                gone = not directory.is_dir()
                failure = f"the directory {directory} vanished during the write" if gone else str(exc)
        if failure is not None:
            failure = _write_failure(final, tmp, failure, needed)
    failure = world.bcast(failure)
    if failure is not None:
        raise JobError(failure, EXIT_IO)
    return final


def _write_failure(final: Path, tmp: Path, reason: str, needed: int) -> str:
    """Remove the temporary file; the one message that says what happened."""
    try:
        tmp.unlink(missing_ok=True)
        removed = "the temporary file was removed"
    except OSError as exc:
        removed = f"the temporary file {tmp} could not be removed ({exc})"
    where, free = final.parent, free_bytes(final.parent)
    space = f"{_amount(free)} are free in {where}" if free is not None else f"{where}'s free space is unknown"
    return (
        f"writing checkpoint {final} failed: {reason}; a checkpoint needs about {_amount(needed)}, {space}; "
        f"{removed}, earlier checkpoints are intact"
    )


def _tensor_digests(grid, layers, bounds, buffers) -> dict | None:
    """``tensor_digest`` of every tensor by dataset name, on world rank 0 (``None`` elsewhere).
    The replicas of a stage hold identical copies of its tensors and share the hashing out."""
    first, stop = bounds[grid.stage], bounds[grid.stage + 1]
    every = [(b, t) for b in buffers for t in group_tensors(b[0], layers, first, stop)]
    mine = {}
    for i, ((group, buf), (key, offset, shape)) in enumerate(every):
        owner, n = i % grid.replicas, math.prod(shape)
        if isinstance(buf, Part):  # its parts to the replica that hashes it (collective)
            values = buf.gather(grid.dp, offset, offset + n, owner)
        elif owner == grid.replica:
            values = to_host(buf)[offset : offset + n]
        if owner == grid.replica:
            mine[f"{group}/{key}"] = tensor_digest(values.reshape(shape))
    parts = grid.world.gather(mine)
    return None if parts is None else {name: d for part in parts for name, d in part.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(directory, keep: int, written: Path) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints up to ``written`` (the one just written) in
    ``directory``. Newer-numbered files can only be unreadable ones that ``--resume auto``
    reported and skipped: they are neither counted nor deleted."""
    others = [p for p in checkpoints(directory) if step_of(p) < step_of(written)]
    doomed = others[max(keep - 1, 0) :]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
