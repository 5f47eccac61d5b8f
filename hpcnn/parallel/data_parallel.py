"""Data parallelism: identical replicas, gradient reduction in buckets overlapped with backward.

Every rank holds the whole model (or the whole of its pipeline stage). Each rank backpropagates its
slice of the global batch with the loss scaled by ``1 / global_rows``, so summing the gradient
buffers over ranks gives exactly the mean over the global batch, even when slices differ in size
(or are empty).

The flat gradient buffer is laid out in the order backward produces it (``params.layout``: last
layer first), and cut into **buckets** of consecutive whole layers of at least ``bucket_bytes``.
When backward finishes the first layer of a bucket (the last one it reaches), that bucket is
complete, and its in-place non-blocking ``Iallreduce`` starts while backward continues on the
layers before it; between layers, ``Testall`` on the pending reductions lets MPI move them on.
``reduce`` waits for what is left before the optimizer touches the buffer. With
``overlap=False`` the whole buffer is reduced by one blocking ``Allreduce`` after backward. Both
sum the same values per element; at two ranks the result is bitwise the same (one addition), at
more ranks MPI may associate the sums differently for different message sizes, so the two agree to
rounding. mpi4py passes numpy buffers (and CuPy ones to a CUDA-aware MPI) without copies.
"""

from hpcnn.core.backend import xp
from hpcnn.core.optim import clip_grad_norm
from hpcnn.core.params import layer_ranges
from hpcnn.parallel.comm import IN_PLACE, SUM, Request
from hpcnn.parallel.sync import GradientSync
from hpcnn.parallel.timeline import COMMUNICATION

BUCKET_MB = 2.0  # default bucket size: a few buckets for a ~10 MB model, one per big layer


def buckets(slots, bucket_bytes: int, itemsize: int) -> list[tuple[int, int, set]]:
    """``(start, stop, layers)`` of each bucket: consecutive layers of the flat buffer (backward
    order) gathered until a bucket holds at least ``bucket_bytes``."""
    ranges = sorted(layer_ranges(slots).items(), key=lambda item: item[1][0])
    out, members, start = [], set(), 0
    for layer, (lo, hi) in ranges:
        if not members:
            start = lo
        members.add(layer)
        if (hi - start) * itemsize >= bucket_bytes:
            out.append((start, hi, members))
            members = set()
    if members:
        out.append((start, ranges[-1][1][1], members))
    return out


class DataParallel(GradientSync):
    """Keep the replicas of ``params`` (a ``FlatParams``) in step over ``comm`` (a ``GradientSync``).

    Parameters
    ----------
    comm : hpcnn.parallel.comm.Comm of the data-parallel group (rank ``r``: replica ``r``)
    params : hpcnn.core.params.FlatParams of this rank's replica
    overlap : start each bucket's reduction during backward (``False``: one Allreduce after it)
    bucket_mb : bucket size in MiB
    probe : the training's ``Probe``: each bucket's reduction becomes a span of its timeline
    stages : Comm of this replica's pipeline stages (``None``: one stage), for the clipping norm
    is_last : whether this rank holds the last stage (computes the loss)
    """

    REDUCTION = "allreduce"  # what the timeline calls a bucket's reduction

    def __init__(
        self, comm, params, overlap=True, bucket_mb=BUCKET_MB, probe=None, stages=None, is_last=True
    ):
        super().__init__(comm, params)
        self.overlap = overlap and comm.size > 1
        self.buckets = buckets(params.slots, int(bucket_mb * 2**20), params.grad.itemsize)
        self._bucket_of = {layer: b for b, (_, _, members) in enumerate(self.buckets) for layer in members}
        self._pending: list = []
        self._reset()
        self.probe, self.stages, self.is_last = probe, stages, is_last
        self._began: dict = {}  # bucket -> when its reduction started (with a timeline only)

    def _reset(self) -> None:
        self._left = [len(members) for _, _, members in self.buckets]  # layers still in backward
        self._requests: list = [None] * len(self.buckets)

    @property
    def on_layer_done(self):
        """The backward hook (``Sequential.backward(on_layer_done=...)``), ``None`` without overlap."""
        return self._layer_done if self.overlap else None

    def _layer_done(self, layer: int) -> None:
        b = self._bucket_of.get(layer)
        if b is not None:
            self._left[b] -= 1
            if self._left[b] == 0:
                self._start(b)
        if self._pending and Request.Testall(self._pending):
            self._pending.clear()
            self._completed()

    def _timeline(self):
        return None if self.probe is None else self.probe.timeline

    def _start(self, b: int) -> None:
        self._requests[b] = self._post(b)
        self._pending.append(self._requests[b])
        if self._timeline() is not None:
            self._began[b] = self.probe.clock()

    def _post(self, b: int):
        """Start bucket ``b``'s non-blocking reduction; return its request."""
        start, stop, _ = self.buckets[b]
        return self.comm.Iallreduce(IN_PLACE, self.params.grad[start:stop], op=SUM)

    def _reduce_whole(self) -> None:
        """The blocking reduction of the whole buffer (no overlap)."""
        self.comm.Allreduce(IN_PLACE, self.params.grad, op=SUM)

    def _completed(self) -> None:
        """Every started bucket's reduction is known complete now: record their spans."""
        timeline = self._timeline()
        if timeline is not None:
            now = self.probe.clock()
            for b, began in self._began.items():
                start, stop, _ = self.buckets[b]
                nbytes = (stop - start) * self.params.data.itemsize
                timeline.span(f"{self.REDUCTION} bucket {b}", began, now, COMMUNICATION, bytes=nbytes)
            self._began.clear()

    def metrics(self, global_rows, loss_sum, correct, rows, shard_losses):
        """Each last-stage rank counts its own rows (the running sums are reduced when reported)."""
        return ((loss_sum, correct, rows) if self.is_last else None), loss_sum

    def reduce(self, global_rows: int = 0) -> None:
        """Sum the (already ``1 / global_rows``-scaled) gradients over the group, in place."""
        if self.comm.size == 1:
            return
        if self.overlap:
            for b, request in enumerate(self._requests):
                if request is None:  # backward never reported it (e.g. no hook was passed)
                    self._start(b)
            Request.Waitall(self._pending)
            self._pending.clear()
            self._completed()
            self._reset()
        else:
            timeline = self._timeline()
            t0 = self.probe.clock() if timeline is not None else 0.0
            self._reduce_whole()
            if timeline is not None:
                nbytes = self.params.data.nbytes
                name = f"{self.REDUCTION} (blocking)"
                timeline.span(name, t0, self.probe.clock(), COMMUNICATION, bytes=nbytes)

    def sq_norm(self, max_norm: float = 0.0) -> tuple[float, float]:
        """This stage's squared norm (every replica holds the same reduced gradient); clipping
        adds the stages' values (collective across stages: every rank takes part, finite or not).
        Replica 0 of each stage counts its stage's share."""
        grad = self.params.grad
        sq = float(xp.dot(grad, grad))
        if max_norm:
            clip_grad_norm(grad, max_norm, self.stages.sum if self.stages is not None else None, sq)
        return sq, sq if self.comm.rank == 0 else 0.0
