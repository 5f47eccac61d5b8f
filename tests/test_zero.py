"""The pieces of ``--zero``: shard bounds, buckets and staging, one-replica memory, the sharded
buffers of checkpoints (``Part``) and the configuration."""

import numpy as np
import pytest

from hpcnn import Dense, ReLU
from hpcnn.config import Config
from hpcnn.core.norm import BatchNorm
from hpcnn.core.params import FlatParams
from hpcnn.errors import UserError
from hpcnn.io.checkpoints.writers import Part
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.zero import pieces, resident_layers, shard_bounds, staging_sizes, zero_buckets


def test_shard_bounds_cover_the_buffer_contiguously_and_evenly():
    for size in (0, 1, 7, 323, 1000):
        for d in (1, 2, 3, 8):
            bounds = shard_bounds(size, d)
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            lengths = [hi - lo for lo, hi in bounds]
            assert max(lengths) - min(lengths) <= 1


def test_pieces_of_a_bucket_fall_in_the_replicas_parts():
    bounds = shard_bounds(10, 3)  # [0, 4), [4, 7), [7, 10)
    assert pieces(2, 8, bounds) == [2, 3, 1]
    assert pieces(4, 7, bounds) == [0, 3, 0]
    assert sum(pieces(0, 10, bounds)) == 10


def test_resident_layers_are_those_that_add_gradients_up_over_micro_batches():
    layers = [Dense(4, 8), BatchNorm(8), ReLU(), Dense(8, 2)]
    assert resident_layers(layers, 1) == set()  # one micro-batch: every gradient written once
    assert resident_layers(layers, 2) == {1}  # BatchNorm has no deferred weight_grads


def test_zero_buckets_put_each_resident_layer_alone():
    layers = [Dense(4, 8), BatchNorm(8), ReLU(), Dense(8, 2)]
    params = FlatParams(layers, np.float32)
    buckets = zero_buckets(params.slots, 1 << 20, 4, {1})
    assert [sorted(m) for _, _, m in buckets] == [[3], [1], [0]]  # (backward order)
    assert buckets[0][0] == 0 and buckets[-1][1] == params.size
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))


def test_the_staging_arena_holds_the_two_largest_consecutive_buckets():
    buckets = [(0, 10, {5}), (10, 40, {4}), (40, 45, {3}), (45, 80, {2}), (80, 81, {1})]
    assert staging_sizes(buckets, set()) == (40, 0)  # 35 + 5, not 30 + 35: never consecutive
    # the resident bucket kept apart: its neighbours 30 and 35 take turns in the arena
    assert staging_sizes(buckets, {2}) == (65, 5)


def test_a_part_gathers_on_one_rank():
    whole = np.arange(10.0)
    assert np.array_equal(Part(whole, 0, 10).gather(Comm.serial(), 3, 7), whole[3:7])


def test_zero_is_0_1_or_2():
    assert Config(zero=2).validate().zero == 2
    with pytest.raises(UserError, match="zero = 3: expected one of 0, 1, 2"):
        Config(zero=3).validate()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_one_replica_holds_what_zero_0_holds(level):
    from test_zero_mpi import formula_bytes, measured_bytes

    held, size, part = measured_bytes(Comm.serial(), level)
    assert part == size
    assert abs(held - formula_bytes(level, size, part, 1)) <= 0.05 * formula_bytes(0, size, size, 1)
    assert abs(held / size - 16) < 0.5  # 4 + 4 + 8 bytes per parameter: nothing to shard over


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 2), (2, 3, 4, 5), (1, 1), (5, 1, 3)])
def test_flat_blocks_select_exactly_a_flat_range_in_order(shape):
    """The hyperslabs the parallel writer selects for a replica's part of a tensor: every element of
    ``[a, z)`` once, nothing else, in C order, at most two per dimension."""
    from hpcnn.io.checkpoints.writers import flat_blocks

    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape)
    for a in range(n + 1):
        for z in range(a, n + 1):
            blocks = flat_blocks(shape, a, z)
            chosen = [index[tuple(slice(c, c + e) for c, e in zip(corner, extent, strict=True))].reshape(-1)
                      for corner, extent in blocks]  # fmt: skip
            assert list(np.concatenate(chosen or [np.zeros(0, int)])) == list(range(a, z)), (a, z, blocks)
            assert len(blocks) <= 2 * len(shape)
