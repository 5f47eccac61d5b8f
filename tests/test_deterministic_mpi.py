"""``--deterministic`` over MPI, at every world size CTest launches (2, 4, 8).

Every rank also trains the same configuration alone (``Comm.serial()``): the distributed run's
parameters must be **bitwise** the serial run's after 25 steps (an epoch boundary, the epoch's short
last batch with a short last shard, and a held-out evaluation included), for Adam and SGD with
momentum, float32 and float64, every data x pipeline layout that fits the world size, one and four
micro-batches; and so must every reported number (per-step losses, epoch loss and accuracy, the
held-out loss and accuracy, also when ``python -m hpcnn.evaluate`` scores the run's checkpoint at
another layout). The 3-rank case and a checkpoint written at 8 ranks and resumed at 2
are in ``test_deterministic.py`` (real launches).
"""

import os
import shutil
import tempfile

import pytest

from hpcnn.config import Config
from hpcnn.evaluate import score
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit

pytestmark = pytest.mark.mpi(min_size=2)

# The default network (digits, 64-256-128-10, batch 64) in shards of 4 rows: 16 shards per batch,
# so that 8 replicas, or 4 replicas x 4 micro-batches, all get rows. digits: 1438 training rows =
# 22 batches of 64 and one of 30 (7 shards of 4 and one of 2); 25 steps cross into epoch 2.
BASE = dict(deterministic=True, shard_rows=4, max_steps=25, epochs=2, clip_norm=0.5, run_dir="")
RECIPES = [
    dict(optimizer="adam", dtype="float32"),
    dict(optimizer="adam", dtype="float64"),
    dict(optimizer="sgd", momentum=0.9, lr=0.05, dtype="float32"),
    dict(optimizer="sgd", momentum=0.9, lr=0.05, dtype="float64"),
]


@pytest.fixture(scope="module")
def serial():
    """Each recipe trained on one rank (every rank computes it: nothing to communicate)."""
    comm = Comm.serial()
    return {i: fit(Config(**BASE, **recipe), comm) for i, recipe in enumerate(RECIPES)}


def layouts(size: int) -> list[int]:
    """Pipeline stage counts for this world size: pure data parallel, and the grids the
    deterministic promise names (2 x 2 and 1 x 4 at 4 ranks, 4 x 2 at 8; 1 x 2 at 2)."""
    return [1, 2, 4] if size == 4 else [1, 2]


def differences(result, reference) -> list[str]:
    """What differs between this rank's stage of ``result`` and the whole serial model."""
    problems = []
    params, whole = result.model.params, reference.model.params
    first = result.bounds[result.grid.stage]
    by_name = {(s.layer, s.name): s for s in whole.slots}
    for slot in params.slots:
        mine = params.view(params.data, slot)
        theirs = whole.view(whole.data, by_name[first + slot.layer, slot.name])
        if mine.dtype != theirs.dtype or mine.tobytes() != theirs.tobytes():
            problems.append(f"layer {first + slot.layer} {slot.name}")
    if result.pipeline.is_last and result.step_losses != reference.step_losses:
        problems.append("per-step losses")
    keys = ("loss", "accuracy", "test")
    if [{k: r.get(k) for k in keys} for r in result.history] != [
        {k: r.get(k) for k in keys} for r in reference.history
    ]:
        problems.append(f"epoch metrics {result.history} vs {reference.history}")
    if result.final != reference.final:
        problems.append(f"final evaluation {result.final} vs {reference.final}")
    return problems


@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("recipe", range(len(RECIPES)))
def test_every_layout_trains_bitwise_like_one_rank(world, serial, recipe, micro):
    problems = []
    for stages in layouts(world.size):
        cfg = Config(**BASE, **RECIPES[recipe], pipeline_stages=stages, micro_batches=micro)
        result = fit(cfg, world)
        grid = f"{world.size // stages} x {stages}"
        problems += [f"rank {world.rank}, {grid}: {p}" for p in differences(result, serial[recipe])]
    everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
    assert not everything, everything


def test_a_checkpoint_is_scored_with_the_training_runs_bits_at_every_layout(world, serial):
    """``python -m hpcnn.evaluate`` scores a deterministic run's checkpoint shard by shard too."""
    directory = world.bcast(tempfile.mkdtemp(prefix="hpcnn-det-") if world.is_root else None)
    try:
        fit(Config(**BASE, **RECIPES[0], checkpoint_dir=directory), world)
        path = os.path.join(directory, "ckpt-000000025.h5")
        expected = {k: serial[0].final[k] for k in ("loss", "accuracy", "rows")}
        problems = []
        for stages in layouts(world.size):
            for micro in (1, 3):
                got = score(path, "held-out", {"pipeline_stages": stages, "micro_batches": micro}, world)
                if {k: got[k] for k in expected} != expected:
                    problems.append(f"rank {world.rank}, {stages} stages, {micro} micro: {got} vs {expected}")
        everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
        assert not everything, everything
    finally:
        world.Barrier()
        if world.is_root:
            shutil.rmtree(directory, ignore_errors=True)
