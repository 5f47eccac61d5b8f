"""Pipeline pieces that need no MPI: partitions and schedules."""

import itertools

import numpy as np
import pytest

from hpcnn.core.layers import Dense
from hpcnn.core.model import Sequential, mlp_layers
from hpcnn.errors import UserError
from hpcnn.parallel.pipeline import balanced_partition, explicit_partition, gpipe_bubble, schedule_ops


def brute_force_best(costs, stages):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize(
    "costs", [[5, 1, 1, 1, 5], [1, 2, 3, 4, 5, 6, 7], [10, 0.1, 20, 0.1, 3], [1, 1, 1, 1], [3, 9, 3]]
)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balanced_partition_covers_every_layer_once_in_order_and_is_optimal(costs, stages):
    if stages > len(costs):
        with pytest.raises(AssertionError):
            balanced_partition(costs, stages)
        return
    bounds = balanced_partition(costs, stages)
    assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == stages + 1
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:], strict=True)), "every stage has a layer"
    worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert worst == pytest.approx(brute_force_best(costs, stages))


def test_flop_costs_of_the_default_network_put_the_big_layer_alone():
    layers = mlp_layers([64, 256, 128, 10], "relu")
    costs = Sequential.layer_flops(layers, 64)
    assert costs[0] == 6 * 64 * 256 and costs[2] == 6 * 256 * 128
    assert balanced_partition(costs, 2) == [0, 2, 5]


def test_explicit_partition():
    assert explicit_partition([2, 3], 5, 3) == [0, 2, 3, 5]
    for bad in ([3, 2], [0, 3], [2, 5], [2]):
        with pytest.raises(UserError, match="stage_layers"):
            explicit_partition(bad, 5, 3)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", [(1, 1), (2, 1), (2, 4), (4, 3), (4, 8), (3, 2)])
def test_schedules_run_each_micro_batch_once_forward_before_backward(kind, stages, micro):
    for stage in range(stages):
        ops = schedule_ops(kind, stage, stages, micro)
        assert sorted(ops) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        assert all(ops.index(("F", m)) < ops.index(("B", m)) for m in range(micro))
        # micro-batches go forward, and backward, in order: the Recv tags match the sends' order
        assert [m for op, m in ops if op == "F"] == list(range(micro))
        assert [m for op, m in ops if op == "B"] == list(range(micro))
        live = peak = 0
        for op, _ in ops:
            live += 1 if op == "F" else -1
            peak = max(peak, live)
        assert peak == (micro if kind == "gpipe" else min(stages - stage, micro))


def test_gpipe_bubble_formula():
    assert (
        gpipe_bubble(1, 4) == 0 and gpipe_bubble(2, 1) == 0.5 and gpipe_bubble(4, 4) == pytest.approx(3 / 7)
    )


def test_stage_starts_with_the_values_of_the_whole_model():
    whole = Sequential(mlp_layers([5, 7, 6, 3], "tanh"), np.float64)
    whole.params.initialize(np.random.default_rng(4))
    layers = mlp_layers([5, 7, 6, 3], "tanh")
    tail = Sequential(layers[2:], np.float64)
    tail.params.initialize(
        np.random.default_rng(4), skip=[s for layer in layers[:2] for s in layer.param_specs()]
    )
    assert isinstance(tail.layers[0], Dense)
    # flat buffers are in backward order: the tail's tensors lead the whole model's buffer
    assert np.array_equal(tail.params.data, whole.params.data[: tail.params.size])
