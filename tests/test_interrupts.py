"""Ctrl-C and frozen ranks in real 4-rank jobs: every process gone in time, one message, the right
exit code, and a checkpoint that resumes.

Ctrl-C reaches a job as SIGINT to MPICH's mpiexec (which forwards it to every rank), or to the
ranks themselves (``srun`` forwards it; a user may signal one process). Open MPI's mpirun does not
forward it: it ends the job itself (``test_ctrl_c_to_open_mpis_mpirun_...``). A frozen rank is a process
stopped by SIGSTOP (the ``freeze`` fault): every thread in it stops, heartbeats included.
"""

import re
import signal
import time

import h5py
import numpy as np
import pytest
from launch import Job, forwards_ctrl_c

from hpcnn.io.checkpoints import checkpoints, step_of, verify

pytestmark = pytest.mark.launches

RANKS = 4
GONE = 10.0  # seconds from the signal until every process of the job has exited
LONG = ["--hidden", "32", "--epochs", "300", "--eval-every", "0"]  # ~7,000 steps: still running
INTERRUPTED = re.compile(
    r"hpcnn: interrupted \(Ctrl-C\) after step (\d+); checkpoint (\S+): continue with --resume auto "
    r"\(exit code 130\)$"
)


def interrupted_step(job) -> tuple[int, str]:
    """The one line an interrupted training prints, parsed: (step, checkpoint path)."""
    lines = job.hpcnn_lines()
    assert len(lines) == 1, job.stderr
    match = INTERRUPTED.match(lines[0])
    assert match, lines[0]
    assert "Traceback" not in job.stderr and "KeyboardInterrupt" not in job.stderr, job.stderr
    return int(match.group(1)), match.group(2)


def tensors(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if hasattr(obj, "shape") else None)
    return out


# --- the first Ctrl-C: every rank stops after the same step, with a checkpoint -----------------

MOMENTS = {
    # moment: (extra arguments, fault, what to wait for before pressing Ctrl-C)
    "start-up": ([], None, r"^hpcnn 0\.1\.0: 4 rank"),
    "mid-training": ([], None, r"^step \d+/|^epoch  2/"),
    "evaluation": (["--eval-every", "1"], "sleep@evaluation:rank=0,seconds=2", r"HPCNN_FAULT: sleeping"),
    "checkpoint write": (["--checkpoint-every", "30"], "sleep@checkpoint:rank=0,step=29,seconds=3",
                         r"HPCNN_FAULT: sleeping"),
}  # fmt: skip


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_stops_every_rank_with_a_checkpoint_and_exit_130(tmp_path, moment):
    extra, fault, cue = MOMENTS[moment]
    ckpt = tmp_path / "ckpt"
    args = [*LONG, "--run-dir", "", "--checkpoint-dir", ckpt, "--log-every", "10", *extra]
    job = Job("hpcnn.train", args, RANKS, {"HPCNN_FAULT": fault} if fault else None)
    job.wait_for(cue)
    job.ctrl_c()
    code, seconds = job.finish(GONE)
    assert code == 130 and seconds < GONE, (code, seconds, job.stderr)
    step, path = interrupted_step(job)
    newest = checkpoints(ckpt)[0]
    assert str(newest) == path and step_of(newest) == step >= 1
    verify(newest)
    if moment == "checkpoint write":  # the write in progress completed; the stop came a step or two on
        assert step_of(checkpoints(ckpt)[1]) == 30 and step in (31, 32)


def test_an_interrupted_run_resumes_to_the_uninterrupted_runs_bits(tmp_path):
    ckpt = tmp_path / "ckpt"
    # a constant rate: the runs below end at --max-steps, which would rescale a decaying schedule
    long = [*LONG, "--lr-schedule", "constant"]
    job = Job("hpcnn.train", [*long, "--run-dir", "", "--checkpoint-dir", ckpt, "--log-every", "10"], RANKS)
    job.wait_for(r"^step \d+/")
    job.ctrl_c()
    code, _ = job.finish(GONE)
    step, _ = interrupted_step(job)
    assert code == 130
    end = ["--max-steps", str(step + 7)]
    resumed = Job(
        "hpcnn.train", [*long, *end, "--run-dir", "", "--checkpoint-dir", ckpt, "--resume", "auto"], RANKS
    )
    whole = Job("hpcnn.train", [*long, *end, "--run-dir", "", "--checkpoint-dir", tmp_path / "whole"], RANKS)
    assert resumed.finish(60)[0] == 0 and whole.finish(60)[0] == 0, resumed.stderr + whole.stderr
    assert f"resumed from {ckpt}/ckpt-{step:09d}.h5" in resumed.stdout
    a, b = tensors(checkpoints(ckpt)[0]), tensors(checkpoints(tmp_path / "whole")[0])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_on_one_rank_stops_them_all(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = Job("hpcnn.train", [*LONG, "--run-dir", "", "--checkpoint-dir", ckpt, "--log-every", "10"], RANKS)
    job.wait_for(r"^step \d+/")
    job.signal_rank(2, signal.SIGINT)
    code, seconds = job.finish(GONE)
    assert code == 130 and seconds < GONE
    step, _ = interrupted_step(job)
    assert step_of(checkpoints(ckpt)[0]) == step


def test_ctrl_c_without_a_checkpoint_directory_still_stops_cleanly():
    job = Job("hpcnn.train", [*LONG, "--run-dir", "", "--log-every", "10"], RANKS)
    job.wait_for(r"^step \d+/")
    job.ctrl_c()
    code, seconds = job.finish(GONE)
    assert code == 130 and seconds < GONE
    assert re.fullmatch(
        r"hpcnn: interrupted \(Ctrl-C\) after step \d+; no checkpoint \(no checkpoint directory\) "
        r"\(exit code 130\)",
        "\n".join(job.hpcnn_lines()),
    ), job.stderr


# --- the second Ctrl-C: the job ends at once, even where the first could not be honoured ------


def test_a_second_ctrl_c_ends_a_stuck_job_at_once(tmp_path):
    """Rank 1 hangs; the others wait in the gradient reduction, where no Python signal handler
    runs. The first Ctrl-C cannot be honoured (no step completes); the second ends the job."""
    ckpt = tmp_path / "ckpt"
    args = [*LONG, "--run-dir", "", "--checkpoint-dir", ckpt, "--stall-timeout", "300"]
    job = Job("hpcnn.train", args, RANKS, {"HPCNN_FAULT": "hang@forward:rank=1,step=3"})
    ranks = job.wait_for_ranks()
    job.wait_for(r"^training: ")
    time.sleep(1.0)
    for rank in ranks:  # as srun forwards it: to every rank, and nothing else
        job.signal_rank(rank, signal.SIGINT)
    time.sleep(1.0)
    assert len(job.processes()) == RANKS  # the first one only asked for a stop
    for rank in ranks:
        job.signal_rank(rank, signal.SIGINT)
    code, seconds = job.finish(GONE)
    assert code == 130 and seconds < GONE, (code, seconds, job.stderr)
    assert job.hpcnn_lines() == [
        "hpcnn: interrupted again (Ctrl-C): ending the job now, without a checkpoint (exit code 130)"
    ], job.stderr
    assert "Traceback" not in job.stderr and checkpoints(ckpt) == []


def test_ctrl_c_to_the_launcher_ends_even_a_stuck_job_and_damages_nothing(tmp_path):
    """MPICH's mpiexec forwards the first Ctrl-C and ends the job on the second; Open MPI's mpirun
    ends it on the first (SIGTERM, then SIGKILL). Either way: every process gone, no traceback, every
    checkpoint as it was."""
    ckpt = tmp_path / "ckpt"
    hang = {"HPCNN_FAULT": "hang@forward:rank=1,step=40"}
    args = [*LONG, "--run-dir", "", "--checkpoint-dir", ckpt, "--checkpoint-every", "10",
            "--stall-timeout", "300"]  # fmt: skip
    job = Job("hpcnn.train", args, RANKS, hang)
    job.wait_for(r"ckpt-000000040\.h5")
    time.sleep(1.0)
    before = {p.name: p.read_bytes() for p in checkpoints(ckpt)}
    job.signal_launcher(signal.SIGINT)
    time.sleep(1.0)
    if job.proc.poll() is None:
        job.signal_launcher(signal.SIGINT)
    code, seconds = job.finish(GONE)
    assert seconds < GONE, (code, seconds)
    # The exit code is the launcher's own here (it kills the ranks): Open MPI's mpirun reports the
    # signal; MPICH's mpiexec, on a second Ctrl-C, exits with 0, 1 or 255 at random (measured with
    # MPICH 5.0.2 and four plain sleeping processes: 0, 255, 1, 255, 255, 1), so only Open MPI's is
    # checked.
    assert forwards_ctrl_c() or code != 0, code
    assert "Traceback" not in job.stderr and len(job.hpcnn_lines()) <= 1, job.stderr
    assert {p.name: p.read_bytes() for p in checkpoints(ckpt)} == before and "ckpt-000000040.h5" in before
    for path in checkpoints(ckpt):
        verify(path)


# --- the Python API -----------------------------------------------------------------------------

SCRIPT = """
import sys
from hpcnn.parallel.comm import Comm
from hpcnn.config import Config
from hpcnn.train import fit
comm = Comm.world()
if comm.is_root:
    print("started", flush=True)
try:
    fit(Config(hidden=[32], epochs=300, eval_every=0, run_dir="", checkpoint_dir=sys.argv[1]), comm,
        log=print)
except KeyboardInterrupt as stop:
    sys.stdout.write(f"rank {comm.rank}: KeyboardInterrupt after step {stop.result.steps}: {stop}\\n")
    sys.stdout.flush()
"""


@pytest.mark.parametrize("moment", ["training", "set-up"])
def test_fit_raises_keyboard_interrupt_on_every_rank_after_the_agreed_stop(tmp_path, moment):
    """In set-up, rank 1 sleeps while the others wait for it in a collective: the Ctrl-C is held
    (not a KeyboardInterrupt on the ranks that run Python) and honoured after the first step."""
    fault = {"HPCNN_FAULT": "sleep@setup:rank=1,seconds=2"} if moment == "set-up" else None
    job = Job(SCRIPT, [tmp_path / "ckpt"], RANKS, fault)
    job.wait_for(r"HPCNN_FAULT: sleeping" if fault else r"^step \d+/|^epoch ")
    job.ctrl_c()
    code, seconds = job.finish(GONE)
    assert code == 0 and seconds < GONE, (code, job.stderr)
    # (not anchored to line starts: the launcher may interleave the ranks' lines)
    caught = re.findall(r"rank (\d): KeyboardInterrupt after step (\d+): interrupted", job.stdout)
    assert sorted(r for r, _ in caught) == ["0", "1", "2", "3"], job.stdout + job.stderr
    assert len({s for _, s in caught}) == 1  # the same step everywhere
    assert step_of(checkpoints(tmp_path / "ckpt")[0]) == int(caught[0][1])


# --- a frozen rank, whichever it is: the others end the job, naming it --------------------------

ROLES = {
    # role: (extra arguments, frozen world rank, what the message says)
    "rank 0": ([], 0, "stall: rank 0 is lost: it has not taken rank 1's heartbeat"),
    "a middle rank": ([], 1, "lost: rank 1, not heard from"),
    "the last rank": ([], 3, "lost: rank 3, not heard from"),
    "a pipeline stage": (["--pipeline-stages", "2", "--hidden", "32,32"], 1, "lost: rank 1, not heard from"),
}


def frozen_jobs(timeout: str, roles) -> dict:
    jobs = {}
    for role in roles:
        extra, rank, _ = ROLES[role]
        # step 2500: after the first heartbeats (one a second), so the inspector knows where the rank
        # froze. At 250 (0.4 s of 700 steps/s) a rank could freeze before its first one; the job then
        # still ends in time, naming the rank as "not arrived ... in setup".
        fault = {"HPCNN_FAULT": f"freeze@forward:rank={rank},step=2500"}
        args = [*LONG, "--run-dir", "", *extra, *(["--stall-timeout", timeout] if timeout else [])]
        jobs[role] = Job("hpcnn.train", args, RANKS, fault)
    return jobs


def check_frozen(job, role: str, bound: float) -> None:
    job.wait_for(r"HPCNN_FAULT: freezing", timeout=120)
    job.signalled_at = time.monotonic()  # the bound runs from the freeze
    code, seconds = job.finish(bound)
    errors = [line for line in job.hpcnn_lines() if "error" in line]
    assert code == 4 and len(errors) == 1, (role, code, job.stderr)
    assert errors[0].startswith("hpcnn: error: stall: ") and ROLES[role][2] in job.stderr, job.stderr


@pytest.mark.parametrize("role", list(ROLES))
def test_a_frozen_rank_ends_the_job_within_twice_the_stall_timeout(role):
    job = frozen_jobs("5", [role])[role]
    check_frozen(job, role, 2 * 5 + 8)


def test_frozen_ranks_at_a_30_s_stall_timeout():
    jobs = frozen_jobs("30", list(ROLES))  # side by side: the jobs mostly wait
    for role, job in jobs.items():
        check_frozen(job, role, 2 * 30 + 8)


@pytest.mark.slow
def test_frozen_ranks_at_the_default_stall_timeout():
    """Default deadline once steps are timed: 60 s (20 x the longest step, at least 60 s)."""
    jobs = frozen_jobs("", list(ROLES))
    for role, job in jobs.items():
        check_frozen(job, role, 2 * 60 + 8)


def test_ctrl_c_stops_a_sweep_with_exit_130_and_no_task_recorded_done(tmp_path):
    (tmp_path / "sweep.toml").write_text(
        '[sweep]\ngroup_size = 2\ndirectory = "out"\n[base]\nhidden = [32]\nepochs = 300\neval_every = 0\n'
        "[grid]\nlr = [0.001, 0.003, 0.01]\n"
    )
    job = Job("hpcnn.sweep", [tmp_path / "sweep.toml"], RANKS, cwd=tmp_path)
    job.wait_for(r"^task \d .*: started")
    time.sleep(1.0)
    job.ctrl_c()
    code, seconds = job.finish(GONE)
    assert code == 130 and seconds < GONE, (code, job.stderr)
    assert job.hpcnn_lines() == [
        "hpcnn: sweep interrupted (Ctrl-C); run the same command again to continue (exit 130)"
    ], job.stderr
    stopped = re.findall(r"^task \d on rank\(s\) \d-\d: stopped: stopped by SIGINT", job.stdout, re.M)
    assert len(stopped) == 2, job.stdout
    assert not list((tmp_path / "out").glob("tasks/*/result.json"))  # nothing recorded as finished
