"""The decisions of ``--elastic``'s recovery, serially: the step the survivors go back to, the new
grid built from the stages they hold, the position at epoch boundaries, and the held state's round
trip. The jobs that kill real ranks are in test_elastic.py."""

from types import SimpleNamespace

import numpy as np

from hpcnn import Dense, ReLU
from hpcnn.core.norm import BatchNorm
from hpcnn.core.optim import Adam
from hpcnn.core.params import FlatParams
from hpcnn.parallel.elastic import Held, Survivor, _position, plan


def survivor(stage, done, steps, closed=0):
    return Survivor(stage, done, dict.fromkeys(steps, closed), 0.0, "forward/backward")


def test_survivors_go_back_to_the_fewest_steps_any_completed():
    """One survivor finished step 6's reduction and update, the others did not: all go back to 5,
    the one ahead from the copy it took at the start of step 6."""
    everyone = [survivor(0, 5, [5]), survivor(0, 6, [5, 6]), survivor(0, 5, [5])]
    assert plan(everyone, 1) == (5, {0: 0, 1: 1, 2: 2})


def test_every_rank_keeps_its_stage_and_whole_replicas_are_formed():
    """2 stages; survivors (old order) hold stages 0, 1, 0, 1, 0: two replicas, each rank keeps
    its stage (new rank % 2), the fifth rank is left out."""
    everyone = [survivor(s, 9, [9]) for s in (0, 1, 0, 1, 0)]
    step, keep = plan(everyone, 2)
    assert step == 9 and keep == {0: 0, 1: 1, 2: 2, 3: 3}
    assert all(keep[r] % 2 == everyone[r].stage for r in keep)
    # a replica rebuilt from pieces of two: stage 0 from one, stage 1 from the other
    step, keep = plan([survivor(1, 4, [4]), survivor(0, 4, [4])], 2)
    assert keep == {1: 0, 0: 1}


def test_a_stage_without_a_holder_at_the_step_means_the_checkpoint():
    assert plan([survivor(0, 3, [3]), survivor(0, 3, [3])], 2) == (None, {})
    # the only holder of stage 1 has moved on and kept no copy of step 3
    assert plan([survivor(0, 3, [3]), survivor(1, 4, [4])], 2) == (None, {})
    # a rank still setting up holds nothing
    assert plan([survivor(-1, -1, []), survivor(0, 3, [3])], 1) == (3, {1: 0})


def test_positions_at_epoch_boundaries():
    training = SimpleNamespace(sampler=range(10))  # 10 steps per epoch
    held = SimpleNamespace(sums=np.array([5.0, 3.0, 64.0]))
    row = {"epoch": 1}
    mid = _position(training, 13, held, [row])
    assert (mid.step, mid.epoch, mid.batch, mid.epoch_sums) == (13, 1, 3, [5.0, 3.0, 64.0])
    closed = _position(training, 10, held, [row])  # some survivor closed epoch 1: the next begins
    assert (closed.epoch, closed.batch, closed.epoch_sums, closed.history) == (1, 0, [0.0, 0.0, 0.0], [row])
    open_ = _position(training, 10, held, [])  # none had: its summary comes first, its sums carried
    assert (open_.epoch, open_.batch, open_.epoch_sums) == (0, 10, [5.0, 3.0, 64.0])


def test_the_held_state_round_trips_into_a_rebuilt_stage():
    """Parameters, Adam's moments and step count, BatchNorm's running statistics: copied at the
    start of a step, changed by the step, put back into a new stage: the old values exactly."""
    layers = [Dense(4, 8), BatchNorm(8), ReLU(), Dense(8, 2)]
    params = FlatParams(layers, np.float64)
    params.initialize(np.random.default_rng(0))
    opt = Adam().bind(params)
    rng = np.random.default_rng(1)
    for buf in (params.data, params.state, *opt.state.values()):
        buf[...] = rng.standard_normal(buf.shape)
    opt.t = 7
    before = [b.copy() for b in (params.data, params.state, *opt.state.values())]
    held = Held.like(params, opt)
    held.take(12, params, opt, np.array([1.0, 2.0, 3.0]), [{"epoch": 1}], 4)
    for buf in (params.data, params.state, *opt.state.values()):  # the step goes on changing them
        buf += 1.0
    opt.t = 8
    layers2 = [Dense(4, 8), BatchNorm(8), ReLU(), Dense(8, 2)]
    params2 = FlatParams(layers2, np.float64)
    opt2 = Adam().bind(params2)
    held.put(params2, opt2)
    after = [params2.data, params2.state, *opt2.state.values()]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after, strict=True))
    assert opt2.t == 7 and held.step == 12 and held.losses == 4 and held.finished == [{"epoch": 1}]
