"""Real jobs that tests watch from outside: start ``python -m hpcnn.<command>`` under mpiexec, find
each rank's process, send signals to the launcher or to one rank, and check that every process is
gone in time.

Not a test module. Each job's processes carry a unique ``HPCNN_TEST_JOB`` variable, which is how
they are found (launchers start ranks in sessions of their own, so the launcher's process group
does not reach them) and how leftovers are killed when a test fails.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from test_train import MPIEXEC, ROOT, launch_env

MARK = "HPCNN_TEST_JOB"


def _launcher_version() -> str:
    try:
        proc = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired, TypeError):
        return ""
    return proc.stdout + proc.stderr


# MPICH's mpiexec (hydra) forwards a Ctrl-C to every rank. Open MPI's mpirun does not: it ends the
# job (SIGCONT, SIGTERM, and SIGKILL a second later); Ctrl-C reaches Open MPI's ranks only when
# they are signalled themselves (as srun forwards it, or `kill -INT` of the ranks).
FORWARDS_CTRL_C = "HYDRA" in _launcher_version()
RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return []


def _python(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve() == Path(sys.executable).resolve()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not looked yet


class Job:
    """One ``mpiexec -n RANKS python -m MODULE ARGS`` run, its output collected as it comes."""

    def __init__(self, args, ranks: int = 4, env=None, module: str = "hpcnn.train", cwd=ROOT, script=None):
        """``script``: run ``python -c SCRIPT ARGS`` instead of ``python -m MODULE ARGS``."""
        self.mark = uuid.uuid4().hex
        what = ["-c", script] if script is not None else ["-m", module]
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, *what, *map(str, args)]
        self.ranks = ranks
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=launch_env({**(env or {}), MARK: self.mark}), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.out, self.err = [], []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()
        self.signalled_at = None

    @staticmethod
    def _read(stream, lines) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def processes(self) -> dict[int, int]:
        """{rank: pid} of this job's hpcnn processes now alive."""
        found = {}
        tag = f"{MARK}={self.mark}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.proc.pid:
                continue
            env = _environ(int(entry))
            if tag not in env or not _alive(int(entry)):
                continue
            for item in env:
                for var in RANK_VARS:
                    if item.startswith(var) and _python(int(entry)):
                        found[int(item[len(var) :])] = int(entry)
        return found

    def leftovers(self) -> list[int]:
        """Every process of this job still alive (launcher, proxies, ranks)."""
        tag = f"{MARK}={self.mark}".encode()
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and tag in _environ(int(e))]
        pids = [p for p in pids if _alive(p)]
        if self.proc.poll() is None:
            pids.append(self.proc.pid)
        return pids

    def wait_for(self, pattern: str, timeout: float = 60.0) -> None:
        """Wait until the output so far matches ``pattern`` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.stdout + self.stderr, re.M):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never saw {pattern!r}:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.02)

    def wait_for_ranks(self, timeout: float = 30.0) -> dict[int, int]:
        """Wait until every rank's process is there; returns {rank: pid}."""
        deadline = time.monotonic() + timeout
        while len(found := self.processes()) < self.ranks:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"only ranks {sorted(found)} started")
            time.sleep(0.02)
        return found

    def signal_launcher(self, sig) -> None:
        self.signalled_at = self.signalled_at or time.monotonic()
        self.proc.send_signal(sig)

    def ctrl_c(self) -> None:
        """A Ctrl-C as it reaches the ranks: through the launcher where it forwards one, else to
        every rank (what srun does)."""
        if FORWARDS_CTRL_C:
            self.signal_launcher(signal.SIGINT)
        else:
            for rank in self.processes():
                self.signal_rank(rank, signal.SIGINT)

    def signal_rank(self, rank: int, sig) -> None:
        pid = self.processes()[rank]
        self.signalled_at = self.signalled_at or time.monotonic()
        os.kill(pid, sig)

    def finish(self, timeout: float) -> tuple[int, float]:
        """Wait until every process of the job is gone; returns (exit code, seconds since the first
        signal, or since the start). Fails, after killing what is left, if that takes longer than
        ``timeout`` seconds."""
        start = self.signalled_at or self.t0
        deadline = start + timeout
        while self.leftovers():
            if time.monotonic() > deadline:
                left = self.leftovers()
                self.kill()
                raise AssertionError(
                    f"processes {left} still alive {timeout} s after the signal:\n{self.stdout}\n"
                    f"{self.stderr}"
                )
            time.sleep(0.05)
        seconds = time.monotonic() - start
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        return self.proc.returncode, seconds

    def kill(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def hpcnn_lines(self) -> list[str]:
        """hpcnn's own lines on stderr (messages, not the launcher's)."""
        return [line.rstrip("\n") for line in self.err if line.startswith("hpcnn:")]
