"""Convolutional networks at N ranks compute what one rank computes.

A small conv net with BatchNorm and Dropout (statistics reduced over the replicas, masks keyed by
global row) trained data parallel, in a data-parallel x pipeline grid and in deterministic mode
equals the same training on one rank (``Comm.serial()``, on every rank); a checkpoint written at
every rank count resumes on two ranks to the uninterrupted result.
"""

import os

import numpy as np
import pytest

import hpcnn
from hpcnn import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Trainer
from hpcnn.parallel.comm import Comm

SETTINGS = dict(
    dtype="float64", batch_size=24, epochs=2, lr=0.05, momentum=0.9, optimizer="sgd", seed=5,
    eval_every=0, lr_schedule="constant", log=None,
)  # fmt: skip


def images(rows=96, test_rows=24, seed=11):
    """(N, 1, 8, 8) images whose class is the quadrant holding a bright blob, as PyTorch lays them out."""
    rng = np.random.default_rng(seed)

    def part(n):
        y = rng.integers(0, 4, n)
        x = rng.normal(0.0, 0.3, (n, 1, 8, 8))
        for i, c in enumerate(y):
            r, col = 4 * (c // 2), 4 * (c % 2)
            x[i, 0, r + 1 : r + 3, col + 1 : col + 3] += 2.0
        return x, y

    return (*part(rows), *part(test_rows))


def cnn():
    return [
        Conv2D(1, 4, 3, padding=1), BatchNorm(4), ReLU(), MaxPool2D(2),
        Conv2D(4, 6, 3, stride=1, padding=1), ReLU(), Dropout(0.25), Flatten(),
        Dense(6 * 4 * 4, 16), BatchNorm(16), ReLU(), Dense(16, 4),
    ]  # fmt: skip


def agreed(world, problems: list) -> None:
    """Fail on every rank if any rank found a problem."""
    everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
    assert not everything, everything


def state_of(trainer) -> dict:
    """This rank's stage: parameters and layer state (running statistics), by global layer index."""
    first = trainer.result.bounds[trainer.result.grid.stage] if trainer.result else 0
    out = {}
    model = trainer.result.model
    for slot in model.params.slots:
        out[f"{first + slot.layer}/{slot.name}"] = model.params.view(model.params.data, slot)
    for slot in getattr(model.params, "state_slots", []):
        out[f"{first + slot.layer}/state/{slot.name}"] = model.params.view(model.params.state, slot)
    return out


def compare(world, ours: dict, reference: dict, atol: float, what: str) -> list:
    problems = []
    for key, value in ours.items():
        ref = reference[key]
        worst = float(np.max(np.abs(value - ref))) if atol else None
        same = np.array_equal(value, ref) if not atol else worst <= atol
        if not same:
            problems.append(f"rank {world.rank}, {what}: {key} differs (max {worst})")
    return problems


def serial_state(arrays, **settings) -> dict:
    """The whole model trained on one rank, by global layer index."""
    t = Trainer(cnn(), arrays, comm=Comm.serial(), **settings)
    t.fit()
    return state_of(t)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stages", [1, 2])
def test_a_conv_net_with_batchnorm_and_dropout_equals_one_rank(world, stages):
    if world.size % stages:
        pytest.skip(f"{stages} stages need a rank count divisible by {stages}")
    x, y, xt, yt = images()
    arrays = hpcnn.arrays(x, y, xt, yt)
    reference = serial_state(arrays, **SETTINGS)
    t = Trainer(cnn(), arrays, comm=world, pipeline_stages=stages, **SETTINGS)
    result = t.fit()
    problems = compare(world, state_of(t), reference, 1e-10, f"{stages} stage(s)")
    alone = Trainer(cnn(), arrays, comm=Comm.serial(), **SETTINGS)
    alone.fit()
    if abs(result.final["loss"] - alone.result.final["loss"]) > 1e-10:
        problems.append(f"rank {world.rank}: held-out loss {result.final} != {alone.result.final}")
    if np.max(np.abs(t.predict(xt) - alone.predict(xt))) > 1e-10:
        problems.append(f"rank {world.rank}: predictions differ")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stages", [1, 2])
def test_a_conv_net_trains_bitwise_like_one_rank_in_deterministic_mode(world, stages):
    if world.size % stages:
        pytest.skip(f"{stages} stages need a rank count divisible by {stages}")
    x, y, xt, yt = images()
    arrays = hpcnn.arrays(x, y, xt, yt)
    settings = dict(SETTINGS, dtype="float32", deterministic=True, shard_rows=3)
    reference = serial_state(arrays, **settings)
    t = Trainer(cnn(), arrays, comm=world, pipeline_stages=stages, **settings)
    t.fit()
    agreed(world, compare(world, state_of(t), reference, 0, f"deterministic, {stages} stage(s)"))


@pytest.mark.mpi(min_size=2)
def test_a_conv_net_checkpoint_written_at_n_ranks_resumes_at_two(world, shared):
    x, y, xt, yt = images()
    arrays = hpcnn.arrays(x, y, xt, yt)
    straight = serial_state(arrays, **SETTINGS)
    d = os.path.join(shared, "ckpt")
    first = Trainer(cnn(), arrays, comm=world, max_steps=5, checkpoint_dir=d, **SETTINGS).fit()
    assert first.steps == 5
    two = world.Split(0 if world.rank < 2 else 1, world.rank)
    problems = []
    try:
        if world.rank < 2:
            t = Trainer(cnn(), arrays, comm=two, checkpoint_dir=d, resume="auto", **SETTINGS)
            resumed = t.fit()
            if resumed.steps != 8:
                problems.append(f"rank {world.rank}: resumed run ended at step {resumed.steps}")
            problems += compare(world, state_of(t), straight, 1e-10, "resumed at 2 ranks")
    finally:
        two.Free()
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_with_micro_batches_batchnorm_uses_micro_batch_m_of_every_replica(world):
    """micro_batches = 2 in a 2-stage pipeline of R = size / 2 replicas computes what R replicas
    without a pipeline compute with the same 2 micro-batches (the same groups of rows), and not
    what whole-batch statistics give."""
    if world.size % 2:
        pytest.skip("2 stages need an even number of ranks")
    x, y, xt, yt = images()
    arrays = hpcnn.arrays(x, y, xt, yt)
    settings = dict(SETTINGS, micro_batches=2)
    replicas = world.size // 2
    sub = world.Split(0 if world.rank < replicas else 1, world.rank)
    try:
        reference = None
        if world.rank < replicas:
            t = Trainer(cnn(), arrays, comm=sub, **settings)
            t.fit()
            reference = {k: np.array(v) for k, v in state_of(t).items()}
        reference = world.bcast(reference, root=0)
    finally:
        sub.Free()
    t = Trainer(cnn(), arrays, comm=world, pipeline_stages=2, **settings)
    t.fit()
    problems = compare(world, state_of(t), reference, 1e-10, "2 stages, 2 micro-batches")
    whole_batch = serial_state(arrays, **SETTINGS)
    if max(float(np.max(np.abs(reference[k] - whole_batch[k]))) for k in reference) < 1e-6:
        problems.append("micro-batch statistics gave what whole-batch statistics give")
    agreed(world, problems)
