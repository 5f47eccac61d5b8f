"""Checkpoints: the whole training state in one HDF5 file that any parallel layout can read.

Layout of ``ckpt-<step>.h5`` (``format_version`` 2)::

    /                      attrs: format_version, kind = "hpcnn checkpoint", hpcnn_version, created,
                                  config (the resolved config as TOML),
                                  tensor_digests (JSON: dataset name -> sha256 of its dtype, shape, bytes),
                                  content_digest (sha256 of every other attribute, canonical JSON)
    /model                 attrs: architecture (JSON: in_features, dtype, one spec per layer),
                                  description, parameters
    /model/<LLL>_<type>/<name>          parameters of layer LLL (model order), e.g. 000_dense/W
    /optimizer             attrs: kind, t (optimizer steps taken), state (JSON list of names)
    /optimizer/<state>/<LLL>_<type>/<name>   e.g. optimizer/m/000_dense/W (Adam), velocity (SGD)
    /position              attrs: step, epoch, batch (global batches of ``epoch`` done),
                                  epoch_sums (loss sum, correct, rows of that epoch so far),
                                  history (JSON: one row per finished epoch)
    /rng                   attrs: seed, data_order: what the data order is derived from
    /layout                attrs: ranks, replicas, stages, stage_bounds, micro_batches, schedule,
                                  io ("mpio" or "gather"); for information only

Tensors are stored whole (layout-free): a rank reads the tensors of its own stage, whatever
layout wrote them. A checkpoint is written to a hidden temporary name in the same directory
(``.ckpt-<step>.h5.<host>.<pid>.tmp``: one per run), flushed and fsynced, then renamed over the
final name (and the directory fsynced): a crash at any moment leaves the previous checkpoints intact.

A write that cannot succeed fails with one message and ``EXIT_IO``: before writing, rank 0 compares
the free space (``os.statvfs``) with an estimate of the file's size and refuses early; a write error
during the write (a disk that filled meanwhile, an I/O error, a directory removed) removes the
temporary file. HDF5 never sees a failed write from the gathering writer (``_Spool``): after one,
HDF5's file state is broken and its own close crashes the process.

Integrity. Every byte of content is covered by a checksum: each dataset by HDF5's Fletcher32
filter (per chunk, checked on every read) and by its sha256 in ``tensor_digests``; every attribute,
``tensor_digests`` included, by ``content_digest``. The digests are computed from the values
before writing (so both writers store the same ones) and recomputed from the file by ``verify``.
The file is written in the HDF5 1.10 format (``LIBVER``): its superblock, object headers and chunk
indexes carry HDF5's own checksums, and strings are fixed-length, stored in the checksummed object
headers rather than in the global heap, which has no checksum and on whose damage HDF5 can loop
forever (2 of 5,000 random bit flips in a format 1 file's metadata did). Format 1 files (hpcnn
before the digests) still load: their tensors are checked by Fletcher32, their attributes only
decoded.

A damaged file can still make HDF5 loop inside C code, which Python cannot interrupt, so
``--resume``, ``evaluate`` and ``python -m hpcnn.checkpoint`` verify a file in a child process
(``verify_bounded``) that is stopped when it makes no progress for ``VERIFY_STALL_S`` seconds: the
file then counts as corrupt. Any error while reading a damaged file is a ``UserError`` naming it.

Two writers produce the same datasets (same shapes, chunks, filters, values):

- ``mpio`` (h5py built with parallel HDF5): every rank opens the file with the MPI-IO driver;
  each tensor is written collectively, the replicas of the owning stage each writing a block of
  its rows, all other ranks an empty selection.
- ``gather``: rank 0 writes; replica 0 of each later stage sends its flat buffers to rank 0 one
  stage at a time (rank 0 holds one stage's state at a time, not the whole model's).

Training draws no random numbers after initialisation: the data order of epoch ``e`` is the
permutation drawn from ``(seed, e)`` (``data.EpochSampler``), so ``(seed, epoch, batch)`` is the
whole random state, and resuming continues on exactly the global batches of an uninterrupted run.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcnn import __version__
from hpcnn.core.backend import to_host
from hpcnn.core.layers import current_spec
from hpcnn.core.model import describe
from hpcnn.core.params import layout
from hpcnn.errors import EXIT_IO, JobError, UserError
from hpcnn.io.datasets import open_h5, split_counts
from hpcnn.parallel import faults

FORMAT_VERSION = 2
READS = (1, 2)  # format 1: as 2 without the digests, HDF5's default (1.8) format, vlen strings
LIBVER = ("v110", "v110")  # metadata checksums; readable by HDF5 1.10 and later
KIND = "hpcnn checkpoint"
NAME = re.compile(r"^ckpt-(\d+)\.h5$")
TEMPORARY = re.compile(r"^\.ckpt-\d+\.h5(\..+)?\.tmp$")  # a write in progress, or one a dead run left
CHUNK_BYTES = 1 << 20  # chunk size target: large enough for fast I/O, small enough to checksum often
# Bytes per dataset besides its values: HDF5's object header and chunk index, and its entry in
# tensor_digests (measured 390-520 for format 2 files, HDF5 1.10 layout)
DATASET_OVERHEAD = 640
DATA_ORDER = "permutation of the training rows from numpy.random.default_rng((seed, 0xDA7A, epoch))"
# A verification that shows no progress (file opened, an attribute or a chunk of rows read) for
# this long is stopped and its file counted as corrupt: HDF5 can loop forever on damaged metadata.
VERIFY_STALL_S = 30.0
# What reading a damaged file can raise from h5py, numpy and json (UnicodeDecodeError and
# JSONDecodeError are ValueErrors): each means "corrupt", never an internal error.
DAMAGE = (
    OSError,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
    MemoryError,
)


def file_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


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


@dataclass
class Position:
    """Where training stands: what a resumed run needs besides the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # global batches of ``epoch`` done
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, rows
    history: list = field(default_factory=list)  # one dict per finished epoch


@dataclass
class Info:
    """What a checkpoint holds, read from its attributes (no tensors)."""

    path: str
    format_version: int
    hpcnn_version: str
    created: str
    config: str  # TOML
    architecture: dict
    description: str
    parameters: int
    optimizer: str
    optimizer_t: int
    state_names: list
    position: Position
    seed: int
    layout: dict


# --- names ------------------------------------------------------------------------------------


def layer_key(index: int, layer) -> str:
    return f"{index:03d}_{type(layer).__name__.lower()}"


def stage_tensors(layers, first: int, stop: int):
    """``(key, offset, shape)`` of each tensor of layers ``[first, stop)`` in model order, with its
    offset in the stage's flat buffer (``params.layout``) and keys named by global layer index."""
    return [
        (f"{layer_key(first + s.layer, layers[first + s.layer])}/{s.name}", s.offset, tuple(s.shape))
        for s in layout(layers[first:stop])
    ]


def architecture(layers, in_features: int, dtype: str) -> dict:
    return {"in_features": int(in_features), "dtype": dtype, "layers": [layer.spec() for layer in layers]}


def architecture_difference(saved: dict, current: dict) -> str | None:
    """A sentence naming the first difference between two architectures, or ``None``."""
    if saved["dtype"] != current["dtype"]:
        return f"the checkpoint's dtype is {saved['dtype']}, this run's is {current['dtype']}"
    if saved["in_features"] != current["in_features"]:
        return (
            f"the checkpoint's model takes {saved['in_features']} input features, "
            f"this run's data has {current['in_features']}"
        )
    # (a checkpoint's specs as this hpcnn writes them: one from before a layer argument existed
    # gets the value that computes what it computed then)
    a, b = [current_spec(s) for s in saved["layers"]], current["layers"]
    # Shapes and types first (the difference a user made), then details such as initialisation.
    for detail in (False, True):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            was, now = _spec_text(x, detail), _spec_text(y, detail)
            if was != now:
                return f"layer {i} is {was} in the checkpoint, {now} in this run"
        if len(a) != len(b):
            return f"the checkpoint's model has {len(a)} layers, this run's has {len(b)}"
    return None


def _spec_text(spec: dict, detail: bool = True) -> str:
    shown = [(k, v) for k, v in spec.items() if k != "type" and (detail or k != "init")]
    args = ", ".join(str(v) if k in ("fan_in", "fan_out") else f"{k}={v}" for k, v in shown)
    return f"{spec['type']}({args})" if args else spec["type"]


# --- writing ----------------------------------------------------------------------------------


def _chunks(shape: tuple, itemsize: int) -> tuple:
    """Whole rows, at most ~CHUNK_BYTES, in equal chunks: HDF5 stores a filtered dataset's edge
    chunk at full size, so 784 rows are cut 4 x 196, not 3 x 256 + 16 (padded to 256)."""
    row_bytes = math.prod(shape[1:]) * itemsize
    most = max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1)))
    count = -(-shape[0] // most)
    return (-(-shape[0] // count), *shape[1:])


def _create(f, key: str, shape: tuple, dtype):
    chunks = _chunks(shape, np.dtype(dtype).itemsize)
    return f.create_dataset(key, shape, dtype, chunks=chunks, fletcher32=True)


def _write_attrs(f, meta: dict) -> None:
    import h5py

    for group, attrs in meta.items():
        target = f if group == "/" else f.require_group(group)
        for name, value in attrs.items():
            if isinstance(value, str):
                # Fixed length: kept in the checksummed object header; h5py's default variable-length
                # strings live in the global heap, which has no checksum.
                raw = value.encode()
                target.attrs.create(name, raw, dtype=h5py.string_dtype("utf-8", max(len(raw), 1)))
            else:
                target.attrs[name] = value


def tensor_digest(values) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order)."""
    h = _tensor_hash(values.dtype, values.shape)
    h.update(np.ascontiguousarray(values).data)
    return h.hexdigest()


def _tensor_hash(dtype, shape):
    return hashlib.sha256(json.dumps([np.dtype(dtype).str, [int(n) for n in shape]]).encode())


def content_digest(attributes: dict) -> str:
    """sha256 of every attribute (``{object path: {name: value}}``, the root's path being ``/``)
    but ``/``'s ``content_digest`` itself, in a canonical JSON form."""
    plain = {
        where: {name: _plain(v) for name, v in attrs.items() if (where, name) != ("/", "content_digest")}
        for where, attrs in attributes.items()
    }
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _plain(value):
    """An attribute value as written (str, int, numpy array) or as read back (bytes for a
    fixed-length string, numpy scalars) in one JSON form; arrays by dtype, shape and bytes."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return {"dtype": value.dtype.str, "shape": list(value.shape), "bytes": value.tobytes().hex()}
    raise TypeError(f"an attribute value of type {type(value).__name__}")


def metadata(cfg, layers, in_features, bounds, grid, opt, position: Position, io: str, digests: dict) -> dict:
    """The attributes of a checkpoint, grouped by HDF5 group (identical on every rank), sealed by
    ``content_digest``; ``digests`` are the tensors' (``tensor_digest``) by dataset name."""
    arch = architecture(layers, in_features, cfg.dtype)
    meta = {
        "/": {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "hpcnn_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.to_toml(),
            "tensor_digests": json.dumps(digests, sort_keys=True),
        },
        "model": {
            "architecture": json.dumps(arch),
            "description": describe(layers),
            "parameters": sum(math.prod(s.shape) for layer in layers for s in layer.param_specs()),
        },
        "optimizer": {"kind": cfg.optimizer, "t": opt.t, "state": json.dumps(sorted(opt.state))},
        "position": {
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "epoch_sums": np.asarray(position.epoch_sums, np.float64),
            "history": json.dumps(position.history),
        },
        "rng": {"seed": cfg.seed, "data_order": DATA_ORDER},
        "layout": {
            "ranks": grid.world.size,
            "replicas": grid.replicas,
            "stages": grid.stages,
            "stage_bounds": np.asarray(bounds, np.int64),
            "micro_batches": cfg.micro_batches,
            "schedule": cfg.schedule,
            "io": io,
        },
    }
    meta["/"]["content_digest"] = content_digest(meta)
    return meta


def estimate_bytes(layers, buffers: int, itemsize: int, meta: dict | None = None) -> int:
    """About how large a checkpoint of ``layers`` is (a little more, not less): the values of every
    tensor ``buffers`` times (parameters and each optimizer state), their checksums, HDF5's
    structures per dataset, and the attributes of ``meta`` (16 KiB when not known yet)."""
    tensors = stage_tensors(layers, 0, len(layers))
    values = sum(math.prod(shape) for _, _, shape in tensors) * itemsize
    chunks = sum(-(-shape[0] // _chunks(shape, itemsize)[0]) for _, _, shape in tensors)
    attrs = 16384
    if meta is not None:
        found = [v for group in meta.values() for v in group.values()]
        attrs = sum(v.nbytes if isinstance(v, np.ndarray) else len(str(v)) for v in found) + 4096
    return buffers * (values + 4 * chunks + DATASET_OVERHEAD * len(tensors)) + attrs


MPIO_MARGIN = 2  # with io "auto", less free space than this x the estimate: write with "gather"


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


def _buffers(model, opt) -> list[tuple[str, object]]:
    """This stage's flat buffers and the HDF5 group each one's tensors go under."""
    return [("model", model.params.data)] + [(f"optimizer/{n}", opt.state[n]) for n in sorted(opt.state)]


def save(
    directory, cfg, layers, in_features, bounds, grid, model, opt, position: Position, io="auto", fault=None
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
    buffers = _buffers(model, opt)
    digests = _tensor_digests(grid, layers, bounds, buffers)
    directory = Path(directory)
    final = directory / file_name(position.step)
    failure, tmp, meta, needed = None, None, None, 0
    if world.is_root:  # the file's attributes, and a refusal before writing anything if it cannot fit
        tmp = directory / temporary_name(final.name)
        meta = metadata(cfg, layers, in_features, bounds, grid, opt, position, io, digests)
        needed = estimate_bytes(layers, len(buffers), to_host(buffers[0][1]).dtype.itemsize, meta)
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
                meta = metadata(cfg, layers, in_features, bounds, grid, opt, position, io, digests)
        except OSError as exc:
            failure = f"writing checkpoint {final} failed: cannot create the directory: {exc}"
    failure, tmp, meta = world.bcast((failure, tmp, meta))
    if failure is not None:
        raise JobError(failure, EXIT_IO)
    io = meta["layout"]["io"]
    write = _write_mpio if io == "mpio" else _write_gathered
    fault = fault or faults.point  # removed once training/ is converted: (lambda site: None)
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
    tensors = stage_tensors(layers, bounds[grid.stage], bounds[grid.stage + 1])
    mine = {}
    for i, ((group, buf), (key, offset, shape)) in enumerate((b, t) for b in buffers for t in tensors):
        if i % grid.replicas == grid.replica:
            values = to_host(buf)[offset : offset + math.prod(shape)].reshape(shape)
            mine[f"{group}/{key}"] = tensor_digest(values)
    parts = grid.world.gather(mine)
    return None if parts is None else {name: d for part in parts for name, d in part.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Spool:
    """The temporary file as HDF5 sees it through h5py's file-object driver: HDF5 never sees a
    failed write.

    After a failed write HDF5's file state is broken, and its own close (or its clean-up at exit)
    crashes the process: a full disk ended a run with a segfault and 200 lines of tracebacks. So
    the first ``OSError`` (a full disk, an I/O error) is kept in ``error``, and that write and all
    later ones are held in memory instead, where HDF5 can read them back; the writer adds no more
    tensors once ``error`` is set, so only the rest of the tensor in progress and the file's
    closing metadata land there. HDF5 closes normally and the caller deletes the file. When writes
    succeed this costs nothing: as fast as HDF5's own driver, no extra memory (a 200 MiB file).
    """

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = self.size = 0
        self.error: OSError | None = None
        self.held: list[tuple[int, bytes]] = []  # (offset, data) written after the error, in order
        self.fail_next: int | None = None  # errno for the next write (HPCNN_FAULT enospc/eio)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.error is None:
            try:
                if self.fail_next is not None:
                    code, self.fail_next = self.fail_next, None
                    raise OSError(code, os.strerror(code))
                done = 0
                while done < len(data):
                    done += os.pwrite(self.fd, data[done:], self.pos + done)
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            self.held.append((self.pos, bytes(data)))
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        size = self.size - self.pos if size < 0 else size
        buf = bytearray(size)  # past the end of the file: zeros, as HDF5's own driver reads
        try:  # what reached the file (also after an error: the writes before it did)
            done = 0
            while done < size and (n := os.preadv(self.fd, [memoryview(buf)[done:]], self.pos + done)):
                done += n
        except OSError as exc:
            self.error = self.error or exc
        for offset, data in self.held:  # what HDF5 wrote after the error
            lo, hi = max(offset, self.pos), min(offset + len(data), self.pos + size)
            if lo < hi:
                buf[lo - self.pos : hi - self.pos] = data[lo - offset : hi - offset]
        self.pos += size
        return bytes(buf)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        memoryview(buf).cast("B")[: len(data)] = data
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        self.size = size
        return size

    def flush(self) -> None:
        pass  # every write went straight to the file; close() fsyncs

    def close(self) -> None:
        """fsync and close the file: where a full disk may first show (NFS, delayed allocation)."""
        try:
            if self.error is None:
                os.fsync(self.fd)
        except OSError as exc:
            self.error = exc
        finally:
            try:
                os.close(self.fd)
            except OSError as exc:
                self.error = self.error or exc


def _write_gathered(tmp, meta, grid, layers, bounds, buffers, fault) -> str | None:
    """Rank 0 writes everything; replica 0 of stage s (world rank s) sends it its buffers."""
    import h5py

    world = grid.world
    if not world.is_root:
        fault("checkpoint")
        if grid.replica == 0:
            for tag, (_, buf) in enumerate(buffers):
                world.Send(to_host(buf), dest=0, tag=tag)
        return world.bcast(None)
    failure, f, spool = None, None, None
    try:
        spool = _Spool(tmp)
        f = h5py.File(spool, "w", libver=LIBVER)
        spool.fail_next = faults.ERRNOS.get(fault("checkpoint"))
        _write_attrs(f, meta)
    except (OSError, ValueError) as exc:
        failure = str(exc)
    dtype = to_host(buffers[0][1]).dtype
    for stage in range(grid.stages):
        tensors = stage_tensors(layers, bounds[stage], bounds[stage + 1])
        size = sum(math.prod(shape) for _, _, shape in tensors)
        for tag, (group, buf) in enumerate(buffers):
            if stage == 0:
                flat = to_host(buf)
            else:  # always receive, even after a failure: the sender must not be left waiting
                flat = np.empty(size, dtype)
                world.Recv(flat, source=stage, tag=tag)
            if failure is not None:
                continue
            try:
                for key, offset, shape in tensors:
                    values = flat[offset : offset + math.prod(shape)].reshape(shape)
                    _create(f, f"{group}/{key}", shape, dtype)[...] = values
                    if spool.error is not None:  # HDF5's writes now go to memory: write no more
                        break
            except (OSError, ValueError) as exc:
                failure = str(exc)
            if spool.error is not None:
                failure = failure or str(spool.error)
    try:
        if f is not None:
            f.close()
    except (OSError, ValueError) as exc:
        failure = failure or str(exc)
    if spool is not None:
        spool.close()
        failure = failure or (str(spool.error) if spool.error is not None else None)
    return world.bcast(failure)


def _write_mpio(tmp, meta, grid, layers, bounds, buffers, fault) -> str | None:
    """Every rank opens the file; each tensor is one collective write by its stage's replicas.

    ``save`` checks the free space first. A write error during the write itself (a disk that
    filled meanwhile, a quota) is not reliably survivable here: parallel HDF5 cannot close a file
    it failed to write, and a rank-local error can leave the ranks in different collective calls
    inside HDF5 (measured with Open MPI 4.1 and HDF5 1.10 on a full tmpfs: a hang, or a segfault in
    HDF5's clean-up at MPI_Finalize). The stall inspector ends such a job; the gathering writer,
    which keeps failed writes from HDF5, has no such case, and ``save`` uses it instead (with
    ``--checkpoint-io auto``) when less than ``MPIO_MARGIN`` x the estimate is free."""
    import h5py
    from h5py import h5fd, h5p, h5s

    world = grid.world
    dxpl = h5p.create(h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
    try:
        f = h5py.File(tmp, "w", driver="mpio", comm=world, libver=LIBVER)
    except (OSError, ValueError) as exc:
        failure = str(exc)
    else:
        failure = None
        # Outside the try: an injected exception (``raise``) is a rank failing alone, which ends
        # the job; caught here, it would leave this rank out of the collective writes below.
        injected = faults.ERRNOS.get(fault("checkpoint"))
        try:
            _write_attrs(f, meta)
            dtype = to_host(buffers[0][1]).dtype
            for stage in range(grid.stages):
                tensors = stage_tensors(layers, bounds[stage], bounds[stage + 1])
                for group, buf in buffers:
                    flat = to_host(buf)
                    for key, offset, shape in tensors:
                        dset = _create(f, f"{group}/{key}", shape, dtype)  # collective: all ranks
                        fspace = dset.id.get_space()
                        start, count = 0, 0
                        if grid.stage == stage:  # my replica writes a block of the rows
                            start, count = split_counts(shape[0], grid.replicas, grid.replica)
                        row = math.prod(shape[1:])
                        src = flat[offset + start * row : offset + (start + count) * row]
                        if count:
                            fspace.select_hyperslab((start,) + (0,) * (len(shape) - 1), (count, *shape[1:]))
                            mspace = h5s.create_simple((count, *shape[1:]))
                            src = src.reshape(count, *shape[1:])
                        else:  # take part in the collective write with nothing to write
                            fspace.select_none()
                            mspace = h5s.create_simple((1,))
                            mspace.select_none()
                            src = np.zeros(1, dtype)
                        dset.id.write(mspace, fspace, np.ascontiguousarray(src), dxpl=dxpl)
            # An injected write error is reported by this rank after it took part in every collective
            # call (a rank leaving them early would leave the others waiting).
            if injected is not None:
                failure = str(OSError(injected, os.strerror(injected)))
        except (OSError, ValueError) as exc:
            failure = failure or str(exc)
        try:
            f.flush()  # a write error shows here (h5py raises RuntimeError), not first inside close
        except (OSError, ValueError, RuntimeError) as exc:  # every rank must reach the agreement below
            failure = failure or str(exc)
        try:
            f.close()
        except Exception as exc:  # noqa: BLE001
            failure = failure or str(exc)
    # A rank that failed alone must not leave the others believing the file is good.
    failures = world.allgather(failure)
    return next((x for x in failures if x is not None), None)


def prune(directory, keep: int, written: Path) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints up to ``written`` (the one just written) in
    ``directory``. Newer-numbered files can only be unreadable ones that ``--resume auto``
    reported and skipped: they are neither counted nor deleted."""
    others = [p for p in checkpoints(directory) if step_of(p) < step_of(written)]
    doomed = others[max(keep - 1, 0) :]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# --- reading ----------------------------------------------------------------------------------


def step_of(path) -> int:
    return int(NAME.match(Path(path).name).group(1))


def checkpoints(directory) -> list[Path]:
    """The checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


@contextmanager
def _reading(path):
    """``path`` open for reading. Any error a damaged file raises, opening, reading or closing it,
    becomes a ``UserError`` naming the file."""
    try:
        f = open_h5(path, "checkpoint")
    except DAMAGE as exc:  # open_h5 turns OSErrors into UserErrors; a damaged superblock can raise others
        raise UserError(f"checkpoint {path} is not a readable HDF5 file ({exc})") from None
    try:
        with f:
            yield f
    except UserError:
        raise
    except DAMAGE as exc:
        raise UserError(f"checkpoint {path} is corrupt ({damage_reason(exc)})") from None


def damage_reason(exc: BaseException) -> str:
    # h5py raises KeyError for an object it cannot open; str() of a KeyError quotes its message.
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return f"{type(exc).__name__}: {text}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inspect(path) -> Info:
    """Read what a checkpoint holds (attributes only); ``UserError`` if it is not one hpcnn reads
    or cannot be decoded. The attributes are not checked against their digest: ``verify`` does."""
    with _reading(path) as f:
        return _info(path, f, _format_version(path, f))


def _info(path, f, version: int) -> Info:
    """``inspect`` of the open checkpoint ``f`` (of ``version``)."""
    m, o, p, layout = f["model"].attrs, f["optimizer"].attrs, f["position"].attrs, f["layout"].attrs
    return Info(
        path=str(path),
        format_version=version,
        hpcnn_version=_text(f.attrs["hpcnn_version"]),
        created=_text(f.attrs["created"]),
        config=_text(f.attrs["config"]),
        architecture=json.loads(_text(m["architecture"])),
        description=_text(m["description"]),
        parameters=int(m["parameters"]),
        optimizer=_text(o["kind"]),
        optimizer_t=int(o["t"]),
        state_names=json.loads(_text(o["state"])),
        position=Position(
            int(p["step"]),
            int(p["epoch"]),
            int(p["batch"]),
            [float(v) for v in p["epoch_sums"]],
            json.loads(_text(p["history"])),
        ),
        seed=int(f["rng"].attrs["seed"]),
        layout={k: _text(v) if isinstance(v, (bytes, str)) else v.tolist() for k, v in layout.items()},
    )


def _format_version(path, f) -> int:
    """The format version of an hpcnn checkpoint this hpcnn reads; ``UserError`` for other files."""
    if _text(f.attrs.get("kind", "")) != KIND:
        raise UserError(f"{path} is not an hpcnn checkpoint (no kind = {KIND!r} attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version not in READS:
        raise UserError(
            f"checkpoint {path} has format_version {version}; this hpcnn {__version__} reads "
            f"format_version {' and '.join(map(str, READS))}"
        )
    return version


def verify(path, tensors: bool = True, progress=None) -> int:
    """Check a checkpoint in this process: for format 2, every attribute matches ``content_digest``;
    with ``tensors``, every dataset passes HDF5's Fletcher32 checks (per chunk, as it is read) and,
    for format 2, matches its ``tensor_digests`` entry; every attribute decodes (``inspect``).
    ``progress()`` is called after each step (an object's attributes, a chunk of rows). Returns
    the tensor bytes read (0 without ``tensors``).

    Raises ``UserError`` naming the file and what is damaged. HDF5 can loop forever on damaged
    metadata: whoever must not hang calls ``verify_bounded``."""
    tick = progress or (lambda: None)
    size = os.path.getsize(path)
    total = 0
    with _reading(path) as f:
        version = _format_version(path, f)
        attributes, datasets = _contents(f, tick)
        expected = None
        if version >= 2:  # the attributes are whole before anything is decoded from them
            if _text(attributes["/"].get("content_digest", "")) != content_digest(attributes):
                raise UserError(f"checkpoint {path}: its attributes do not match their content_digest")
            expected = json.loads(_text(attributes["/"]["tensor_digests"]))
            if sorted(expected) != datasets:
                raise UserError(f"checkpoint {path}: its datasets are not those its checksums list")
        for name in datasets if tensors else ():
            dset = f[name]
            if dset.fletcher32 is not True:
                raise UserError(f"checkpoint {path}: dataset {name} has no checksum")
            nbytes = dset.size * dset.dtype.itemsize
            if nbytes > size:  # a damaged shape; reading it could exhaust memory
                raise UserError(
                    f"checkpoint {path}: dataset {name} claims {nbytes} bytes; the file has {size}"
                )
            try:
                digest = _read_digest(dset, tick)
            except DAMAGE as exc:
                raise UserError(f"checkpoint {path}: dataset {name} is corrupt ({exc})") from None
            if expected is not None and digest != expected[name]:
                raise UserError(f"checkpoint {path}: dataset {name} does not match its tensor_digests entry")
            total += nbytes
        _info(path, f, version)  # every attribute decodes (for format 1, the only check its attributes get)
    return total


def _contents(f, tick) -> tuple[dict, list]:
    """Every object's attributes (``{path: {name: value}}``, objects that have any, the root as
    ``/``) and the dataset names, sorted."""
    names = []
    f.visit(names.append)
    attributes, datasets = {}, []
    for name in ["/", *names]:
        obj = f[name]
        if hasattr(obj, "shape"):
            datasets.append(name)
        attrs = {key: obj.attrs[key] for key in obj.attrs}
        if attrs:
            attributes[name] = attrs
        tick()
    return attributes, sorted(datasets)


def _read_digest(dset, tick) -> str:
    """``tensor_digest`` of a dataset, read a chunk of rows at a time."""
    h = _tensor_hash(dset.dtype, dset.shape)
    rows = dset.chunks[0]
    for start in range(0, dset.shape[0], rows):
        h.update(np.ascontiguousarray(dset[start : start + rows]).data)
        tick()
    return h.hexdigest()


STARTUP_S = 60.0  # the verifying child's start-up allowance, before its stall clock runs


def verify_bounded(path, tensors: bool = True, stall: float = VERIFY_STALL_S) -> int:
    """``verify`` in a child process, stopped when it shows no progress for ``stall`` seconds.

    The child imports no MPI, so an MPI rank can call this. Returns the tensor bytes verified;
    raises ``UserError`` naming the file if it is missing or damaged, or its verification hung
    or crashed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    # The child does no BLAS work: one thread, not one per core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # This very hpcnn, whatever the working directory holds (``-m`` would look there first).
    here = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.insert(0, {here!r}); "
        "from hpcnn.io.checkpoints import verify_child; sys.exit(verify_child(sys.argv[2:]))"
    )
    cmd = [sys.executable, "-c", code, CHILD, str(path), f"{stall:g}"]
    proc = subprocess.Popen(
        cmd + ([] if tensors else ["--no-tensors"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # Out of the terminal's process group: a Ctrl-C is the training's to handle (it stops
        # after a step), not a reason to call this file corrupt. Orphaned, it ends by its alarm.
        start_new_session=True,
    )
    out, err = _collect(proc, stall)
    if out is None or proc.returncode == -signal.SIGALRM:  # stopped by us, or by its own alarm
        raise UserError(
            f"checkpoint {path} is corrupt: its verification made no progress for {stall:g} s and was "
            "stopped (HDF5 can loop forever on damaged metadata)"
        )
    last = (err.strip().splitlines() or [""])[-1].removeprefix("hpcnn: error: ")
    words = out.split()  # dots, then the bytes read
    if proc.returncode == 0 and words and words[-1].isdigit():
        return int(words[-1])
    if proc.returncode == 2 and last:
        raise UserError(last)
    if -proc.returncode in CRASHES:
        crash = signal.Signals(-proc.returncode).name
        raise UserError(f"checkpoint {path} is corrupt: its verification crashed ({crash})")
    code = proc.returncode
    ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
    raise UserError(
        f"checkpoint {path} could not be verified: its verification {ended}" + (f": {last}" * bool(last))
    )


def _collect(proc, stall: float) -> tuple[str | None, str]:
    """``proc``'s stdout and stderr once it has ended; stdout is ``None`` if it was killed because
    its stdout stayed silent for ``stall`` seconds."""
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    data, stalled = {out: b"", err: b""}, False
    poller = select.poll()  # not select(): it fails on descriptors >= 1024 (a large job's rank 0)
    for fd in data:
        poller.register(fd, select.POLLIN)
    live = set(data)
    # The clock starts once the child speaks: its interpreter's start-up (numpy, h5py) on a loaded
    # node is not a verification making no progress.
    heard = time.monotonic() + STARTUP_S
    try:
        while live and not stalled:
            ready = poller.poll(1000 * max(0.0, heard + stall - time.monotonic()))
            stalled = not ready
            for fd, _ in ready:
                chunk = os.read(fd, 1 << 16)
                data[fd] += chunk
                if not chunk:
                    live.discard(fd)
                    poller.unregister(fd)
                elif fd == out:
                    heard = time.monotonic()
        if not stalled:
            try:
                proc.wait(timeout=stall)  # its output is closed: it is exiting
            except subprocess.TimeoutExpired:
                stalled = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    text = {fd: chunk.decode(errors="replace") for fd, chunk in data.items()}
    return (None if stalled else text[out]), text[err]


def read_stage(path, layers, first: int, stop: int, params, state: dict) -> None:
    """Fill this stage's flat parameter and optimizer-state buffers from ``path``."""
    tensors = stage_tensors(layers, first, stop)
    targets = [("model", params.data)] + [(f"optimizer/{n}", state[n]) for n in sorted(state)]
    with _reading(path) as f:
        for group, flat in targets:
            for key, offset, shape in tensors:
                name = f"{group}/{key}"
                if name not in f:
                    raise UserError(f"checkpoint {path} has no dataset {name}")
                dset = f[name]
                if tuple(dset.shape) != shape:
                    raise UserError(f"checkpoint {path}: {name} has shape {dset.shape}, expected {shape}")
                try:
                    values = dset[...]
                except DAMAGE as exc:
                    raise UserError(f"checkpoint {path}: dataset {name} is corrupt ({exc})") from None
                flat[offset : offset + math.prod(shape)] = values.reshape(-1)


CHILD = "--verify-child"  # argv[1] of the process verify_bounded starts
# What a child reading a damaged file can die of (the rest are someone else's signals).
CRASHES = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL)


def verify_child(argv) -> int:
    """The child ``verify_bounded`` starts (argv ``--verify-child FILE STALL [--no-tensors]``):
    ``verify`` with a dot on stdout for each step, then the tensor bytes read; exit code 2 and
    the message if damaged.

    Each step also re-arms an alarm a little beyond ``STALL``: SIGALRM's default action ends this
    process even inside HDF5's C code, so it ends by itself should its parent be gone."""
    alarm = math.ceil(float(argv[1])) + 5
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # an ignored signal would stay ignored across exec

    def beat():
        signal.alarm(alarm)
        sys.stdout.write(".")
        sys.stdout.flush()

    beat()
    try:
        total = verify(argv[0], "--no-tensors" not in argv, beat)
    except UserError as exc:
        print(f"hpcnn: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{total}")
    return 0
