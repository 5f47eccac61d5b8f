"""BatchNorm and Dropout at N ranks: data parallel equals one rank (statistics over the global
batch, masks by global row), bitwise in deterministic mode, and a 2-stage pipeline equals serial."""

import numpy as np
import pytest
from test_norm import data

from hpcnn import BatchNorm, Dense, Dropout, ReLU, Trainer
from hpcnn.parallel.comm import Comm


def model():
    return [Dense(6, 12), BatchNorm(12), ReLU(), Dropout(0.3), Dense(12, 8), BatchNorm(8), ReLU(),
            Dense(8, 3)]  # fmt: skip


SETTINGS = dict(loss="cross_entropy", batch_size=20, epochs=2, lr=0.05, dtype="float64", log=None,
                eval_every=0, lr_schedule="constant", optimizer="sgd")  # fmt: skip


def agreed(world, problems: list) -> None:
    everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
    assert not everything, everything


def compare(world, alone, together, exact: bool) -> list:
    """The whole model's parameters and layer state, gathered from the stages, against one rank's."""
    problems = []
    bounds, stage = together.bounds, together.grid.stage
    first = bounds[stage]
    for i, layer in enumerate(together.model.layers):
        mine, theirs = layer, alone.model.layers[first + i]
        for name in ("W", "b", "g", "running_mean", "running_var"):
            a, b = getattr(theirs, name, None), getattr(mine, name, None)
            if a is None:
                continue
            same = np.array_equal(a, b) if exact else np.max(np.abs(a - b)) < 1e-10
            if not same:
                problems.append(
                    f"rank {world.rank}: layer {first + i} {name} differs by {np.max(np.abs(a - b))}"
                )
    return problems


def fit(layers, comm, **kw):
    return Trainer(layers, data(rows=100), comm=comm, **dict(SETTINGS, **kw)).fit()


@pytest.mark.mpi(min_size=2)
def test_data_parallel_batchnorm_and_dropout_equal_one_rank(world):
    alone, together = fit(model(), Comm.serial()), fit(model(), world)
    problems = compare(world, alone, together, exact=False)
    summed = world.allreduce(np.array(together.step_losses))  # each rank's loss sum of its rows
    if np.max(np.abs(np.array(alone.step_losses) - summed)) > 1e-10:
        problems.append(f"rank {world.rank}: step losses differ")
    if abs(alone.final["loss"] - together.final["loss"]) > 1e-10:
        problems.append(f"rank {world.rank}: final loss {alone.final} != {together.final}")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_deterministic_mode_is_bitwise_one_rank(world):
    kw = dict(deterministic=True, shard_rows=4, dtype="float32")
    alone, together = fit(model(), Comm.serial(), **kw), fit(model(), world, **kw)
    problems = compare(world, alone, together, exact=True)
    if together.grid.stage == together.grid.stages - 1 and alone.step_losses != together.step_losses:
        problems.append(f"rank {world.rank}: step losses differ")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_two_stage_pipeline_equals_serial(world):
    if world.size % 2:
        pytest.skip("2 stages need an even number of ranks")
    alone = fit(model(), Comm.serial())
    piped = fit(model(), world, pipeline_stages=2, stage_layers=[3])
    problems = compare(world, alone, piped, exact=False)
    agreed(world, problems)
