"""The stall inspector's diagnosis and deadlines, on hand-made rank states (no MPI needed)."""

import numpy as np

from hpcnn.parallel.inspector import OPS, Inspector, diagnose

OP = {name: i for i, name in enumerate(OPS)}


def state(*rows):
    return np.array([[step, OP[op], detail, age] for step, op, detail, age in rows], dtype=float)


def test_nothing_late_is_no_stall():
    s = state((5, "gradient allreduce", 0, 2.0), (5, "forward/backward", 0, 2.5))
    assert diagnose(s, np.zeros(2), lambda op: 10.0) is None


def test_waiting_ranks_and_the_rank_that_has_not_arrived_are_named():
    s = state(*[(7, "gradient allreduce", 0, 12.0)] * 3, (7, "forward/backward", 0, 12.5))
    text = diagnose(s, np.array([0.0, 0.4, 0.2, 0.9]), lambda op: 10.0)
    assert text.splitlines() == [
        "no progress for 13 s (deadline 10 s, see --stall-timeout)",
        "  waiting in gradient allreduce at step 7: ranks 0, 1, 2",
        "  not arrived: rank 3, in forward/backward at step 7 for 13 s",
    ]


def test_a_silent_rank_is_lost_and_pipeline_receives_name_their_stage():
    s = state((3, "pipeline receive", 1, 30.0), (3, "forward/backward", 0, 1.0))
    text = diagnose(s, np.array([0.0, 25.0]), lambda op: 20.0)
    assert "waiting in pipeline receive from stage 1 at step 3: ranks 0" in text
    assert "lost: rank 1, not heard from for 25 s (last seen in forward/backward at step 3)" in text


def test_a_rank_that_froze_as_the_others_began_to_wait_is_lost():
    """Rank 1 froze at step 2500 just after its heartbeat; rank 0 began waiting for it at the same
    moment, and the report comes as rank 0's wait passes the 30 s deadline: rank 1 has then been
    silent for a little less than 30 s, which is being lost, not late."""
    s = state((2500, "pipeline receive", 1, 30.05), (2497, "forward/backward", 0, 0.0))
    text = diagnose(s, np.array([0.0, 29.9]), lambda op: 30.0, slack=2.0)
    assert "lost: rank 1, not heard from for 30 s (last seen in forward/backward at step 2497)" in text
    assert "not arrived" not in text
    # a rank heard from a few seconds ago is late, not lost
    text = diagnose(s, np.array([0.0, 3.0]), lambda op: 30.0, slack=2.0)
    assert "not arrived: rank 1, in forward/backward at step 2497 for 3 s" in text and "lost" not in text
    # at a deadline under ten times the slack, a live rank's heartbeat may be that stale: not lost
    s = state((5, "gradient allreduce", 0, 8.5), (5, "forward/backward", 0, 0.0))
    text = diagnose(s, np.array([0.0, 7.0]), lambda op: 8.0, slack=2.0)
    assert "not arrived: rank 1, in forward/backward at step 5 for 7 s" in text and "lost" not in text


def test_finished_ranks_are_never_late():
    s = state((9, "done", 0, 500.0), (9, "done", 0, 500.0))
    assert diagnose(s, np.zeros(2), lambda op: 1.0) is None


def test_automatic_deadline_follows_the_longest_step():
    class Bare(Inspector):  # the deadline logic without a thread or a communicator
        def __init__(self, timeout):
            self.timeout, self.longest_step = timeout, 0.0

    auto = Bare(0.0)
    assert auto.deadline(OP["gradient allreduce"]) == 600.0  # no step finished yet
    auto.longest_step = 0.5
    assert auto.deadline(OP["gradient allreduce"]) == 60.0 and auto.deadline(OP["checkpoint"]) == 600.0
    auto.longest_step = 10.0
    assert auto.deadline(OP["forward/backward"]) == 200.0
    assert Bare(7.0).deadline(OP["setup"]) == 7.0
    # Stages waiting for another stage's evaluation get evaluation's allowance, not a step's.
    assert auto.deadline(OP["evaluation receive"]) == 600.0
