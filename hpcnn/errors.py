"""Errors the face (``train``) turns into one message and an exit code.

Library code raises ``UserError`` where user input (flags, config files, data files) is wrong and
plain exceptions or ``assert`` for internal faults. ``JobError`` is what every rank raises once the
ranks have agreed that some rank failed, so that all of them exit together and only rank 0 speaks.
A directory that another run holds (``hpcnn.io.dirlock``) is a ``UserError``: exit code 2.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an environment fault: report it with --debug's traceback
EXIT_USAGE = 2  # bad flags, config, or data: the message says what to change
# Stopped by SIGTERM/SIGUSR1 after writing a checkpoint: resume with --resume auto. 75 is
# sysexits' EX_TEMPFAIL ("try again later"), which a job script can turn into a requeue.
EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3  # the loss or a gradient became NaN/Inf: training stopped, checkpoints untouched
EXIT_STALL = 4  # the stall inspector ended a job in which some rank stopped making progress
# Ctrl-C (SIGINT): the shell's convention, 128 + the signal number. The first one stops every rank
# after the same step (with a checkpoint, when a directory is set); a second one ends the job at once.
EXIT_INTERRUPTED = 130
# A checkpoint could not be written (disk full, I/O error, directory gone): the message names the
# directory, the bytes needed and free; the temporary file is removed, earlier checkpoints are
# intact. 74 is sysexits' EX_IOERR.
EXIT_IO = 74


class UserError(Exception):
    """Bad input from the user; the message names the flag, key, file or value and what is expected."""


class JobError(Exception):
    """Raised on every rank after some rank failed; ``message`` is the one line rank 0 prints."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code
