"""Pipeline == serial: every (stages P, replicas D) grid that fits in the world, every schedule.

Each layout runs on the first P x D ranks of the world (the others wait), so one launch at 8 ranks
covers P in {2, 4} x D in {1, 2}; at 2 and 4 ranks the layouts that fit. The serial reference is
trained once, by rank 0 on COMM_SELF, and broadcast.
"""

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from hpcnn.config import Config
from hpcnn.errors import JobError
from hpcnn.parallel.comm import LAND, Comm
from hpcnn.train import fit

pytestmark = pytest.mark.mpi(min_size=2)

# 37 rows per global batch: uneven over 2 replicas (19 + 18) and over 3 or 4 micro-batches.
BASE = dict(hidden=[32, 16], dtype="float64", epochs=1, max_steps=8, eval_every=0, seed=3, batch_size=37,
            optimizer="sgd", lr=0.2, momentum=0.9)  # fmt: skip
LAYOUTS = [(p, d) for p in (2, 4) for d in (1, 2)]


@pytest.fixture(scope="module")
def reference(world):
    """Whole-model parameters and metrics of serial runs, keyed by the extra settings."""
    cache = {}

    def get(**extra):
        key = tuple(sorted(extra.items()))
        if key not in cache:
            ref = None
            if world.is_root:
                r = fit(Config(**{**BASE, **extra}), Comm.serial())
                ref = SimpleNamespace(params=r.model.params.data, history=r.history, final=r.final)
            cache[key] = world.bcast(ref)
        return cache[key]

    return get


def run_on_first_ranks(world, ranks, cfg):
    """``fit`` on world ranks 0..ranks-1; the whole model's parameters gathered on world rank 0."""
    inside = world.rank < ranks
    sub = world.Split(0 if inside else 1, world.rank)
    out = None
    if inside:
        result = fit(cfg, sub)
        grid = result.grid
        digest = hashlib.sha256(result.model.params.data.tobytes()).hexdigest()
        replicas_agree = len(set(grid.dp.allgather(digest))) == 1
        if grid.replica == 0:
            pieces = grid.pipe.gather(result.model.params.data, root=0) if grid.pipe else None
            if grid.stage == 0:
                # flat buffers are in backward order (last layer first): the last stage leads
                whole = np.concatenate(pieces[::-1]) if pieces else result.model.params.data
                out = SimpleNamespace(params=whole, history=result.history, final=result.final)
                out.bounds = result.bounds
        peaks = sub.gather((grid.stage, result.pipeline.times.peak_live), root=0)
        agree = sub.allreduce(replicas_agree, op=LAND)
        if out is not None:
            out.peaks, out.replicas_agree = peaks, agree
        grid.free()
    sub.Free()
    return out


def agreed_check(world, check):
    """Run ``check()`` (a list of problems) on rank 0 only; every rank passes or fails with it.

    A failure or exception on rank 0 alone would otherwise leave the ranks in different tests,
    waiting in each other's collectives until the CTest timeout.
    """
    problems = None
    if world.is_root:
        try:
            problems = check()
        except Exception as exc:  # noqa: BLE001  (reported on every rank below)
            problems = [f"{type(exc).__name__}: {exc}"]
    problems = world.bcast(problems)
    assert not problems, problems


def metrics(history):
    """Each epoch's training loss and accuracy and held-out loss, as one flat list of numbers."""
    values = [(row["loss"], row["accuracy"], row.get("test", {}).get("loss")) for row in history]
    return [float(v) for row in values for v in row if v is not None]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("micro", [1, 3, 4])
@pytest.mark.parametrize("stages,replicas", LAYOUTS)
def test_pipeline_equals_serial(world, reference, stages, replicas, micro, schedule):
    if stages * replicas > world.size:
        pytest.skip(
            f"{stages} stages x {replicas} replicas need {stages * replicas} ranks; world: {world.size}"
        )
    cfg = Config(**BASE, pipeline_stages=stages, micro_batches=micro, schedule=schedule)
    got = run_on_first_ranks(world, stages * replicas, cfg)
    ref = reference()

    def check():
        problems = []
        if not got.replicas_agree:
            problems.append("replicas of a stage hold different parameters")
        diff = np.abs(got.params - ref.params).max()
        if not diff < 1e-10:
            problems.append(f"max |pipeline - serial| = {diff:.3e}")
        if metrics(got.history) != pytest.approx(metrics(ref.history), rel=1e-10):
            problems.append(f"metrics {metrics(got.history)} != {metrics(ref.history)}")
        if not got.final["rows"] == ref.final["rows"] == 359:
            problems.append(f"evaluated {got.final['rows']} held-out rows")
        if got.final["loss"] != pytest.approx(ref.final["loss"], rel=1e-10):
            problems.append(f"held-out loss {got.final['loss']} != {ref.final['loss']}")
        for stage, peak in got.peaks:
            # 1F1B keeps at most P - stage micro-batches alive (<= P); GPipe all of them
            expected = min(stages - stage, micro) if schedule == "1f1b" else micro
            if peak != expected:
                problems.append(f"stage {stage}: {peak} micro-batches alive at once, expected {expected}")
        return problems

    agreed_check(world, check)


@pytest.mark.parametrize(
    "extra",
    [
        dict(stage_layers=[3]),  # an explicit cut (the balanced one is [1] for this network)
        dict(clip_norm=0.05),  # the norm is summed over the stages
        dict(optimizer="adamw", weight_decay=0.01, lr=0.01, loss="mse", activation="gelu"),
        dict(max_steps=0, drop_last=False),  # a whole epoch: the last batch has 32 rows
    ],
)
def test_pipeline_options_equal_serial(world, reference, extra):
    cfg = Config(**{**BASE, **extra}, pipeline_stages=2, micro_batches=3)
    got = run_on_first_ranks(world, 2, cfg)
    ref = reference(**{k: v for k, v in extra.items() if k != "stage_layers"})

    def check():
        problems = []
        diff = np.abs(got.params - ref.params).max()
        if not diff < 1e-10:
            problems.append(f"max |pipeline - serial| = {diff:.3e}")
        if metrics(got.history) != pytest.approx(metrics(ref.history), rel=1e-10):
            problems.append(f"metrics {metrics(got.history)} != {metrics(ref.history)}")
        if (got.final["loss"], got.final["rows"]) != pytest.approx(
            (ref.final["loss"], ref.final["rows"]), rel=1e-10
        ):
            problems.append(f"held-out {got.final} != {ref.final}")
        if "stage_layers" in extra and got.bounds != [0, 3, 5]:
            problems.append(f"partition {got.bounds}, asked for a cut at layer 3")
        return problems

    agreed_check(world, check)


def test_replicas_with_no_rows_and_tiny_held_out_sets(world, reference):
    """xor has 4 rows: with more replicas than rows some replicas (and micro-batches) are empty."""
    stages = 2 if world.size % 2 == 0 else 1
    cfg = Config(data="xor", batch_size=world.size, hidden=[8], activation="tanh", lr=0.05, epochs=20,
                 lr_schedule="constant", dtype="float64", pipeline_stages=stages,
                 micro_batches=3)  # fmt: skip
    got = run_on_first_ranks(world, world.size, cfg)

    def check():
        ref = fit(Config(**{**vars(cfg), "pipeline_stages": 1, "micro_batches": 1}), Comm.serial())
        problems = []
        if np.abs(got.params - ref.model.params.data).max() >= 1e-10:
            problems.append("parameters differ from serial")
        if got.final["rows"] != 4 or got.final["accuracy"] != ref.final["accuracy"]:
            problems.append(f"final {got.final} != {ref.final}")
        return problems

    agreed_check(world, check)


def test_invalid_layouts_are_agreed_errors(world):
    with pytest.raises(JobError, match=f"pipeline_stages = {world.size + 1} does not divide"):
        fit(Config(pipeline_stages=world.size + 1), world)
    with pytest.raises(JobError, match="pipeline_stages = 2 exceeds the model's 1 layers"):
        fit(Config(pipeline_stages=2, hidden=[], batch_size=64), world)
    with pytest.raises(JobError, match=r"stage_layers = \[4, 2\]"):
        fit(Config(pipeline_stages=3 if world.size % 3 == 0 else 2, stage_layers=[4, 2]), world)
