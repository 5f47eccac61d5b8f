"""``--zero 1|2``: optimizer state (and gradients) sharded over the data-parallel replicas of a stage.

With Adam in float32 a replica holds 16 bytes per parameter: parameters, gradients and two moments.
Every replica needs the whole parameters for its forward and backward, but the optimizer's update
is elementwise: replica ``r`` of ``d`` can update only its part ``[lo_r, hi_r)`` of the flat buffer
(``shard_bounds``: contiguous, near-equal, any parameter count), keeping only that part of the
optimizer state, if it gets that part of the reduced gradient and hands its updated parameters to
the others afterwards. ``ZeroSync`` (a ``GradientSync``) does this:

- **reduce**: each gradient bucket (the ``DataParallel`` buckets, started as backward completes
  them) is reduced with a non-blocking ``Ireduce_scatter`` instead of an ``Iallreduce``: the bucket
  is cut where the replicas' parts meet, and each replica receives the sum of its piece only (half
  an allreduce's traffic).
- **step**: the optimizer, bound to a ``FlatShard`` (this replica's part of the parameters and of
  the reduced gradient), updates ``[lo_r, hi_r)``; then ``Iallgatherv`` gives every replica every
  part (completed before ``step`` returns: everything after a step, evaluation, a checkpoint, the
  next forward, reads whole parameters).
- **the gradient norm** (clipping, the non-finite check, the records) is the sum of the parts'
  squared norms over the replicas (and the stages).

**Stage 1** keeps the whole gradient buffer (backward writes into it) and receives its part of
the reduced gradient into a buffer of its own: ``4 + 4 + 4 (k + 1) / d`` bytes per float32
parameter with ``k`` state buffers (Adam: ``k = 2``). **Stage 2** keeps only the gradient part
after the reduce-scatter: backward writes each bucket's gradients into one of two bucket-sized
*staging* arena (``Staging``: the layers' gradient views are rebound there) and the reduce-scatter
sends from it, so ``4 + 4 (k + 1) / d`` bytes per parameter plus the two largest consecutive
buckets. Arena memory is written again only after the reduce-scatter of the bucket that was there
finished, which needs every
gradient written once per step: with micro-batches, weight gradients are then formed once, after
the last backward (the pipeline's deferred weight-gradient pass, also on a single stage), and
layers that add up their gradients over micro-batches instead (normalisation layers, layers
without ``weight_grads``) keep theirs in a buffer of their own (``resident``), reduced with the
rest. This is what lets ZeRO 2 run with pipeline stages and micro-batches.

``--deterministic`` shards the optimizer state the same way (``ShardReducer``), keeping its
per-shard gradient buffers, so stage 2 is stage 1 there. The parameters a step produces are the
same values as unsharded (each element is updated by the same arithmetic from the same reduced
gradient; only which rank does it changes), and bitwise the same with ``--deterministic``.

Checkpoints stay layout-free: each replica's state is its part of the same whole tensors
(``hpcnn.io.checkpoints``), so a checkpoint of any zero level and layout resumes at any other.
"""

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.layers import Layer
from hpcnn.core.optim import clip_grad_norm
from hpcnn.core.params import FlatShard, layer_ranges
from hpcnn.io.datasets import split_counts
from hpcnn.parallel.comm import IN_PLACE, SUM
from hpcnn.parallel.data_parallel import BUCKET_MB, DataParallel

LEVELS = (0, 1, 2)


def shard_bounds(size: int, replicas: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` of each replica's part of a ``size``-element flat buffer (contiguous, in replica
    order, lengths differing by at most one)."""
    out = []
    for q in range(replicas):
        start, n = split_counts(size, replicas, q)
        out.append((start, start + n))
    return out


def pieces(start: int, stop: int, bounds) -> list[int]:
    """How many elements of ``[start, stop)`` fall in each replica's part."""
    return [max(0, min(stop, hi) - max(start, lo)) for lo, hi in bounds]


def resident_layers(layers, micro_batches: int) -> set:
    """Layers (indices into ``layers``) whose gradients are written before a step's last pass over
    them: with several micro-batches, those that add their gradients up per micro-batch rather
    than defer them to ``weight_grads`` (a layer defers if it defines ``weight_grads``)."""
    if micro_batches <= 1:
        return set()
    return {
        i
        for i, layer in enumerate(layers)
        if layer.param_specs() and type(layer).weight_grads is Layer.weight_grads
    }


def zero_buckets(slots, bucket_bytes: int, itemsize: int, resident: set) -> list[tuple[int, int, set]]:
    """``DataParallel``'s buckets (consecutive layers of at least ``bucket_bytes``), with each
    ``resident`` layer a bucket of its own."""
    ranges = sorted(layer_ranges(slots).items(), key=lambda item: item[1][0])
    out, members, start = [], set(), 0

    def close(stop):
        nonlocal members
        if members:
            out.append((start, stop, members))
            members = set()

    for layer, (lo, hi) in ranges:
        if layer in resident:
            close(lo)
            out.append((lo, hi, {layer}))
            continue
        if not members:
            start = lo
        members.add(layer)
        if (hi - start) * itemsize >= bucket_bytes:
            close(hi)
    if ranges:
        close(ranges[-1][1][1])
    return out


def plan(params, layers, level: int, replicas: int, replica: int, micro_batches: int, bucket_mb: float):
    """``(gradient elements, optimizer-state elements per state buffer)`` this replica holds at
    ``level`` (what ``ZeroSync`` allocates, computed without allocating: ``--dry-run``)."""
    lo, hi = shard_bounds(params.size, replicas)[replica]
    if level == 0 or replicas == 1:
        return params.size, params.size
    part = hi - lo
    if level == 1:  # the whole gradient, and the reduced part
        return params.size + part, part
    resident = resident_layers(layers, micro_batches)
    buckets = zero_buckets(params.slots, int(bucket_mb * 2**20), np.dtype(params.dtype).itemsize, resident)
    kept = {b for b, (_, _, m) in enumerate(buckets) if m & resident}
    arena, held = staging_sizes(buckets, kept)
    return part + arena + held, part


def staging_sizes(buckets, resident_buckets: set) -> tuple[int, int]:
    """``(arena, resident)`` elements of stage 2's staging for these buckets: the arena holds any
    two consecutive rotating buckets at its two ends."""
    rotating = [stop - start for b, (start, stop, _) in enumerate(buckets) if b not in resident_buckets]
    held = sum(stop - start for b, (start, stop, _) in enumerate(buckets) if b in resident_buckets)
    pairs = [a + b for a, b in zip(rotating, rotating[1:], strict=False)]
    return max(pairs + rotating, default=0), held


class Staging:
    """Stage 2's gradient storage, in place of a whole-model gradient buffer: the layers' gradient
    views are rebound into an *arena* where the rotating buckets take turns at its start and its
    end (bucket ``n`` overwrites bucket ``n - 2``, whose reduce-scatter is waited for first), sized
    for the largest two consecutive buckets; ``resident`` buckets (gradients added up over
    micro-batches) have a buffer of their own."""

    def __init__(self, layers, params, buckets, resident_buckets: set):
        size, kept = staging_sizes(buckets, resident_buckets)
        self.arena = xp.zeros(size, dtype=params.dtype)
        self.resident = xp.zeros(kept, dtype=params.dtype)
        self.turn, self.home = {}, {}  # rotating bucket -> 0 (arena start) or 1 (end); bucket -> view
        at, n = 0, 0
        for b, (start, stop, _) in enumerate(buckets):
            if b in resident_buckets:
                self.home[b] = self.resident[at : at + stop - start]
                at += stop - start
            else:
                self.turn[b], n = n % 2, n + 1
                self.home[b] = (
                    self.arena[: stop - start] if self.turn[b] == 0 else self.arena[size - (stop - start) :]
                )
        bucket_of = {layer: b for b, (_, _, members) in enumerate(buckets) for layer in members}
        for i, layer in enumerate(layers):
            mine = [s for s in params.slots if s.layer == i]
            if not mine:
                continue
            b = bucket_of[i]
            view, start = self.home[b], buckets[b][0]
            at = {s.name: s.offset - start for s in mine}
            grads = {s.name: view[at[s.name] : at[s.name] + s.size].reshape(s.shape) for s in mine}
            layer.bind({s.name: params.view(params.data, s) for s in mine}, grads)

    @property
    def nbytes(self) -> int:
        return int(self.arena.nbytes + self.resident.nbytes)

    def bucket(self, b: int):
        """Bucket ``b``'s gradients (a view of the arena or of the resident buffer)."""
        return self.home[b]


class ZeroSync(DataParallel):
    """Data parallelism with the optimizer state (``level`` 1) and the gradient (``level`` 2)
    sharded over ``comm`` (a ``GradientSync``; see the module's docstring).

    Parameters
    ----------
    comm, params, overlap, bucket_mb, probe, stages, is_last : as for ``DataParallel``
    level : 1 or 2
    layers : this stage's layers (stage 2 rebinds their gradient views)
    micro_batches : micro-batches per step (stage 2: which layers keep their own gradients)
    """

    REDUCTION = "reduce-scatter"

    def __init__(
        self, comm, params, level, layers, micro_batches=1, overlap=True, bucket_mb=BUCKET_MB,
        probe=None, stages=None, is_last=True,
    ):  # fmt: skip
        assert level in (1, 2), level
        d = comm.size
        self.level = level
        self.bounds = shard_bounds(params.size, d)
        self.lo, self.hi = self.bounds[comm.rank]
        staged = level == 2 and d > 1  # one replica: the part is the whole buffer, nothing to save
        # staging is reused only once its bucket has been sent: stage 2 reduces in the hook
        super().__init__(comm, params, overlap or staged, bucket_mb, probe, stages, is_last)
        self.staging = None
        if staged:
            resident = resident_layers(layers, micro_batches)
            self.buckets = zero_buckets(params.slots, int(bucket_mb * 2**20), params.grad.itemsize, resident)
            self._bucket_of = {layer: b for b, (_, _, m) in enumerate(self.buckets) for layer in m}
            self._reset()
            kept = {b for b, (_, _, m) in enumerate(self.buckets) if m & resident}
            self.staging = Staging(layers, params, self.buckets, kept)
            self.blocking = not overlap  # --overlap off: each bucket's reduction completes in the hook
            params.grad = None  # the whole gradient no longer exists: a use of it fails loudly
        # This replica's part of the reduced gradient: a buffer of its own. (An in-place
        # reduce-scatter into the whole gradient would save it, but MPICH 5.0 aborts on one whose
        # receiving piece starts the bucket: "memcpy argument memory ranges overlap".)
        self.grad = xp.zeros(self.hi - self.lo, dtype=params.dtype) if d > 1 else params.grad
        self.shard = FlatShard(params, self.lo, self.hi, self.grad)
        self._sq = None  # the stage's squared gradient norm, once ``reduce`` has summed it
        self._counts = [pieces(start, stop, self.bounds) for start, stop, _ in self.buckets]
        self._data_counts = [hi - lo for lo, hi in self.bounds]
        self._data_displs = [lo for lo, _ in self.bounds]

    def optimizer_params(self):
        """What the optimizer is bound to: this replica's ``FlatShard``."""
        return self.shard

    def _layer_done(self, layer: int) -> None:
        super()._layer_done(layer)
        if self.staging is None:
            return
        b = self._bucket_of.get(layer)
        if b is None or self._left[b] != 0:
            return
        if self.blocking:
            self._requests[b].Wait()
        # the next rotating bucket takes the arena's end the one before this one had: that one's
        # reduce-scatter must be done
        turn = self.staging.turn
        later = [n for n in range(b + 1, len(self.buckets)) if n in turn]
        if later:
            for n in range(b, -1, -1):
                if turn.get(n) == turn[later[0]] and self._requests[n] is not None:
                    self._requests[n].Wait()
                    break

    def _post(self, b: int):
        start, stop, _ = self.buckets[b]
        a, z = max(start, self.lo), min(stop, self.hi)
        send = self.params.grad[start:stop] if self.staging is None else self.staging.bucket(b)
        recv = self.grad[a - self.lo : max(a, z) - self.lo]
        return self.comm.Ireduce_scatter(send, recv, self._counts[b], op=SUM)

    def _reduce_whole(self) -> None:
        self.comm.Reduce_scatter(self.params.grad, self.grad, self._data_counts, op=SUM)

    def reduce(self, global_rows: int = 0) -> None:
        """Reduce every bucket; afterwards ``shard.grad`` holds this replica's part of the sum, and
        the stage's squared norm is known (summed over the parts here, in the reduction's phase: a
        rank late for it is late for the reduction)."""
        self._sq = None
        if self.comm.size == 1:
            return
        super().reduce(global_rows)
        self._sq = self.comm.sum(float(xp.dot(self.grad, self.grad)))

    def sq_norm(self, max_norm: float = 0.0) -> tuple[float, float]:
        """The stage's squared norm from the parts (summed over the replicas in ``reduce``; clipping
        adds the stages'); every replica counts its part's share."""
        mine = float(xp.dot(self.grad, self.grad))
        sq = mine if self._sq is None else self._sq
        if max_norm:
            clip_grad_norm(self.grad, max_norm, self.stages.sum if self.stages is not None else None, sq)
        return sq, mine

    def step(self, opt, lr: float) -> None:
        """Update this replica's part, then gather every part into every replica's parameters."""
        opt.step(lr)
        if self.probe is not None:
            self.probe("gather parameters")
        gather_parts(self.comm, self.params.data, self._data_counts, self._data_displs)
        if self.probe is not None:  # (a rank held up after the gather is not in it)
            self.probe("optimizer")

    def first_nonfinite(self):
        """The first layer (of this stage) whose gradient holds a non-finite value, over the
        replicas' parts (collective over the replicas); ``None`` if none."""
        none = 1 + max((s.layer for s in self.params.slots), default=0)
        found = none
        for slot in self.params.slots:
            a, z = max(slot.offset, self.lo), min(slot.offset + slot.size, self.hi)
            if z > a and not xp.isfinite(self.grad[a - self.lo : z - self.lo]).all():
                found = min(found, slot.layer)
        found = self.comm.min(found) if self.comm.size > 1 else found
        return None if found == none else found

    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank holds: the part, and the whole gradient (stage 1) or
        the staging (stage 2); one replica: the whole gradient, which is its part."""
        if self.comm.size == 1:
            return int(self.grad.nbytes)
        whole = self.params.grad.nbytes if self.staging is None else self.staging.nbytes
        return int(self.grad.nbytes + whole)


def gather_parts(comm, data, counts, displs) -> None:
    """Every replica's part of ``data`` (``counts[q]`` values at ``displs[q]``) to every replica.
    Non-blocking and waited for: MPICH's blocking ``Allgatherv`` took 18 ms for 7 MiB at two ranks
    with ``MPIR_CVAR_ENABLE_HEAVY_YIELD=1``, its ``Iallgatherv`` 1 ms."""
    if comm.size > 1:
        comm.Iallgatherv(IN_PLACE, [data, counts, displs, _mpi_type(data)]).Wait()


def _mpi_type(array):
    from mpi4py import MPI

    return MPI.DOUBLE if array.dtype == np.float64 else MPI.FLOAT
