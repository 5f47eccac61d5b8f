"""Reasons to stop early that every rank must learn at the same step.

- **Signals.** SLURM sends a signal before a job's time runs out (``#SBATCH --signal=USR1@120``)
  or when it is preempted (SIGTERM, then SIGKILL after ``KillWait``); often only some ranks see
  it. A handler (installed only when checkpoints are written) just sets a flag.
- **Non-finite values.** A rank whose loss or reduced gradient holds NaN/Inf notes the step and the
  first layer affected (and skips its optimizer step, so its state stays the last finite one).
- **Bad input rows.** A rank that reads a NaN/Inf input notes the row.

Once per step every rank contributes these notes to one non-blocking MAX reduction of a few
integers, on a communicator of its own, started after the step and completed after the next one:
the check costs no waiting, and every rank learns of any note at the same step and stops there.

A signal can also arrive before training starts (MPI start-up, reading data, building the model),
which is when SLURM's warning lands if the job started late in its time slot. Commands catch the
signals from their first line with ``EarlySignals``; the training's ``StopRequest`` inherits what
it caught, so the run stops after its first step with a checkpoint instead of dying uncheckpointed.

**Ctrl-C** (SIGINT, which ``mpirun`` and ``srun`` forward to every rank, and a terminal sends to the
whole foreground process group) is a stop like the others, honoured whether or not checkpoints are
written; training then ends with ``Interrupted`` (a ``KeyboardInterrupt``) on every rank. A second
Ctrl-C ends the job at once. That second one cannot wait for the main thread: a Python signal
handler runs only between bytecodes, never while the main thread waits inside an MPI call (where a
job that needs a second Ctrl-C usually is). ``watch_interrupts`` therefore sees each SIGINT through
``signal.set_wakeup_fd`` on a thread of its own, the moment the C-level handler runs. Copies of one
Ctrl-C (the terminal's and the launcher's) arrive within milliseconds and count once.
"""

import os
import signal
import threading
import time

from hpcnn.errors import JobError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # stop with a checkpoint, for a requeue (exit code 75)
INTERRUPT = signal.SIGINT  # Ctrl-C: stop at the next step, with a checkpoint if there is a directory
ALL = (*SIGNALS, INTERRUPT)
SAME_PRESS = 0.25  # seconds: SIGINTs closer together than this are copies of one Ctrl-C
NONE = -(2**63)  # "no note": int64's minimum, neutral under MAX; fields hold -value to find minimums
SIGNAL, BAD_STEP, BAD_LAYER, BAD_LOSS, ROW_STEP, BAD_ROW = range(6)


class _Catcher:
    """Records the first of ``signals`` that arrives; a context manager that restores the previous
    handlers on exit. Nested catchers hand signals down and back up: a signal an outer one caught
    just before counts in the inner one, and one the inner one caught is passed back on exit."""

    def __init__(self, signals=ALL):
        self.signals, self.previous = signals, {}
        self.received = 0  # the first signal number this rank received

    def __enter__(self):
        if self.signals and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if sig == INTERRUPT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # Ctrl-C ignored on purpose (a background job): keep it so
                self.previous[sig] = signal.signal(sig, self._handle)
                outer = getattr(self.previous[sig], "__self__", None)
                if isinstance(outer, _Catcher):
                    self.received = self.received or outer.received
            if INTERRUPT in self.previous:  # counted once the handler is in place (see _restore)
                if _watch.graceful == 0:  # a new stop to ask for: earlier presses are spent
                    _watch.presses = 0
                _watch.graceful += 1
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def _restore(self) -> None:
        if INTERRUPT in self.previous:
            _watch.graceful -= 1
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
            outer = getattr(handler, "__self__", None)
            if isinstance(outer, _Catcher):
                outer.received = outer.received or self.received
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class EarlySignals(_Catcher):
    """Catches the stop signals (and Ctrl-C) from a command's start until its training takes over.

    ``release()`` is for a run that will not checkpoint (and so cannot honour a SIGTERM or SIGUSR1):
    it puts their previous handlers back and re-raises one caught meanwhile, which then acts as if
    it had just arrived (by default: ends the process, as it would have without this catcher).
    Ctrl-C stays caught: a training honours it with or without checkpoints.
    """

    def release(self) -> None:
        for sig in SIGNALS:
            if sig in self.previous:
                signal.signal(sig, self.previous.pop(sig))
        if self.received in SIGNALS:
            sig, self.received = self.received, 0
            signal.raise_signal(sig)


class StopRequest(_Catcher):
    """Collective stop notes over ``comm`` (an ``hpcnn.parallel.comm.Comm``); a context manager.

    ``signals``: the signals to catch (empty: leave signal handling alone).
    """

    def __init__(self, comm, signals=ALL):
        super().__init__(signals)
        import numpy as np  # here, not at the top: commands import this module before numpy

        from hpcnn.parallel.comm import (
            MAX,  # here: importing mpi4py initialises nothing before a command needs it
        )

        self.comm, self._max = comm.Dup(), MAX
        self._notes = np.array([0, NONE, NONE, 0, NONE, NONE], np.int64)
        self._send = self._notes.copy()
        self._agreed = self._notes.copy()
        self._request = None
        self.agreed = None  # after poll: the name of a signal some rank received
        self.nonfinite = None  # after poll: (step, first layer with a bad gradient or None, loss bad)
        self.bad_input = None  # after poll: (step, row)

    def note_nonfinite(self, step: int, layer: int | None, loss: bool) -> None:
        """``layer``: the first layer with a non-finite gradient (``None``: the gradient is finite)."""
        if self._notes[BAD_STEP] == NONE:
            self._notes[BAD_STEP], self._notes[BAD_LOSS] = -step, loss
            self._notes[BAD_LAYER] = NONE if layer is None else -layer

    def note_bad_input(self, step: int, row: int) -> None:
        if self._notes[ROW_STEP] == NONE:
            self._notes[ROW_STEP], self._notes[BAD_ROW] = -step, -row

    @property
    def local_trouble(self) -> bool:
        """Whether this rank has noted non-finite values or bad input (not yet agreed)."""
        return self._notes[BAD_STEP] != NONE or self._notes[ROW_STEP] != NONE

    def poll(self) -> bool:
        """Collective, once per step: whether any rank had noted a reason to stop a step ago.
        Every rank gets the same answer; after ``True`` no reduction is left pending."""
        if self._request is not None:
            self._request.Wait()
            self._request = None
            if self._decode():
                return True
        self._load()
        self._request = self.comm.Iallreduce(self._send, self._agreed, op=self._max)
        return False

    def drain(self) -> bool:
        """Collective, after the last step: complete the pending check and check once more,
        blocking, so that nothing noted during the last steps goes unseen."""
        if self.poll():
            return True
        self._request.Wait()
        self._request = None
        if self._decode():
            return True
        self._load()
        self.comm.Allreduce(self._send, self._agreed, op=self._max)
        return self._decode()

    def _load(self) -> None:
        self._send[:] = self._notes
        self._send[SIGNAL] = self.received

    def _decode(self) -> bool:
        a = self._agreed
        if a[SIGNAL]:
            self.agreed = signal.Signals(int(a[SIGNAL])).name
        if a[BAD_STEP] != NONE:
            layer = None if a[BAD_LAYER] == NONE else -int(a[BAD_LAYER])
            self.nonfinite = (-int(a[BAD_STEP]), layer, bool(a[BAD_LOSS]))
        if a[ROW_STEP] != NONE:
            self.bad_input = (-int(a[ROW_STEP]), -int(a[BAD_ROW]))
        return self.agreed is not None or self.nonfinite is not None or self.bad_input is not None

    def __exit__(self, *exc) -> None:
        # Leaving normally or with a JobError (raised on every rank alike), every rank started the
        # pending check: complete it and free the communicator. Otherwise one rank is failing alone.
        together = exc[0] is None or issubclass(exc[0], JobError)
        if self._request is not None and together:
            self._request.Wait()
        self._request = None
        self._restore()
        if together:
            self.comm.Free()


class HeldInterrupts(_Catcher):
    """Holds Ctrl-C for a training's stop check from ``fit()``'s first line to its last, so that
    a Ctrl-C during set-up or shutdown (where ranks meet in collectives) is honoured as a stop,
    or by a second Ctrl-C ending the job, instead of a ``KeyboardInterrupt`` on some ranks only."""

    def __init__(self):
        super().__init__((INTERRUPT,))


class Interrupted(KeyboardInterrupt):
    """Raised on every rank when training stopped for a Ctrl-C, after the agreed stop (and its
    checkpoint, when checkpoints are written). ``result``: the training's result so far."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.message, self.result = message, result


class _InterruptWatch:
    """Sees every SIGINT as it arrives (see the module docstring) and ends the job when a Ctrl-C
    will not be honoured by an agreed stop: a second one while a stop is pending, and, in a command
    (``command``), the first one when no catcher is armed (``graceful == 0``). In a user's program
    outside ``fit()`` a Ctrl-C stays Python's own ``KeyboardInterrupt``."""

    def __init__(self):
        self.graceful = 0  # catchers of SIGINT now installed (a training or start-up will stop)
        self.presses, self.last = 0, -1.0
        self.end_job = None  # called (from the watch thread) with the message to end the job with
        self.command = False  # a command's process, where nothing but hpcnn's own code runs
        self._thread = None

    def start(self, end_job, command: bool) -> None:
        # The first caller's way of ending the job stays: a command's (the whole world's), not
        # that of a sweep task's group, whose every root would speak.
        self.end_job = self.end_job or end_job
        self.command = self.command or command
        if self._thread is not None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(INTERRUPT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            return  # Ctrl-C is ignored (e.g. a background job) or not Python's to handle
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            previous = None
        if previous != -1:  # not possible here, or someone's (an asyncio loop's): leave it theirs
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(read), os.close(write)
            return
        owner = getattr(signal.getsignal(INTERRUPT), "__self__", None)
        if isinstance(owner, _Catcher) and owner.received == INTERRUPT:
            self.presses, self.last = 1, time.monotonic()  # a Ctrl-C during start-up counts
        self._thread = threading.Thread(target=self._run, args=(read,), name="hpcnn-interrupts", daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == INTERRUPT:
                    self._press(time.monotonic())

    def _press(self, now: float) -> None:
        if now - self.last < SAME_PRESS:
            return
        self.last = now
        if self.graceful == 0:  # no stop to wait for
            if self.command:
                self.end_job("interrupted (Ctrl-C): ending the job")
            return
        self.presses += 1
        if self.presses >= 2:
            self.end_job("interrupted again (Ctrl-C): ending the job now, without a checkpoint")


_watch = _InterruptWatch()


def watch_interrupts(end_job, command: bool = False) -> None:
    """From now on, end the job with ``end_job(message)`` on a second Ctrl-C while a stop is pending,
    and in a ``command`` also on the first one when nothing is there to stop at a step (main
    thread only; the watch thread starts once per process)."""
    _watch.start(end_job, command)
