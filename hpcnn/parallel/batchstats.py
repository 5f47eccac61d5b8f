"""Batch statistics over the data-parallel replicas of a pipeline stage (``BatchNorm``).

A ``BatchNorm`` in training normalises with the statistics of its group of rows: the micro-batch's
rows on every replica of the stage. ``BatchStats.sum`` adds small float64 arrays of per-channel
sums over those replicas in place (one blocking ``Allreduce``); every replica's layers call it in
the same order (the same layers, the same schedule of micro-batches), so the calls pair up. It
runs on a ``Dup`` of the stage's data-parallel communicator: the gradient reduction's
non-blocking ``Iallreduce`` buckets, in flight on the original during backward, never meet it.
A model's ``Context.stats`` holds it (``hpcnn.core.model``); ``None`` there means one replica.
"""

from hpcnn.parallel.comm import IN_PLACE, SUM


class BatchStats:
    """``sum(values)``: ``values`` (float64, any shape) summed over ``comm``'s ranks, in place.

    Parameters
    ----------
    comm : hpcnn.parallel.comm.Comm of the stage's data-parallel replicas (collective: every rank
        of it constructs its ``BatchStats``)
    """

    def __init__(self, comm):
        self.comm = comm.Dup()

    def sum(self, values):
        self.comm.Allreduce(IN_PLACE, values, op=SUM)
        return values

    def close(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


def batch_stats(comm) -> BatchStats | None:
    """The stage's ``BatchStats`` over ``comm`` (collective), ``None`` for one replica."""
    return BatchStats(comm) if comm.size > 1 else None
