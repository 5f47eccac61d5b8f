"""Stop requests: SIGTERM/SIGUSR1 on any rank stop every rank after the same step.

SLURM sends a signal before a job's time runs out (``#SBATCH --signal=USR1@120``) or when it is
preempted (SIGTERM, then SIGKILL after ``KillWait``); often only some ranks see it, at different
moments. A handler only sets a flag. Once per step every rank contributes its flag to a
non-blocking MAX reduction on a communicator of its own, started after the step and completed
after the next one, so the check costs no waiting and every rank learns of the request at the same
step: all of them then write the same checkpoint and exit with ``EXIT_PREEMPTED``.
"""

import signal
import threading

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Collective stop flag over ``comm`` (an ``hpcnn.comm.Comm``); use as a context manager."""

    def __init__(self, comm, signals=SIGNALS):
        self.comm = comm.dup()
        self.signals, self.previous = signals, {}
        self.received = 0  # the first signal number this rank received
        self.agreed = None  # the name of a signal some rank received, once all ranks know it
        self._send = np.zeros(1, np.int32)
        self._agreed = np.zeros(1, np.int32)
        self._request = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def poll(self) -> bool:
        """Collective, once per step: whether any rank had received a signal a step ago (then
        ``agreed`` names one of the signals received, the same on every rank)."""
        if self._request is not None:
            self._request.Wait()
            if self._agreed[0]:
                self.agreed = signal.Signals(int(self._agreed[0])).name
        self._send[0] = self.received
        self._request = self.comm.iallreduce_max(self._send, self._agreed)
        return self.agreed is not None

    def __exit__(self, *exc) -> None:
        if self._request is not None and exc[0] is None:
            self._request.Wait()  # every rank started it; complete it before freeing the communicator
        self._request = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if exc[0] is None:
            self.comm.free()
