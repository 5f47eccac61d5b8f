"""pytest set-up shared by all tests, and which test runs where.

Three kinds of test, told apart by file name and marker (checked at collection: a ``mpi`` test
outside a ``*_mpi.py`` file, or a test without the mark inside one, is an error):

* ``test_X.py``: serial tests, run in the one pytest process (CTest's ``serial`` entry), and tests
  marked ``@pytest.mark.launches`` that start their own jobs under mpiexec through
  ``tests/launch.py`` (CTest's ``launches`` entry, and ``interrupts`` for test_interrupts.py, each
  a test of its own so that ``serial`` is one process). A test that starts ``python -m hpcnn.X``
  without mpiexec is serial. ``launches`` tests are skipped where there is no mpiexec, and
  ``launch.command`` refuses mpiexec for a test without the mark.
* ``test_X_mpi.py``: every test marked ``@pytest.mark.mpi``, run by pytest itself under mpiexec, one
  pytest per rank (``mpiexec -n N python -m pytest --with-mpi -m mpi tests``: CTest's ``mpi_N``).
* ``launch.py``, ``run_expect.py``: helpers, not test modules.

Under ``--with-mpi`` (pytest-mpi, one pytest per rank started by mpiexec):

* every rank gets its own flat ``--basetemp``. By default all ranks share
  ``/tmp/pytest-of-USER/pytest-N`` and number and prune those directories concurrently, so one rank
  can delete or take the directory another is using (flaky ``mpi_tmp_path``/``tmp_path``).
  pytest-mpi's ``mpi_tmp_path`` still hands every rank rank 0's directory.
* only rank 0 prints pytest's report; the other ranks print one line per failure (with their rank)
  and still exit non-zero on failure, which mpiexec passes on. Set ``HPCNN_PYTEST_ALL_RANKS=1`` to
  see every rank's full report.

mpi4py is imported only under ``--with-mpi``.
"""

import os
import sys
import tempfile

import launch
import pytest

ALL_RANKS_VAR = "HPCNN_PYTEST_ALL_RANKS"


def _with_mpi(config) -> bool:
    # getoption's default covers a run without the pytest-mpi plugin (no --with-mpi option).
    return bool(
        config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi", default=False)
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # tryfirst: before pytest's tmpdir plugin reads config.option.basetemp in its pytest_configure.
    if not _with_mpi(config):
        return
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    if config.option.basetemp is None:
        config.option.basetemp = os.path.join(tempfile.gettempdir(), f"pytest-mpi-{os.getuid()}-rank{rank}")
    if rank != 0 and os.environ.get(ALL_RANKS_VAR, "") in ("", "0"):
        config.pluginmanager.register(_QuietRank(config, rank), "hpcnn-quiet-rank")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: before -m deselects, so that every collected test is checked, whatever the selection.
    misplaced = [
        item.nodeid
        for item in items
        if (item.get_closest_marker("mpi") is not None) != item.path.stem.endswith("_mpi")
    ]
    if misplaced:
        raise pytest.UsageError(
            "@pytest.mark.mpi tests belong in tests/*_mpi.py, and only they (tests/conftest.py): "
            + ", ".join(misplaced)
        )
    if launch.MPIEXEC is None:
        skip = pytest.mark.skip(reason="launches mpiexec, and there is none on PATH or beside Python")
        for item in items:
            if item.get_closest_marker("launches") is not None:
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # tryfirst: before the test's fixtures are set up (a fixture may start a job too).
    launch.may_launch = item.get_closest_marker("launches") is not None


class _QuietRank:
    """On a rank other than 0: send pytest's terminal report to os.devnull, keep one line per failure."""

    def __init__(self, config, rank: int):
        self.config = config
        self.rank = rank
        self.failures = 0
        self.reporter = None

    def pytest_plugin_registered(self, plugin, manager):
        # pytest's terminal plugin creates the reporter in its pytest_configure, after ours (tryfirst);
        # swap it at once for one that writes to os.devnull, so that everything that looks it up
        # (logging, --pdb, ...) still finds one, and nothing it would print reaches the terminal.
        if plugin is self.reporter or manager.get_name(plugin) != "terminalreporter":
            return
        devnull = open(os.devnull, "w")  # noqa: SIM115  (closed at unconfigure)
        self.config.add_cleanup(devnull.close)
        self.reporter = pytest.TerminalReporter(self.config, devnull)
        manager.unregister(plugin)
        manager.register(self.reporter, "terminalreporter")

    def _say(self, text: str) -> None:
        sys.stderr.write(f"[rank {self.rank}] {text}\n")
        sys.stderr.flush()

    def _report(self, report, what: str) -> None:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            where = f"{crash.path}:{crash.lineno}: {crash.message.splitlines()[0] if crash.message else ''}"
        else:
            where = (str(report.longrepr).strip().splitlines() or [""])[-1]
        self._say(f"{what} {report.nodeid} - {where}")

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failures += 1
            self._report(report, "FAILED" if report.when == "call" else f"ERROR ({report.when})")

    def pytest_collectreport(self, report):
        if report.failed:
            self.failures += 1
            self._report(report, "ERROR collecting")

    def pytest_sessionfinish(self, session, exitstatus):
        if int(exitstatus) not in (0, 5):
            self._say(
                f"pytest exit status {int(exitstatus)}, {self.failures} failure(s) on this rank "
                f"(set {ALL_RANKS_VAR}=1 for every rank's full report)"
            )


@pytest.fixture(scope="module")
def world():
    """The world communicator of an MPI test module, with the CLI's BLAS threads per rank (ranks x
    threads must not exceed the cores)."""
    from hpcnn.parallel.comm import Comm, blas_threads

    comm = Comm.world()
    blas_threads(comm.local_size)
    return comm


@pytest.fixture
def shared(world):
    """A directory every rank sees (each rank's ``tmp_path`` is its own), removed afterwards."""
    path = world.bcast(tempfile.mkdtemp(prefix="hpcnn-shared-") if world.is_root else None)
    yield path
    world.Barrier()
    if world.is_root:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
