"""The two writers of a checkpoint's HDF5 file, which produce the same datasets (same shapes,
chunks, filters, values):

- ``mpio`` (``write_mpio``; h5py built with parallel HDF5): every rank opens the file with the
  MPI-IO driver; each tensor is written collectively, the replicas of the owning stage each
  writing a block of its rows, all other ranks an empty selection.
- ``gather`` (``write_gathered``): rank 0 writes; replica 0 of each later stage sends its flat
  buffers to rank 0 one stage at a time (rank 0 holds one stage's state at a time, not the whole
  model's).

A buffer may be sharded over the replicas of its stage (``Part``: the optimizer state of
``--zero 1|2``, each replica holding a contiguous part of the flat buffer). ``mpio`` then has each
replica write its part of each tensor (a flat range of it: a few hyperslabs, ``flat_blocks``) in
the same collective write; ``gather`` gathers the parts to replica 0 of the stage (one whole flat
buffer at a time) and sends it on as before. Both give the same datasets, so a checkpoint never
shows the layout it was written from.

Each returns the failure every rank agrees on (``None``: written); ``save`` (``writing``) chooses
the writer and owns the file's name. HDF5 never sees a failed write from the gathering writer
(``_Spool``): after one, HDF5's file state is broken and its own close crashes the process.
Datasets are chunked in whole rows (``chunk_shape``) and checksummed by HDF5's Fletcher32 filter.
"""

import math
import os

import numpy as np

from hpcnn.core.backend import to_host
from hpcnn.io.checkpoints.fileformat import LIBVER, group_tensors
from hpcnn.io.datasets.sampler import split_counts
from hpcnn.parallel import faults


class Part:
    """This rank's part ``[lo, lo + len(local))`` of a ``size``-element flat buffer whose other parts
    the other replicas of its stage hold, in replica order (``hpcnn.parallel.zero.shard_bounds``)."""

    def __init__(self, local, lo: int, size: int):
        self.local, self.lo, self.size = local, lo, size

    def gather(self, dp, start: int, stop: int, root: int = 0):
        """Elements ``[start, stop)`` of the whole buffer on replica ``root`` of ``dp`` (``None``
        elsewhere); collective over ``dp``."""
        from mpi4py import MPI

        from hpcnn.parallel.zero import pieces, shard_bounds  # (the parts' layout is the optimizer's)

        local = to_host(self.local)
        bounds = shard_bounds(self.size, dp.size)
        assert bounds[dp.rank] == (self.lo, self.lo + len(local)), (bounds, self.lo, len(local))
        counts = pieces(start, stop, bounds)
        displs = [sum(counts[:q]) for q in range(dp.size)]
        a = max(start, self.lo)
        send = local[a - self.lo : a - self.lo + counts[dp.rank]]
        out = np.empty(stop - start, local.dtype) if dp.rank == root else None
        kind = MPI.DOUBLE if local.dtype == np.float64 else MPI.FLOAT
        dp.Gatherv(send, [out, counts, displs, kind] if out is not None else None, root=root)
        return out


def flat_blocks(shape: tuple, a: int, z: int) -> list[tuple[tuple, tuple]]:
    """Elements ``[a, z)`` of a C-ordered array of ``shape`` as hyperslabs ``(corner, extent)``, in
    order (a partial first row, whole rows, a partial last row, recursively: at most two per
    dimension), for a parallel write of a flat part of a tensor."""
    if z <= a:
        return []
    if len(shape) == 1:
        return [((a,), (z - a,))]
    inner = math.prod(shape[1:])
    r0, r1 = a // inner, (z - 1) // inner

    def within(r, lo, hi):  # a piece of row r
        return [((r, *c), (1, *e)) for c, e in flat_blocks(shape[1:], lo - r * inner, hi - r * inner)]

    if r0 == r1:
        return within(r0, a, z)
    out, first, stop = [], r0, r1 + 1
    if a % inner:
        out += within(r0, a, (r0 + 1) * inner)
        first = r0 + 1
    if z % inner:
        stop = r1
    if stop > first:
        out.append(((first, *(0,) * (len(shape) - 1)), (stop - first, *shape[1:])))
    if z % inner:
        out += within(r1, r1 * inner, z)
    return out


def whole(buf, dp):
    """A buffer as replica 0 of its stage writes it: the whole flat buffer (a ``Part``: gathered
    there, collectively, ``None`` elsewhere)."""
    return buf.gather(dp, 0, buf.size) if isinstance(buf, Part) else to_host(buf)


CHUNK_BYTES = 1 << 20  # chunk size target: large enough for fast I/O, small enough to checksum often


def chunk_shape(shape: tuple, itemsize: int) -> tuple:
    """Whole rows, at most ~CHUNK_BYTES, in equal chunks: HDF5 stores a filtered dataset's edge
    chunk at full size, so 784 rows are cut 4 x 196, not 3 x 256 + 16 (padded to 256)."""
    row_bytes = math.prod(shape[1:]) * itemsize
    most = max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1)))
    count = -(-shape[0] // most)
    return (-(-shape[0] // count), *shape[1:])


def _create(f, key: str, shape: tuple, dtype):
    chunks = chunk_shape(shape, np.dtype(dtype).itemsize)
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


def write_gathered(tmp, meta, grid, layers, bounds, buffers, fault) -> str | None:
    """Rank 0 writes everything; replica 0 of stage s (world rank s) sends it its buffers."""
    import h5py

    world = grid.world
    if not world.is_root:
        fault("checkpoint")
        for tag, (_, buf) in enumerate(buffers):
            flat = whole(buf, grid.dp)  # (collective over the stage's replicas for a Part)
            if grid.replica == 0:
                world.Send(flat, dest=0, tag=tag)
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
        for tag, (group, buf) in enumerate(buffers):
            tensors = group_tensors(group, layers, bounds[stage], bounds[stage + 1])
            size = sum(math.prod(shape) for _, _, shape in tensors)
            if stage == 0:
                flat = whole(buf, grid.dp)
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


def write_mpio(tmp, meta, grid, layers, bounds, buffers, fault) -> str | None:
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
                for group, buf in buffers:
                    tensors = group_tensors(group, layers, bounds[stage], bounds[stage + 1])
                    part = isinstance(buf, Part)
                    flat = None if part else to_host(buf)
                    for key, offset, shape in tensors:
                        dset = _create(f, f"{group}/{key}", shape, dtype)  # collective: all ranks
                        fspace = dset.id.get_space()
                        start, count, row = 0, 0, math.prod(shape[1:])
                        if grid.stage == stage and part:  # my replica writes its part of the tensor
                            a = max(offset, buf.lo) - offset
                            z = min(offset + math.prod(shape), buf.lo + len(buf.local)) - offset
                            if z > a:
                                fspace.select_none()  # (a new dataspace selects everything)
                                for corner, extent in flat_blocks(shape, a, z):
                                    fspace.select_hyperslab(corner, extent, op=h5s.SELECT_OR)
                                mspace = h5s.create_simple((z - a,))
                                src = to_host(buf.local)[offset + a - buf.lo : offset + z - buf.lo]
                                dset.id.write(mspace, fspace, np.ascontiguousarray(src), dxpl=dxpl)
                                continue
                        elif grid.stage == stage:  # my replica writes a block of the rows
                            start, count = split_counts(shape[0], grid.replicas, grid.replica)
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
