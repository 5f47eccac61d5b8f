"""Private training at N ranks: the steps equal a brute-force DP-SGD (each example's gradient by its
own backward, clipped, summed, the keyed noise added) at every layout, pipeline stages included,
and a private run resumes exactly, privacy accountant included."""

import os

import numpy as np
import pytest
from test_trainer import data
from test_trainer_mpi import agreed

import hpcnn
from hpcnn import Dense, LayerNorm, ReLU, Trainer
from hpcnn.core.losses import LOSSES
from hpcnn.core.model import Sequential
from hpcnn.core.privacy import gaussian_noise, poisson_batch
from hpcnn.parallel.comm import Comm

PRIVATE = dict(
    dp_sgd=True, noise_multiplier=0.7, max_grad_norm=0.5, dtype="float64", batch_size=40, seed=4,
    optimizer="sgd", lr=0.5, lr_schedule="constant", eval_every=0, log_every=0, log=None,
)  # fmt: skip


def layers():
    return [Dense(12, 16), LayerNorm(16), ReLU(), Dense(16, 4, init="xavier")]


def reference(x, y, steps: int, **changes) -> Sequential:
    """DP-SGD by brute force over ``x, y`` (float64): the model after ``steps`` steps."""
    s = dict(PRIVATE, **changes)
    model = Sequential(layers(), np.float64)
    model.params.initialize(np.random.default_rng(s["seed"]))
    loss = LOSSES["cross_entropy"]()
    rate = s["batch_size"] / len(x)
    for step in range(steps):
        total = np.zeros(model.params.size)
        for i in poisson_batch(
            s["seed"], step // round(1 / rate), step % round(1 / rate), np.arange(len(x)), rate
        ):
            loss.forward(model.forward(x[i : i + 1].astype(np.float64)), y[i : i + 1])
            model.backward(loss.backward(1.0))
            g = model.params.grad
            total += g * min(1.0, s["max_grad_norm"] / np.linalg.norm(g))
        total /= s["batch_size"]  # the expected batch size
        std = s["noise_multiplier"] * s["max_grad_norm"] / s["batch_size"]
        for j, slot in enumerate(model.params.slots):  # tensors in model order: the noise's key
            total[slot.offset : slot.offset + slot.size] += gaussian_noise(
                s["seed"], step, j, slot.size, std, np.float64
            )
        model.params.data -= s["lr"] * total
    return model


def stage_differences(result, want: Sequential) -> float:
    """The largest difference between this rank's stage and the same tensors of ``want``."""
    first = result.bounds[result.grid.stage]
    mine, theirs = result.model.params, want.params
    by_name = {(s.layer, s.name): s for s in theirs.slots}
    worst = 0.0
    for s in mine.slots:
        t = by_name[(first + s.layer, s.name)]
        a = mine.data[s.offset : s.offset + s.size]
        worst = max(worst, float(np.max(np.abs(a - theirs.data[t.offset : t.offset + t.size]))))
    return worst


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("stages", [1, 2])
def test_private_steps_equal_brute_force_dp_sgd_at_every_layout(world, stages):
    if world.size % stages:
        pytest.skip(f"{stages} stages need a multiple of {stages} ranks")
    x, y, xt, yt = data(rows=200)
    steps = 3
    result = Trainer(
        layers(), hpcnn.arrays(x, y, xt, yt), comm=world, epochs=1, max_steps=steps,
        pipeline_stages=stages, micro_batches=2, **PRIVATE,
    ).fit()  # fmt: skip
    want = reference(x, y, steps)
    problems = []
    if stage_differences(result, want) > 1e-12:
        problems.append(f"rank {world.rank}: parameters differ by {stage_differences(result, want):.3g}")
    if result.privacy["steps"] != steps or result.privacy["noise_multiplier"] != 0.7:
        problems.append(f"rank {world.rank}: privacy {result.privacy}")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_private_run_resumes_exactly_on_another_layout(world, shared):
    x, y, xt, yt = data(rows=200)
    arrays = hpcnn.arrays(x, y, xt, yt)
    settings = dict(PRIVATE, epochs=3, optimizer="adam", lr=0.01)
    straight = Trainer(layers(), arrays, comm=world, **settings).fit()
    d = os.path.join(shared, "private-ckpt")
    if world.rank == 0:  # written at N ranks, resumed on one: the layout changes
        first = Trainer(layers(), arrays, comm=Comm.serial(), **settings, max_steps=7, checkpoint_dir=d).fit()
        assert first.privacy["steps"] == 7
    world.Barrier()
    resumed = Trainer(layers(), arrays, comm=world, **settings, checkpoint_dir=d, resume="auto").fit()
    problems = []
    if np.max(np.abs(resumed.model.params.data - straight.model.params.data)) > 1e-12:
        problems.append(f"rank {world.rank}: the resumed run differs from the straight one")
    if resumed.privacy != straight.privacy or resumed.privacy["steps"] != straight.steps:
        problems.append(f"rank {world.rank}: privacy {resumed.privacy} != {straight.privacy}")
    if [r["epsilon"] for r in resumed.history] != [r["epsilon"] for r in straight.history]:
        problems.append(f"rank {world.rank}: epsilon per epoch differs")
    agreed(world, problems)
