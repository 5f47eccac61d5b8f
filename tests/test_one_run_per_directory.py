"""One run per checkpoint directory (and one sweep per sweep directory): ``hpcnn.io.dirlock``.

Two runs on one directory used to lose data (one deleted the other's temporary file; two models
reported the same final file). Now the second is refused with exit code 2 and a message naming
the run that holds the directory (host, PID, since when), whether both start fresh, resume, or
one of each; a lock left by a dead process is taken over with a note, and temporary files of
interrupted writes are removed.
"""

import errno
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from launch import run, start

from hpcnn.errors import UserError
from hpcnn.io import dirlock
from hpcnn.io.dirlock import NAME, DirectoryLock

LIMIT = 30.0
SHORT = ["--hidden", "16", "--epochs", "2", "--eval-every", "0", "--run-dir", ""]
# The run that wins must still hold the directory when the other arrives (a few seconds).
LONG = ["--hidden", "16", "--epochs", "150", "--eval-every", "0", "--run-dir", "", "--quiet"]
ADVICE = "wait for it to end, or choose another --checkpoint-dir"
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"


def under(ranks: int) -> int | None:
    """One rank runs without mpiexec (its PID is the one a lock names); more under mpiexec."""
    return ranks if ranks > 1 else None


def train(args, ranks: int = 1, timeout=120):
    proc = run("hpcnn.train", args, ranks=under(ranks), timeout=timeout)
    return proc, proc.seconds


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hpcnn:") and "error" in line]


def contents(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def in_use(directory, pid, what="checkpoint_dir", advice=ADVICE) -> str:
    host = re.escape(socket.gethostname())
    return (
        rf"hpcnn: error: {what} {re.escape(str(directory))} is in use by another run \(PID {pid} on host "
        rf"{host}, since {SINCE}\): {re.escape(advice)}"
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A directory with the checkpoints of a finished 2-epoch run."""
    d = tmp_path_factory.mktemp("finished") / "ckpt"
    proc, _ = train([*SHORT, "--checkpoint-dir", str(d)])
    assert proc.returncode == 0, proc.stderr
    return d


def copy_of(finished: Path, where: Path) -> Path:
    where.mkdir()
    for p in finished.iterdir():
        (where / p.name).write_bytes(p.read_bytes())
    return where


# --- refused while another run holds the directory -----------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("mode", ["fresh", "resume auto", "resume file"])
def test_a_run_is_refused_while_another_holds_its_directory(finished, tmp_path, mode, ranks):
    d = tmp_path / "ckpt"
    if mode == "fresh":
        d.mkdir()
        extra = []
    else:
        copy_of(finished, d)
        extra = ["--resume", "auto" if mode == "resume auto" else str(d / "ckpt-000000046.h5")]
    held = DirectoryLock.acquire(d, "checkpoint_dir", ADVICE)  # "another run": this test process
    try:
        before = contents(d)
        proc, seconds = train([*SHORT, "--checkpoint-dir", str(d), *extra], ranks)
        assert proc.returncode == 2 and seconds < LIMIT, (proc.returncode, seconds, proc.stderr)
        assert len(errors(proc.stderr)) == 1 and re.fullmatch(in_use(d, os.getpid()), errors(proc.stderr)[0])
        assert "data:" not in proc.stdout  # refused before the data is read, let alone training
        assert contents(d) == before  # not a byte changed, the holder's lock file included
    finally:
        held.release()
    assert not (d / NAME).exists()


@pytest.mark.launches
@pytest.mark.parametrize(
    "first, second, ranks",
    [("fresh", "fresh", (1, 1)), ("fresh", "resume", (2, 2)), ("resume", "resume", (1, 2))],
)
def test_of_two_runs_started_together_on_one_directory_exactly_one_runs(finished, tmp_path, first, second,
                                                                       ranks):  # fmt: skip
    d = tmp_path / "ckpt"
    if first == "resume":
        copy_of(finished, d)
    args = [[*LONG, "--checkpoint-dir", str(d)] + (["--resume", "auto"] if how == "resume" else [])
            for how in (first, second)]  # fmt: skip
    t0 = time.monotonic()
    procs = [start("hpcnn.train", a, ranks=under(n)) for a, n in zip(args, ranks, strict=True)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2] and time.monotonic() - t0 < 60, (codes, outs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    # The holder named is the winner's rank 0 (a lone rank's PID is the process started here).
    pid = procs[winner].pid
    if ranks[winner] > 1:
        pid = re.search(r"ranks by host \(rank=pid\): [^:]+: 0(?:-\d+)?=(\d+)", outs[winner][0]).group(1)
    assert len(errors(outs[loser][1])) == 1 and re.fullmatch(in_use(d, pid), errors(outs[loser][1])[0]), outs
    assert "final held-out" in outs[winner][0] and "final held-out" not in outs[loser][0]
    assert sorted(p.name for p in d.iterdir())[-1] == "ckpt-000003450.h5"  # 150 epochs x 23 steps
    assert not (d / NAME).exists()


# --- left behind by dead processes -------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.launches
def test_a_stale_lock_is_taken_over_and_stale_temporary_files_are_removed(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    pid = dead_pid()
    holder = {"host": socket.gethostname(), "pid": pid, "since": "2026-11-30T08:00:00+0000"}
    (d / NAME).write_text(json.dumps(holder))
    stale = [".ckpt-000000010.h5.node7.4242.tmp", ".ckpt-000000005.h5.tmp"]  # this version's names, the old
    kept = [".ckpt-000000010.h5.notes", "notes.tmp"]  # not a temporary checkpoint file
    for name in stale + kept:
        (d / name).write_bytes(b"partial")
    proc, _ = train([*SHORT, "--checkpoint-dir", str(d)], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert (
        f"note: {d / NAME} was left by a run that ended without releasing it (PID {pid} on host "
        f"{socket.gethostname()}, since 2026-11-30T08:00:00+0000): taken over\n"
    ) in proc.stdout
    removed = f"note: removed the temporary files of interrupted writes: {', '.join(sorted(stale))}\n"
    assert removed in proc.stdout
    assert sorted(os.listdir(d)) == sorted([*kept, "ckpt-000000046.h5"])


def test_a_killed_run_leaves_a_lock_that_the_next_run_takes_over(tmp_path):
    d = tmp_path / "ckpt"
    proc = start("hpcnn.train", [*LONG, "--checkpoint-dir", d], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (d / NAME).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.kill()  # the kernel drops its flock; the file stays
    proc.wait()
    assert (d / NAME).exists(), proc.stderr.read()
    again, _ = train([*SHORT, "--checkpoint-dir", str(d), "--resume", "auto"])
    assert again.returncode == 0, again.stderr
    assert f"was left by a run that ended without releasing it (PID {proc.pid} on host" in again.stdout
    assert not (d / NAME).exists()


# --- the lock itself -----------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_is_gone_after_release(tmp_path):
    lock = DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)
    holder = json.loads((tmp_path / NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and lock.notes == []
    with pytest.raises(UserError) as exc:  # a second open file description: refused like another process
        DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)
    assert re.fullmatch(in_use(tmp_path, os.getpid()).removeprefix("hpcnn: error: "), str(exc.value))
    lock.release()
    lock.release()  # twice is harmless
    assert not (tmp_path / NAME).exists()


def test_a_run_that_opened_the_lock_file_before_it_was_removed_tries_again(tmp_path):
    """The race that removing the file on release opens: B opens the file, A removes it and lets
    go, B locks the removed file. B must notice, or B and a third run C would both run."""
    a = DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)
    fd = os.open(tmp_path / NAME, os.O_RDWR)  # B, just before A releases
    a.release()
    c = DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)  # C creates a new file
    try:
        assert DirectoryLock._take(tmp_path / NAME, fd, False, "checkpoint_dir", ADVICE, []) is None
    finally:
        os.close(fd)
        c.release()


def test_where_flock_is_not_supported_the_file_alone_is_the_lock(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(dirlock.fcntl, "flock", no_flock)
    lock = DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)
    with pytest.raises(UserError, match=rf"in use by another run \(PID {os.getpid()} on host"):
        DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)  # its process is alive
    lock.release()
    assert not (tmp_path / NAME).exists()
    # A dead process on this host: taken over. Another host: cannot be checked, so refused.
    (tmp_path / NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "since": "x"}))
    lock = DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)
    assert len(lock.notes) == 1 and "ended without releasing it" in lock.notes[0]
    lock.release()
    (tmp_path / NAME).write_text(json.dumps({"host": "node7", "pid": 4242, "since": "x"}))
    with pytest.raises(UserError, match=rf"that host cannot be checked from here: if that run has ended, "
                                        rf"delete {re.escape(str(tmp_path / NAME))}\): wait"):  # fmt: skip
        DirectoryLock.acquire(tmp_path, "checkpoint_dir", ADVICE)


# --- sweeps --------------------------------------------------------------------------------------


def test_a_second_sweep_on_one_directory_is_refused(tmp_path):
    path, out = tmp_path / "s.toml", tmp_path / "out"
    path.write_text("[base]\nhidden = [8]\nepochs = 1\n[[tasks]]\ndata = 'xor'\n")
    out.mkdir()
    held = DirectoryLock.acquire(out, "sweep directory", "x")  # "another sweep": this test process
    try:
        proc = run("hpcnn.sweep", [path, "--dir", out], timeout=60)
        assert proc.returncode == 2, proc.stderr
        pattern = in_use(out, os.getpid(), "sweep directory", "wait for it to end, or use another --dir")
        assert len(errors(proc.stderr)) == 1 and re.fullmatch(pattern, errors(proc.stderr)[0]), proc.stderr
        assert os.listdir(out) == [NAME]  # no task directory created
    finally:
        held.release()
    proc = run("hpcnn.sweep", [path, "--dir", out], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not list(out.rglob(NAME))  # the sweep's lock and its task's are gone
    assert list(out.glob("tasks/task-000/checkpoints/ckpt-*.h5"))
