"""The face every ``python -m hpcnn.<command>`` runs in: the world communicator, one message, an exit code.

A command's body runs on every rank with the world's ``Comm``; this module turns how it ends into
what the user sees: a ``JobError`` (the ranks agreed something failed) printed once by rank 0 with
its exit code on every rank; a rank failing alone ends the job (``Comm.abort``); Ctrl-C where no
training stops for it ends the job with one line (``Comm.end_job``).
"""

import os
import sys

from hpcnn.errors import EXIT_USAGE, JobError
from hpcnn.parallel import comm as comm_module
from hpcnn.parallel.comm import Comm, LaunchMismatch, launch_mismatch, say
from hpcnn.parallel.preempt import watch_interrupts


def run_command(body, argv) -> int:
    """The face of every ``python -m hpcnn.<command>``: ``body(comm, argv)`` on every rank.

    Returns ``body``'s exit code. A ``JobError`` (the ranks agreed that something failed) is printed
    once, by rank 0, and its code returned on every rank; any other exception comes from a rank
    failing alone while others may wait in a collective, and ends the job with ``abort``.
    ``body`` may set ``comm.debug`` (``--debug`` in ``argv`` sets it from the start).
    """
    try:
        comm = Comm.world()
        mismatch = launch_mismatch(comm.size)
        if mismatch is not None:
            raise mismatch
    except LaunchMismatch as exc:
        if os.environ.get(exc.rank_var, "0") == "0":  # each process may think it is rank 0: ask the launcher
            say(f"hpcnn: error: {exc}", sys.stderr)
        return EXIT_USAGE
    comm.debug = "--debug" in argv
    watch_interrupts(comm.end_job, command=True)
    code = None  # (abort and end_job end the process; should one return, the status stays 0 as ever)
    try:
        code = body(comm, argv)
    except JobError as exc:
        if comm.is_root:
            say(f"hpcnn: error: {exc.message}", sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C where no training stops for it (a training raises Interrupted)
        comm.end_job("interrupted (Ctrl-C): ending the job")
    except Exception as exc:  # noqa: BLE001  (a rank failing alone must take the job down, not hang it)
        comm.abort(exc, comm.debug)
    comm_module.exit_status = code or 0  # (a process that outlived a dead rank exits without MPI_Finalize)
    return code
