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
``reduce_gradients`` waits for what is left before the optimizer touches the buffer. With
``overlap=False`` the whole buffer is reduced by one blocking ``Allreduce`` after backward. Both
sum the same values per element; at two ranks the result is bitwise the same (one addition), at
more ranks MPI may associate the sums differently for different message sizes, so the two agree to
rounding. mpi4py passes numpy buffers (and CuPy ones to a CUDA-aware MPI) without copies.
"""

from hpcnn.core.params import layer_ranges
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


class DataParallel:
    """Keep the replicas of ``params`` (a ``FlatParams``) in step over ``comm``.

    Parameters
    ----------
    comm : hpcnn.parallel.comm.Comm of the data-parallel group
    params : hpcnn.core.params.FlatParams of this rank's replica
    overlap : start each bucket's reduction during backward (``False``: one Allreduce after it)
    bucket_mb : bucket size in MiB
    clock : seconds (``MPI.Wtime``), for the time spent waiting on reductions
    """

    def __init__(self, comm, params, overlap: bool = True, bucket_mb: float = BUCKET_MB, clock=None):
        self.comm, self.params = comm, params
        self.overlap = overlap and comm.size > 1
        self.buckets = buckets(params.slots, int(bucket_mb * 2**20), params.grad.itemsize)
        self._bucket_of = {layer: b for b, (_, _, members) in enumerate(self.buckets) for layer in members}
        self._pending: list = []
        self._reset()
        self.clock = clock or (lambda: 0.0)
        self.wait_time = 0.0  # seconds blocked in reduce_gradients (the reduction not hidden)
        self.timeline = None  # an hpcnn.parallel.timeline.Timeline to record each bucket's reduction in
        self._began: dict = {}  # bucket -> when its reduction started (with a timeline only)

    def _reset(self) -> None:
        self._left = [len(members) for _, _, members in self.buckets]  # layers still in backward
        self._requests: list = [None] * len(self.buckets)

    def broadcast_parameters(self, root: int = 0) -> None:
        """Make every replica start from ``root``'s parameters."""
        self.comm.broadcast_(self.params.data, root)

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
        if self._pending and self.comm.testall(self._pending):
            self._pending.clear()
            self._completed()

    def _start(self, b: int) -> None:
        start, stop, _ = self.buckets[b]
        self._requests[b] = self.comm.iallreduce_sum_(self.params.grad[start:stop])
        self._pending.append(self._requests[b])
        if self.timeline is not None:
            self._began[b] = self.clock()

    def _completed(self) -> None:
        """Every started bucket's reduction is known complete now: record their spans."""
        if self.timeline is not None:
            now = self.clock()
            for b, began in self._began.items():
                start, stop, _ = self.buckets[b]
                nbytes = (stop - start) * self.params.grad.itemsize
                self.timeline.span(f"allreduce bucket {b}", began, now, COMMUNICATION, bytes=nbytes)
            self._began.clear()

    def reduce_gradients(self) -> None:
        """Sum the (already ``1 / global_rows``-scaled) gradients over the group, in place."""
        if self.comm.size == 1:
            return
        t0 = self.clock()
        if self.overlap:
            for b, request in enumerate(self._requests):
                if request is None:  # backward never reported it (e.g. no hook was passed)
                    self._start(b)
            self.comm.waitall(self._pending)
            self._pending.clear()
            self._completed()
            self._reset()
        else:
            self.comm.allreduce_sum_(self.params.grad)
            if self.timeline is not None:
                nbytes = self.params.grad.nbytes
                self.timeline.span("allreduce (blocking)", t0, self.clock(), COMMUNICATION, bytes=nbytes)
        self.wait_time += self.clock() - t0
