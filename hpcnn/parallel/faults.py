"""Test-only fault injection: ``HPCNN_FAULT="KIND@SITE:rank=R,step=S"``.

hpcnn's failure handling (one message, every rank gone within seconds, no hang) is tested by making
real runs fail on purpose. The variable names what goes wrong, where, on which world rank and at
which optimizer step (0-based; ``step`` may be left out: the first time the site is reached):

- KIND: ``raise`` (a RuntimeError), ``kill`` (SIGKILL to the process: a crashed or OOM-killed
  rank), ``hang`` (sleep forever: a stuck rank), ``freeze`` (SIGSTOP to the process: every thread
  stops, as in a swapped-out or debugger-held process), ``sleep`` (pause ``seconds=T``, default 2,
  then go on: a slow moment for a test to aim a signal at), ``nan`` (at ``data``: an input value becomes NaN;
  at ``forward``: the stage's output does), ``diverge`` (at ``optimizer``: perturb this rank's
  parameters, a silently diverged replica), ``enospc`` and ``eio`` (at ``checkpoint``: this rank's
  next write to the checkpoint file fails with "No space left on device" / "Input/output error";
  with the gathering writer only rank 0 writes, so name rank 0);
- SITE: ``setup`` (the start of a training's set-up, before its data is opened), ``data`` (after
  reading a batch), ``forward``, ``backward``, ``allreduce`` (just before the gradient
  reduction), ``optimizer``, ``allgather`` (``--zero``: just before the parameters' all-gather),
  ``checkpoint`` (inside a checkpoint write), ``evaluation``, ``recovery`` (``--elastic``: after the
  survivors of a failure have agreed on the step to go on from; ``step`` is that step).

Example: ``HPCNN_FAULT=raise@backward:rank=2,step=5 mpirun -n 4 python -m hpcnn.train``, or
``HPCNN_FAULT=sleep@checkpoint:rank=0,step=9,seconds=3``; several faults are separated by ``;``
(``kill@backward:rank=3,step=5;kill@recovery:rank=1``).

``armed(world_rank)`` reads the variable: ``None`` when it is unset (nothing is ever checked), else
the ``Fault`` this process may fire. The training's probe (``hpcnn.parallel.probe``) holds it and
fires it at the sites it passes, with the step it is at.
"""

import errno
import os
import signal
import sys
import time

KINDS = ("raise", "kill", "hang", "freeze", "sleep", "nan", "diverge", "enospc", "eio")
SITES = (
    "setup", "data", "forward", "backward", "allreduce", "optimizer", "allgather", "checkpoint", "evaluation",
    "recovery",
)  # fmt: skip
VARIABLE = "HPCNN_FAULT"
ERRNOS = {"enospc": errno.ENOSPC, "eio": errno.EIO}  # the write errors the checkpoint writers simulate
# kinds the caller carries out, and where
ACTING = {"nan": ("data", "forward"), "diverge": ("optimizer",), **dict.fromkeys(ERRNOS, ("checkpoint",))}


class Fault:
    """One armed fault: ``kind`` at ``site`` on world rank ``rank`` at ``step`` (``None``: the
    first time the site is reached), fired at most once."""

    def __init__(
        self, kind: str, site: str, ranks: tuple, step: int | None, seconds: float, world_rank: int
    ):  # fmt: skip
        self.kind, self.site, self.ranks, self.step = kind, site, ranks, step
        self.seconds = seconds  # how long a ``sleep`` pauses
        self.here = world_rank in ranks  # whether this process is one that fails
        self.fired = False

    def point(self, site: str, step: int) -> str | None:
        """Called at each site. Returns the kind when the caller must act (``ACTING``); raises,
        kills or hangs for the other kinds; ``None`` when this fault is not due here and now."""
        if site != self.site or not self.here or self.fired or (self.step is not None and self.step != step):
            return None
        self.fired = True
        kind = self.kind
        if kind == "raise":
            raise RuntimeError(f"injected fault at {site}, step {step}")
        if kind == "kill":  # said on stderr with the time, so that a test can time what follows
            print(
                f"{VARIABLE}: killing at {site}, step {step}, at {time.time():.6f}",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "freeze":  # said on stderr, so that a test can time what follows from this moment
            print(f"{VARIABLE}: freezing at {site}, step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            return None
        if kind == "sleep":  # said on stderr, so that a test can aim a signal at the pause
            print(
                f"{VARIABLE}: sleeping {self.seconds:g} s at {site}, step {step}", file=sys.stderr, flush=True
            )
            time.sleep(self.seconds)
            return None
        return kind


class Faults:
    """Several faults (``A;B``: e.g. a rank killed, then another during the recovery)."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults

    def point(self, site: str, step: int) -> str | None:
        for fault in self.faults:
            kind = fault.point(site, step)
            if kind is not None:
                return kind
        return None


def armed(world_rank: int, text: str | None = None) -> Fault | Faults | None:
    """The fault ``text`` (default: the ``HPCNN_FAULT`` variable) arms for the process of world
    rank ``world_rank``, or ``None`` without one; ``A;B`` arms both. ``ValueError`` names the
    expected form."""
    text = os.environ.get(VARIABLE) if text is None else text
    if not text:
        return None
    if ";" in text:
        return Faults([armed(world_rank, part) for part in text.split(";") if part])
    try:
        head, _, tail = text.partition(":")
        kind, site = head.split("@")
        fields = dict(part.split("=") for part in tail.split(",") if part)
        ranks = tuple(int(r) for r in fields.get("rank", "0").split("+"))
        step = int(fields["step"]) if "step" in fields else None
        seconds = float(fields.get("seconds", 2.0))
    except (ValueError, KeyError):
        raise ValueError(f"{VARIABLE}={text!r}: expected KIND@SITE:rank=R,step=S") from None
    if kind not in KINDS or site not in SITES:
        raise ValueError(f"{VARIABLE}={text!r}: KIND is one of {KINDS}, SITE one of {SITES}")
    if kind in ACTING and site not in ACTING[kind]:
        raise ValueError(f"{VARIABLE}={text!r}: {kind} acts only at {', '.join(ACTING[kind])}")
    if set(fields) - {"rank", "step", "seconds"} or ("seconds" in fields and kind != "sleep"):
        raise ValueError(f"{VARIABLE}={text!r}: fields are rank, step (and seconds, for sleep)")
    return Fault(kind, site, ranks, step, seconds, world_rank)
