"""How rows are shared out among ranks: the per-rank epoch sampler and near-equal slices.

Sampling: each epoch's order is a permutation drawn from ``(seed, epoch)``, identical on every rank;
global batch ``b`` is rows ``[b*B, (b+1)*B)`` of it, split into ``size`` contiguous slices that
differ by at most one row (``split_counts``; whole shards of rows in deterministic mode,
``split_units``). Every row is used exactly once per epoch across all ranks, without padding; the
last partial batch is kept unless ``drop_last``. Private training samples each batch's rows
independently instead (``PoissonSampler``).
"""

import numpy as np

from hpcnn.core.privacy import poisson_batch, steps_per_epoch


def split_counts(n: int, parts: int, index: int) -> tuple[int, int]:
    """Start and length of slice ``index`` when ``n`` rows are cut into ``parts`` near-equal slices."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (index < extra)


def split_units(n: int, unit: int, parts: int, index: int) -> tuple[int, int]:
    """``split_counts`` in whole units of ``unit`` rows (only the last unit may be short): start and
    length, in rows, of slice ``index`` of ``n`` rows (``unit = 1`` is ``split_counts``)."""
    first, count = split_counts(-(-n // unit), parts, index)
    start = min(n, first * unit)
    return start, min(n, (first + count) * unit) - start


class EpochSampler:
    """Row ids of this rank's slice of every global batch.

    Parameters
    ----------
    ids : (rows,) the training row ids
    batch_size : global batch size (rows over all ranks)
    rank, size : this rank and the number of data-parallel ranks
    seed : shuffling seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``
    drop_last : drop the last batch if it is partial
    shard_rows : if set, each rank's slice is whole shards of this many consecutive rows
    """

    def __init__(self, ids, batch_size: int, rank: int, size: int, seed: int, drop_last=False, shard_rows=0):
        self.ids, self.batch_size, self.rank, self.size = ids, batch_size, rank, size
        self.seed, self.drop_last, self.shard_rows = seed, drop_last, shard_rows

    def __len__(self) -> int:
        n, b = len(self.ids), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch: int):
        """Yield ``(local_ids, global_rows)`` for each global batch of ``epoch``."""
        order = self.ids[np.random.default_rng((self.seed, 0xDA7A, epoch)).permutation(len(self.ids))]
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            # whole shards of shard_rows rows each (--deterministic), else near-equal rows
            start, count = split_units(len(batch), self.shard_rows or 1, self.size, self.rank)
            yield batch[start : start + count], len(batch)


class PoissonSampler:
    """Row ids of this rank's slice of Poisson-sampled global batches (private training).

    Each of ``round(1 / rate)`` batches of an epoch holds every training row with probability
    ``rate``, independently (``hpcnn.core.privacy.poisson_batch``, drawn from ``(seed, epoch,
    batch)`` identically on every rank); each rank keeps its near-equal slice of the rows drawn, so
    no row is read by two ranks. Batch sizes vary around ``rate * rows``; a batch may be empty.
    """

    def __init__(self, ids, rate: float, rank: int, size: int, seed: int):
        self.ids, self.rate, self.rank, self.size, self.seed = ids, rate, rank, size, seed
        self.batches = steps_per_epoch(rate)

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int):
        for b in range(self.batches):
            batch = poisson_batch(self.seed, epoch, b, self.ids, self.rate)
            start, count = split_counts(len(batch), self.size, self.rank)
            yield batch[start : start + count], len(batch)
