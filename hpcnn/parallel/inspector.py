"""Stall inspector: no rank waits forever, and rank 0 says who is missing and where.

Every rank records the operation it is in (``mark``, which the training's probe calls as its
phases change): setup, reading data, forward/backward, a pipeline receive, the gradient reduction,
the optimizer step, evaluation, a checkpoint write. A
thread on each rank sends ``(step, operation, seconds in it)`` to rank 0 once per ``period`` over a
communicator of its own (mpi4py releases the GIL inside blocking MPI calls and initialises MPI
with ``MPI_THREAD_MULTIPLE``, so the thread runs while the main thread waits in a collective).

Rank 0's thread declares a stall when a rank has been in one operation longer than the deadline,
or has not been heard from for that long (a dead or frozen process). It prints which ranks are
waiting where, which have not arrived and where they are, and ends the job with ``EXIT_STALL``.

Rank 0 itself may be the rank that is lost (frozen by SIGSTOP, swapped out, dead without its
launcher noticing). The other ranks' threads never block on it: heartbeats are synchronous-mode
sends (``Issend``), which complete only once rank 0's thread has taken them, and are only tested,
never waited for; a new one is posted when the last was taken. A heartbeat not taken for longer
than the deadline means rank 0 is not listening: the rank ends the job naming rank 0 (rank 1
first; others a moment later, so that one message is printed). A rank whose own operation outlasts
twice the deadline ends the job too, whatever the reason. Every rank is therefore gone within
``2 x deadline`` plus a few seconds, whichever rank froze.

Deadline: ``--stall-timeout`` seconds; 0 (the default) adapts to the run: 20 x the longest
training step so far, at least 60 s, and at least 600 s for setup, evaluation, checkpoint writes
and the first step (no step time is known yet).

At the end every rank's time is split into computing and waiting (receives, reductions), and
rank 0 names the slowest rank: stragglers show up without a profiler.
"""

import sys
import threading
import time

import numpy as np

from hpcnn.errors import EXIT_STALL
from hpcnn.parallel.comm import REQUEST_NULL, Request, abort_job, process_failure, say, threads_supported

OPS = (
    "setup",
    "read data",
    "forward/backward",
    "pipeline receive",
    "evaluation receive",
    "evaluation allreduce",
    "gradient allreduce",
    "optimizer step",
    "parameter allgather",
    "stop check",
    "evaluation",
    "checkpoint",
    "finishing",
    "done",
)
_INDEX = {name: i for i, name in enumerate(OPS)}
WAITING = frozenset(
    _INDEX[n]
    for n in (
        "pipeline receive",
        "evaluation receive",
        "evaluation allreduce",
        "gradient allreduce",
        "parameter allgather",
        "stop check",
        "finishing",
    )
)
LONG = frozenset(
    _INDEX[n] for n in ("setup", "evaluation", "evaluation receive", "evaluation allreduce", "checkpoint")
)
DONE = _INDEX["done"]
HEARTBEAT = 1
FLOOR, LONG_FLOOR, STEPS = 60.0, 600.0, 20.0
AWAY = 3  # periods a thread may miss before it takes itself for the one that was away
STAGGER, STAGGERED = 2.0, 2  # seconds between ranks 1, 2, 3+ ending a job themselves (Open MPI kills slowly)


class Inspector:
    """Watch the ranks of ``comm`` (an ``hpcnn.parallel.comm.Comm``); ``timeout`` 0 means automatic."""

    def __init__(self, comm, timeout: float = 0.0, period: float = 1.0):
        self.comm = comm.Dup()
        self.timeout, self.period = timeout, period
        self.op, self.detail, self.step = 0, 0, 0
        self.since = time.monotonic()
        self.longest_step = 0.0
        self.totals = [0.0] * len(OPS)  # seconds spent in each operation
        self._stop = threading.Event()
        self._thread, self._abandoned = None, False
        self._last_wake, self._quiet_until = time.monotonic(), 0.0
        if not threads_supported():
            return  # MPI without MPI_THREAD_MULTIPLE: no helper thread may call it (times still kept)
        if comm.is_root:
            size = self.comm.size
            self._state_of, self._inbox = np.zeros((size, 4)), np.zeros((size, 4))
            self._heard, self._done = np.full(size, time.monotonic()), np.zeros(size, bool)
            self._done[0] = True
            self._requests = [self.comm.Irecv(self._inbox[r], r, HEARTBEAT) for r in range(1, size)]
        target = self._watch if comm.is_root else self._beat
        self._thread = threading.Thread(
            target=self._guarded, args=(target,), name="hpcnn-stall-inspector", daemon=True
        )
        self._thread.start()

    # --- the main thread ------------------------------------------------------------------

    def mark(self, op: str, detail: int = 0) -> None:
        """This rank now starts ``op`` (``detail``: e.g. the stage a receive waits for)."""
        now = time.monotonic()
        self.totals[self.op] += now - self.since
        self.op, self.detail, self.since = _INDEX[op], detail, now

    def step_done(self, step: int, seconds: float) -> None:
        self.step = step
        self.longest_step = max(self.longest_step, seconds)

    def close(self, report=None) -> None:
        """Stop the thread; collective (every rank of ``comm``). With ``report`` (rank 0's log),
        say which rank computed longest and how long each waited."""
        # The collective part runs while the threads still watch: a rank lost now is still found.
        self.mark("finishing")
        waiting = sum(self.totals[i] for i in WAITING)
        rows = self.comm.gather((sum(self.totals) - waiting, waiting), root=0)
        self.mark("done")
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # a rank's thread ends by sending its last heartbeat: "done"
            if self.comm.is_root:  # nothing may be left in flight when the communicator is freed
                while not self._done.all():
                    self._collect()
                    time.sleep(0.001)
        if report is not None and rows is not None and len(rows) > 1:
            slow = max(range(len(rows)), key=lambda r: rows[r][0])
            fast = min(range(len(rows)), key=lambda r: rows[r][0])
            report(
                f"time per rank (computing / waiting): slowest rank {slow}: {rows[slow][0]:.2f} s / "
                f"{rows[slow][1]:.2f} s; fastest rank {fast}: {rows[fast][0]:.2f} s / {rows[fast][1]:.2f} s"
            )
        self.comm.Free()

    def abandon(self) -> None:
        """Stop the thread without the collective shutdown (an error is ending the run)."""
        self._abandoned = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # --- the thread -----------------------------------------------------------------------

    def _guarded(self, target) -> None:
        """Run the thread; a dead rank that MPI reports (``--elastic``: ULFM) ends it quietly: the
        main thread meets the same failure in its next MPI call and recovers from it, and the
        recovered run watches its ranks with a new inspector."""
        try:
            target()
        except Exception as exc:
            if not process_failure(exc):
                raise

    def deadline(self, op: int) -> float:
        if self.timeout > 0:
            return self.timeout
        if op in LONG or self.longest_step == 0.0:
            return max(LONG_FLOOR, STEPS * self.longest_step)
        return max(FLOOR, STEPS * self.longest_step)

    def _state(self) -> np.ndarray:
        op, detail, since, step = self.op, self.detail, self.since, self.step  # one consistent read
        return np.array([step, op, detail, time.monotonic() - since])

    def _beat(self) -> None:
        """Any rank but 0: send the state to rank 0; end the job if rank 0 stops taking the
        heartbeats or this rank itself is stuck. Never blocks while the job runs."""
        request, posted = None, time.monotonic()
        while not self._stop.wait(self.period):
            now = time.monotonic()
            state = self._state()
            op = int(state[1])
            if op == DONE:  # close() is stopping this thread: the only "done" heartbeat is the last
                break
            if request is None or request.Test():
                self._beat_buffer = state  # keep the buffer alive until rank 0 has taken it
                request, posted = self.comm.Issend(state, 0, HEARTBEAT), now
            if self._away(now):
                posted = max(posted, now - self.period)  # this rank's absence, not rank 0's
                continue
            # Rank 1 speaks first; the others wait a little longer, so that one message is printed.
            grace = 2 * self.period + STAGGER * min(self.comm.rank - 1, STAGGERED)
            untaken = now - posted
            if untaken > self.deadline(op) + grace:
                self._fail(
                    f"rank 0 is lost: it has not taken rank {self.comm.rank}'s heartbeat for "
                    f"{untaken:.0f} s (deadline {self.deadline(op):.0f} s, see --stall-timeout); rank "
                    f"{self.comm.rank} was in {OPS[op]} at step {int(state[0])} for {state[3]:.0f} s"
                )
            elif state[3] > 2 * self.deadline(op) + grace:
                self._fail(
                    f"rank {self.comm.rank}: no progress for {state[3]:.0f} s in {OPS[op]} at step "
                    f"{int(state[0])}, and rank 0 did not end the job (rank 0 may be lost)"
                )
        if self._abandoned:  # an error is ending the job: rank 0 may never take another message
            return
        # The last heartbeat says "done"; rank 0 waits for every rank's before freeing the
        # communicator. Every rank is past the closing collective: rank 0 is listening.
        if request is not None:
            request.Wait()
        self._beat_buffer = self._state()
        self.comm.Issend(self._beat_buffer, 0, HEARTBEAT).Wait()

    def _collect(self) -> None:
        """Rank 0: take in every heartbeat that has arrived. One receive stays posted per rank, and
        the test is repeated until nothing more completes: when rank 0's main thread makes no MPI
        calls (stuck in computation), each test may progress only one incoming message."""
        while completed := Request.Testsome(self._requests):
            for r in completed:
                source = r + 1
                self._state_of[source], self._heard[source] = self._inbox[source], time.monotonic()
                if int(self._inbox[source, 1]) == DONE:
                    self._done[source] = True
                    self._requests[r] = REQUEST_NULL
                else:
                    self._requests[r] = self.comm.Irecv(self._inbox[source], source, HEARTBEAT)

    def _away(self, now: float) -> bool:
        """Whether this thread has just come back from not running for several periods (its process
        was stopped: SIGSTOP, then SIGCONT, as Open MPI sends before killing a job). Its clocks then
        measure its own absence, not the other ranks': it judges nobody for a few periods."""
        gap = now - self._last_wake - self.period
        self._last_wake = now
        if gap > AWAY * self.period:
            self._quiet_until = now + AWAY * self.period
        return now < self._quiet_until

    def _watch(self) -> None:
        """Rank 0: collect heartbeats, diagnose a stall, end the job."""
        while not self._stop.wait(self.period):
            self._collect()
            now = time.monotonic()
            self._state_of[0], self._heard[0] = self._state(), now
            if self._away(now):
                self._heard[:] = np.maximum(self._heard, now - self.period)  # its absence, not theirs
                continue
            message = diagnose(self._state_of, now - self._heard, self.deadline, 2 * self.period)
            if message is not None and not self._stop.is_set():
                self._fail(message)

    def _fail(self, message: str) -> None:
        say(f"hpcnn: error: stall: {message}", sys.stderr)
        time.sleep(0.5)  # let the launcher forward the message before it tears the job down
        abort_job(EXIT_STALL)


def diagnose(state, silent, deadline, slack: float = 0.0) -> str | None:
    """The stall report for ``state`` rows ``(step, op, detail, seconds in op)`` per rank and
    ``silent`` (seconds since each rank was heard from), or ``None`` if nothing is late.

    A rank silent for longer than its deadline is *lost*. Silence is counted from when rank 0 took
    a rank's last heartbeat, up to ``slack`` (two heartbeat periods: one for rank 0 to take a
    heartbeat, one for the sender to see it taken and send the next) after the rank sent it, so a
    rank that froze just as the others began to wait for it reads as silent for up to ``slack``
    less than they have waited when their wait passes the deadline. For deadlines of ten times
    ``slack`` and more, silence within ``slack`` of the deadline is therefore taken as lost too; for
    shorter ones it is not, as a live rank's heartbeat can be that stale on oversubscribed cores."""
    ops = state[:, 1].astype(int)
    age = state[:, 3] + silent  # seconds in the current operation, extrapolated to now
    late = [r for r in range(len(state)) if ops[r] != DONE and age[r] > deadline(ops[r])]
    if not late:
        return None
    where = lambda r: f"{OPS[ops[r]]}{_detail(ops[r], state[r, 2])} at step {int(state[r, 0])}"  # noqa: E731
    limit = max(deadline(ops[r]) for r in late)
    lines = [f"no progress for {age[late].max():.0f} s (deadline {limit:.0f} s, see --stall-timeout)"]
    groups: dict[str, list[int]] = {}
    lost = []
    for r in range(len(state)):
        limit = deadline(ops[r])
        if silent[r] > limit - (slack if limit >= 10 * slack else 0.0):
            lost.append(r)
        elif ops[r] in WAITING:
            groups.setdefault(where(r), []).append(r)
    for place, ranks in groups.items():
        lines.append(f"waiting in {place}: ranks {_ranks(ranks)}")
    absent = [r for r in range(len(state)) if r not in lost and ops[r] not in WAITING and ops[r] != DONE]
    for r in absent:
        lines.append(f"not arrived: rank {r}, in {where(r)} for {age[r]:.0f} s")
    for r in lost:
        lines.append(f"lost: rank {r}, not heard from for {silent[r]:.0f} s (last seen in {where(r)})")
    return "\n  ".join(lines)


def _detail(op: int, detail: float) -> str:
    return f" from stage {int(detail)}" if OPS[op].endswith("receive") else ""


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 16 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
