"""Never hang, never lose data: real 8-rank runs that fail on purpose, each with a hard timeout.

Faults are injected with the documented test hook ``HPCNN_FAULT=KIND@SITE:rank=R,step=S``
(``hpcnn/faults.py``); bad input is real bad input. Every case asserts on the exit code, on the one
message printed (and its content), and on the time until every rank had exited; cases that involve
checkpoints also check that no existing checkpoint changed.
"""

import hashlib
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import run, start
from test_checkpoint import corrupt

from hpcnn.io.checkpoints import checkpoints, verify

RANKS = 8
LIMIT = 30.0  # seconds until every rank has exited
FAST = ["--hidden", "32", "--epochs", "2", "--eval-every", "0"]


def launch(args, env=None, ranks=RANKS):
    """Run ``python -m hpcnn.train`` under mpiexec; return (process, seconds)."""
    proc = run("hpcnn.train", args, ranks=ranks, env=env, timeout=90)
    return proc, proc.seconds


def ours(proc) -> list[str]:
    """hpcnn's own error lines (first line of each message)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:") and "error" in line]


def digest(directory) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).glob("ckpt-*"))
    }


# --- an exception on one rank, wherever it happens ----------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("site", ["data", "forward", "backward", "allreduce", "optimizer", "evaluation"])
def test_an_exception_on_one_rank_ends_the_job_with_one_message(site):
    args = [*FAST, "--eval-every", "1"] if site == "evaluation" else FAST
    when = "" if site == "evaluation" else ",step=5"  # evaluation: the first one, after step 23
    proc, seconds = launch(args, {"HPCNN_FAULT": f"raise@{site}:rank=3{when}"})
    assert proc.returncode != 0 and seconds < LIMIT, (proc.returncode, seconds)
    step = "step 23" if site == "evaluation" else "step 5"  # evaluation runs after epoch 1's 23 steps
    assert ours(proc) == [f"hpcnn: rank 3: internal error: injected fault at {site}, {step}"], proc.stderr
    assert "final held-out" not in proc.stdout


@pytest.mark.launches
def test_debug_prints_the_failing_ranks_traceback_once():
    proc, seconds = launch([*FAST, "--debug"], {"HPCNN_FAULT": "raise@backward:rank=6,step=2"})
    assert proc.returncode != 0 and seconds < LIMIT
    assert proc.stderr.count("Traceback (most recent call last)") == 1
    assert (
        "in train_step" in proc.stderr and "RuntimeError: injected fault at backward, step 2" in proc.stderr
    )


@pytest.mark.launches
def test_an_exception_inside_a_checkpoint_write_keeps_the_earlier_checkpoints(tmp_path):
    d = tmp_path / "ckpt"
    args = [*FAST, "--checkpoint-dir", str(d), "--checkpoint-every", "10", "--keep", "0"]
    for rank in (0, 5):  # the writing rank, and a rank that only sends its part
        step = 20 if rank == 0 else 30
        fault = {"HPCNN_FAULT": f"raise@checkpoint:rank={rank},step={step - 1}"}  # during the write after it
        proc, seconds = launch(args + (["--resume", "auto"] if rank else []), fault)
        assert proc.returncode != 0 and seconds < LIMIT
        message = f"hpcnn: rank {rank}: internal error: injected fault at checkpoint, step {step - 1}"
        assert ours(proc) == [message], proc.stderr
        for path in checkpoints(d):
            verify(path)
        if rank == 0:  # the writer failed while writing step 20's: that file never got its name
            assert [p.name for p in checkpoints(d)] == ["ckpt-000000010.h5"]
    # A rank that only sends its part may fail after rank 0 finished the file: then it is complete.
    assert [p.name for p in checkpoints(d)][-2:] == ["ckpt-000000020.h5", "ckpt-000000010.h5"]


# --- a rank that dies, a rank that hangs -------------------------------------------------------


@pytest.mark.launches
def test_a_killed_rank_ends_the_job_within_seconds():
    """SIGKILL (what the OOM killer sends): the launcher ends the job; MPICH's mpiexec says a
    process was killed (the PID it names is not always the dead one's: Open MPI's mpirun and
    srun name the rank)."""
    proc, seconds = launch(FAST, {"HPCNN_FAULT": "kill@backward:rank=5,step=4"})
    assert proc.returncode != 0 and seconds < LIMIT
    # MPICH: "... Killed (signal 9)"; Open MPI: "... exited on signal 9 (Killed)."
    assert re.search(r"Killed \(signal 9\)|signal 9 \(Killed\)", proc.stdout + proc.stderr)
    # "0-7=2340-2347", or in pieces where another process took a PID between two ranks' starts
    line = re.search(r"^hpcnn: ranks by host \(rank=pid\): \S+: (.*)$", proc.stdout, re.M)
    ranks = []
    for group in line.group(1).split():
        first, _, last = group.split("=")[0].partition("-")
        ranks += range(int(first), int(last or first) + 1)
    assert ranks == list(range(8)), line.group(0)


@pytest.mark.launches
def test_a_hung_rank_is_named_by_the_stall_inspector():
    proc, seconds = launch([*FAST, "--stall-timeout", "8"], {"HPCNN_FAULT": "hang@forward:rank=2,step=5"})
    assert proc.returncode == 4 and seconds < LIMIT, (proc.returncode, proc.stderr)
    assert len(ours(proc)) == 1 and ours(proc)[0].startswith("hpcnn: error: stall: no progress for")
    assert "waiting in gradient allreduce at step 5: ranks 0, 1, 3, 4, 5, 6, 7" in proc.stderr
    assert "not arrived: rank 2, in forward/backward at step 5" in proc.stderr


@pytest.mark.launches
def test_a_hung_pipeline_stage_shows_who_waits_for_whom():
    args = [*FAST, "--hidden", "32,32", "--pipeline-stages", "2", "--stall-timeout", "8"]
    proc, seconds = launch(args, {"HPCNN_FAULT": "hang@backward:rank=1,step=3"})
    assert proc.returncode == 4 and seconds < LIMIT, proc.stderr
    assert "waiting in pipeline receive from stage 1 at step 3: ranks 0" in proc.stderr
    assert "not arrived: rank 1, in forward/backward at step 3" in proc.stderr


# --- values that go bad ------------------------------------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("zero", [[], ["--zero", "2"]], ids=["zero-0", "zero-2"])
def test_a_nan_loss_stops_every_rank_at_once_and_never_reaches_a_checkpoint(tmp_path, zero):
    """(With --zero 2 every replica holds a part of the gradient: the first non-finite layer is
    agreed over the parts.)"""
    d = tmp_path / "ckpt"
    args = [*FAST, *zero, "--checkpoint-dir", str(d), "--checkpoint-every", "1", "--keep", "0"]
    proc, seconds = launch(args, {"HPCNN_FAULT": "nan@forward:rank=1,step=5"})
    assert proc.returncode == 3 and seconds < LIMIT, proc.stderr
    assert ours(proc) == [
        "hpcnn: error: non-finite loss and gradient (the first layer with a non-finite gradient is 0, "
        "Dense(64, 32)) at step 5; training stopped, no checkpoint written from that state (try a lower "
        "--lr or --clip-norm)"
    ], proc.stderr
    assert checkpoints(d)[0].name == "ckpt-000000005.h5"  # the state after 5 good steps
    with h5py.File(checkpoints(d)[0], "r") as f:
        f.visititems(lambda n, o: None if not hasattr(o, "shape") else np.testing.assert_equal(
            np.isfinite(o[...]).all(), True, err_msg=n))  # fmt: skip


@pytest.mark.launches
def test_a_diverged_replica_is_named(tmp_path):
    proc, seconds = launch(
        [*FAST, "--check-replicas", "2"], {"HPCNN_FAULT": "diverge@optimizer:rank=6,step=3"}
    )
    assert proc.returncode == 1 and seconds < LIMIT
    assert ours(proc) == [
        "hpcnn: error: replicas diverged by step 4: rank(s) [6] differ from the other replicas (a silent "
        "hardware or communication fault?)"
    ], proc.stderr


@pytest.mark.launches
def test_two_disagreeing_replicas_are_both_named():
    """With two replicas a majority cannot tell which one is wrong: both are named."""
    proc, seconds = launch(
        [*FAST, "--check-replicas", "1"], {"HPCNN_FAULT": "diverge@optimizer:rank=0,step=3"}, ranks=2
    )
    assert proc.returncode == 1 and seconds < LIMIT
    assert "replicas diverged by step 4: the replicas of stage 0 (ranks [0, 1]) disagree" in proc.stderr


def test_a_nan_in_the_step_after_a_signal_is_reported_not_hidden_by_the_stop(tmp_path, monkeypatch):
    """SIGUSR1 during the 4th step, a NaN input row read for the next one (index 4), which runs before
    the stop is agreed: the state to checkpoint is not finite, so the run must end with the input
    error, not with a checkpoint and exit 75."""
    from test_checkpoint import SignalAtStep

    from hpcnn import train
    from hpcnn.config import Config
    from hpcnn.errors import JobError
    from hpcnn.parallel import faults
    from hpcnn.parallel.comm import Comm
    from hpcnn.training import engine

    make = engine.make_optimizer
    monkeypatch.setattr(engine, "make_optimizer", lambda cfg: SignalAtStep(make(cfg), 4))
    monkeypatch.setenv(faults.VARIABLE, "nan@data:rank=0,step=4")
    with pytest.raises(JobError, match="has a non-finite input value .* read for step 4") as exc:
        train.fit(Config(hidden=[16], epochs=1, checkpoint_dir=str(tmp_path)), Comm.serial())
    assert exc.value.exit_code == 2 and checkpoints(tmp_path) == []


@pytest.mark.launches
def test_rank_0_stuck_outside_mpi_still_hears_every_rank():
    """Rank 0 hangs in evaluation (no MPI calls in its main thread): its inspector must still hear
    all 7 others each second, so none is reported lost, and rank 0 is named."""
    args = [*FAST, "--pipeline-stages", "2", "--hidden", "32,32", "--stall-timeout", "8", "--eval-every", "1"]
    proc, seconds = launch(args, {"HPCNN_FAULT": "hang@evaluation:rank=0"})
    assert proc.returncode == 4 and seconds < LIMIT, proc.stderr
    assert "lost:" not in proc.stderr and "not arrived: rank 0, in evaluation" in proc.stderr
    assert "waiting in evaluation receive from stage 0 at step 23: ranks 1\n" in proc.stderr
    assert "waiting in evaluation allreduce at step 23: ranks 2, 3, 4, 5, 6, 7" in proc.stderr


# --- bad input: one message, exit 2 on every rank, nothing damaged ------------------------------


def write(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if key.startswith("attr_"):
                f.attrs[key[5:]] = value
            else:
                f[key] = value
    return str(path)


def good_arrays(rows=64, features=6):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, features)).astype(np.float32), rng.integers(0, 3, rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    x, y = good_arrays()
    nan_x = x.copy()
    nan_x[37, 2] = np.nan
    good = write(d / "good.h5", x=x, y=y)
    (d / "truncated.h5").write_bytes(Path(good).read_bytes()[:1500])
    (d / "text.h5").write_text("rows,features\n1,2\n")
    (d / "run.toml").write_text("learning_rate = 0.1\n")
    (d / "type.toml").write_text('lr = "fast"\n')
    (d / "a-file").write_text("")
    ckpt = d / "ckpt"
    run(
        "hpcnn.train",
        ["--data", good, "--hidden", "8", "--epochs", "1", "--checkpoint-dir", ckpt],
        check=True,
    )
    (d / "corrupt.h5").write_bytes(checkpoints(ckpt)[0].read_bytes())
    corrupt(d / "corrupt.h5")
    return {
        "dir": d,
        "good": good,
        "ckpt": str(checkpoints(ckpt)[0]),
        "nan": write(d / "nan.h5", x=nan_x, y=y),
        "lengths": write(d / "lengths.h5", x=x, y=y[:50]),
        "range": write(d / "range.h5", x=x, y=np.where(y == 2, 5, y), attr_num_classes=3),
        "floaty": write(d / "floaty.h5", x=x, y=y.astype(np.float32)),
        "empty": write(d / "empty.h5", x=np.zeros((0, 6), np.float32), y=np.zeros(0, np.int64)),
        "narrow": write(d / "narrow.h5", x=x[:, :3], y=y),
    }


BAD_INPUT = [
    ("missing file", ["--data", "{dir}/missing.h5"], "data file {dir}/missing.h5 does not exist"),
    ("not HDF5", ["--data", "{dir}/text.h5"], "data file {dir}/text.h5 is not a readable HDF5 file"),
    ("truncated HDF5", ["--data", "{dir}/truncated.h5"],
     "data file {dir}/truncated.h5 is not a readable HDF5"),
    ("missing dataset", ["--data", "{good}", "--x-key", "inputs"],
     "{good}: no dataset 'inputs' (datasets in"),
    ("lengths differ", ["--data", "{lengths}"], "{lengths}: 'x' must be (rows, features) and 'y' (rows,) or "
     "(rows, outputs) with the same rows; got (64, 6) and (50,)"),
    ("width vs first layer", ["--data", "{narrow}", "--hidden", "8", "--resume", "{ckpt}"],
     "cannot resume from {ckpt}: the checkpoint's model takes 6 input features, this run's data has 3"),
    ("labels out of range", ["--data", "{range}"], "{range}: label 5 is out of range for num_classes = 3"),
    ("labels not integers", ["--data", "{floaty}"], "{floaty}: 'y' holds float32 targets; class labels"),
    ("NaN in inputs", ["--data", "{nan}", "--batch-size", "64"],
     "{nan}: training row 37 has a non-finite input value (NaN or Inf), read for step 0"),
    ("empty dataset", ["--data", "{empty}"], "{empty}: 'x' has no rows"),
    ("batch < ranks", ["--batch-size", "4"], "batch_size = 4 is smaller than the 8 data-parallel replicas"),
    ("ranks % stages", ["--pipeline-stages", "3"], "pipeline_stages = 3 does not divide the 8 ranks"),
    ("stages > layers", ["--pipeline-stages", "8"], "pipeline_stages = 8 exceeds the model's 3 layers"),
    ("unknown key", ["--config", "{dir}/run.toml"],
     "{dir}/run.toml: unknown key 'learning_rate'; valid keys"),
    ("wrong type", ["--config", "{dir}/type.toml"], "{dir}/type.toml: lr = 'fast': expected float"),
    ("flag type", ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ("zero lr", ["--lr", "0"], "lr = 0.0: must be > 0"),
    ("negative lr", ["--lr", "-0.1"], "lr = -0.1: must be > 0"),
    ("zero epochs", ["--epochs", "0"], "epochs = 0: must be a positive integer"),
    ("zero width", ["--hidden", "64,0"], "hidden = [64, 0]: widths must be positive integers"),
    ("other architecture", ["--data", "{good}", "--hidden", "16", "--resume", "{ckpt}"],
     r"cannot resume from {ckpt}: layer 0 is Dense(6, 8) in the checkpoint, Dense(6, 16) in this run"),
    ("corrupt checkpoint", ["--data", "{good}", "--hidden", "8", "--resume", "{dir}/corrupt.h5"],
     "checkpoint {dir}/corrupt.h5: dataset model/000_dense/W is corrupt"),
    ("unwritable checkpoint dir", ["--checkpoint-dir", "{dir}/a-file/sub"],
     "checkpoint_dir {dir}/a-file/sub is not writable: [Errno 20] Not a directory"),
]  # fmt: skip


@pytest.mark.launches
@pytest.mark.parametrize("name,args,message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_message_and_exit_2_everywhere(files, name, args, message):
    before = {p: digest(p) for p in (files["dir"] / "ckpt", files["dir"])}
    args = [a.format(**files) for a in args]
    proc, seconds = launch([*FAST, *args])
    assert proc.returncode == 2 and seconds < LIMIT, (proc.returncode, seconds, proc.stderr)
    lines = ours(proc)
    assert len(lines) == 1 and lines[0].startswith(f"hpcnn: error: {message.format(**files)}"), proc.stderr
    assert "Traceback" not in proc.stderr and not re.search(r"^epoch ", proc.stdout, re.M)
    assert {p: digest(p) for p in before} == before  # no checkpoint or data file touched


def test_mpi4py_for_another_mpi_than_the_launcher_is_explained_once():
    """Two processes that a launcher started as one job of 2, but whose MPI sees two singletons
    (mpi4py from pip's MPICH under another MPI's mpirun): one message, exit 2 from both."""
    procs = []
    for rank in (0, 1):
        env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank)}
        procs.append(start("hpcnn.train", FAST, env=env))
    outs = [p.communicate(timeout=LIMIT) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    errors = [line for _, err in outs for line in err.splitlines() if line.startswith("hpcnn: error:")]
    assert len(errors) == 1 and "the launcher started 2 processes (OMPI_COMM_WORLD_SIZE=2)" in errors[0]
    assert "mpi4py uses another MPI" in errors[0] and not any(out for out, _ in outs)


# --- with sharded optimizer state (--zero) ------------------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("zero", ["1", "2"])
def test_a_rank_hung_after_its_parameter_allgather_is_not_shown_in_it(zero):
    """``hang@optimizer`` holds rank 3 at the end of step 4, after the all-gather: the others wait
    in step 5's reduction, and rank 3 shows in its optimizer step, not in the all-gather."""
    proc, seconds = launch(
        [*FAST, "--zero", zero, "--stall-timeout", "8"], {"HPCNN_FAULT": "hang@optimizer:rank=3,step=4"}
    )
    assert proc.returncode == 4 and seconds < LIMIT, (proc.returncode, proc.stderr)
    assert len(ours(proc)) == 1 and ours(proc)[0].startswith("hpcnn: error: stall: no progress for")
    assert "waiting in gradient allreduce at step 5: ranks 0, 1, 2, 4, 5, 6, 7" in proc.stderr
    assert "not arrived: rank 3, in optimizer step at step 4" in proc.stderr
