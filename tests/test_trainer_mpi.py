"""The Trainer at N ranks: the API equals one rank; a user layer trains in a pipeline and resumes."""

import os

import numpy as np
import pytest
from test_trainer import SETTINGS, TrainerTestGain, data, mlp

import hpcnn
from hpcnn import Dense, ReLU, Trainer
from hpcnn.parallel.comm import Comm

# --- at N ranks -----------------------------------------------------------------------------------


def agreed(world, problems: list) -> None:
    """Fail on every rank if any rank found a problem."""
    everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
    assert not everything, everything


@pytest.mark.mpi(min_size=2)
def test_the_api_at_n_ranks_equals_one_rank(world):
    x, y, xt, yt = data(rows=200, features=12, classes=4)
    settings = dict(SETTINGS, dtype="float64", batch_size=40, log=None)
    alone = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), comm=Comm.serial(), **settings)
    together = Trainer(mlp(), hpcnn.arrays(x, y, xt, yt), comm=world, **settings)
    a, b = alone.fit(), together.fit()
    problems = []
    if np.max(np.abs(a.model.params.data - b.model.params.data)) > 1e-12:
        problems.append(f"rank {world.rank}: parameters differ")
    if np.max(np.abs(alone.predict(xt) - together.predict(xt))) > 1e-12:
        problems.append(f"rank {world.rank}: predictions differ")
    if abs(a.final["loss"] - b.final["loss"]) > 1e-12 or a.final["rows"] != b.final["rows"]:
        problems.append(f"rank {world.rank}: final {a.final} != {b.final}")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_user_layer_trains_in_a_two_stage_pipeline_and_resumes_bitwise(world, shared):
    if world.size % 2:
        pytest.skip("2 stages need an even number of ranks")
    x, y, xt, yt = data()
    model = lambda: [Dense(12, 16), TrainerTestGain(16), ReLU(), Dense(16, 4)]  # noqa: E731
    settings = dict(
        SETTINGS, pipeline_stages=2, micro_batches=2, lr_schedule="constant", comm=world, log=None
    )
    arrays = hpcnn.arrays(x, y, xt, yt)
    straight = Trainer(model(), arrays, **settings).fit()
    d = os.path.join(shared, "ckpt")
    first = Trainer(model(), arrays, **settings, max_steps=10, checkpoint_dir=d).fit()
    resumed = Trainer(model(), arrays, **settings, checkpoint_dir=d, resume="auto").fit()
    problems = []
    if first.steps != 10 or resumed.steps != straight.steps or len(straight.bounds) != 3:
        problems.append(f"rank {world.rank}: steps {first.steps}, {resumed.steps}, {straight.steps}")
    if not np.array_equal(resumed.model.params.data, straight.model.params.data):
        problems.append(f"rank {world.rank}: the resumed stage differs from the straight run's")
    if first.step_losses + resumed.step_losses != straight.step_losses:
        problems.append(f"rank {world.rank}: the step losses differ")
    gains = [layer for layer in straight.model.layers if isinstance(layer, TrainerTestGain)]
    if gains and not gains[0].g.any():  # the stage holding it trained it
        problems.append(f"rank {world.rank}: the gain did not train")
    agreed(world, problems)
