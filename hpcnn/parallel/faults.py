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
  reduction), ``optimizer``, ``checkpoint`` (inside a checkpoint write), ``evaluation``.

Example: ``HPCNN_FAULT=raise@backward:rank=2,step=5 mpirun -n 4 python -m hpcnn.train``, or
``HPCNN_FAULT=sleep@checkpoint:rank=0,step=9,seconds=3``. Unset, each
site costs one comparison with ``None``.
"""

import errno
import os
import signal
import sys
import time

KINDS = ("raise", "kill", "hang", "freeze", "sleep", "nan", "diverge", "enospc", "eio")
SITES = ("setup", "data", "forward", "backward", "allreduce", "optimizer", "checkpoint", "evaluation")
VARIABLE = "HPCNN_FAULT"
ERRNOS = {"enospc": errno.ENOSPC, "eio": errno.EIO}  # the write errors the checkpoint writers simulate
# kinds the caller carries out, and where
ACTING = {"nan": ("data", "forward"), "diverge": ("optimizer",), **dict.fromkeys(ERRNOS, ("checkpoint",))}


def _parse(text: str | None):
    if not text:
        return None
    try:
        head, _, tail = text.partition(":")
        kind, site = head.split("@")
        fields = dict(part.split("=") for part in tail.split(",") if part)
        spec = (kind, site, int(fields.get("rank", 0)), int(fields["step"]) if "step" in fields else None)
        seconds = float(fields.get("seconds", 2.0))
    except (ValueError, KeyError):
        raise ValueError(f"{VARIABLE}={text!r}: expected KIND@SITE:rank=R,step=S") from None
    if kind not in KINDS or site not in SITES:
        raise ValueError(f"{VARIABLE}={text!r}: KIND is one of {KINDS}, SITE one of {SITES}")
    if kind in ACTING and site not in ACTING[kind]:
        raise ValueError(f"{VARIABLE}={text!r}: {kind} acts only at {', '.join(ACTING[kind])}")
    if set(fields) - {"rank", "step", "seconds"} or ("seconds" in fields and kind != "sleep"):
        raise ValueError(f"{VARIABLE}={text!r}: fields are rank, step (and seconds, for sleep)")
    global _seconds
    _seconds = seconds
    return spec


_seconds = 2.0  # how long a ``sleep`` fault pauses
_spec = _parse(os.environ.get(VARIABLE))
rank = 0  # set by the training loop: this process's world rank and its current step
step = 0
_fired = False


def point(site: str) -> str | None:
    """Called at each site. Returns the kind when the caller must act (``ACTING``); raises, kills
    or hangs for the other kinds; ``None`` (nearly free) when no fault is armed here."""
    global _fired
    if _spec is None:
        return None
    kind, where, on_rank, at_step = _spec
    if where != site or on_rank != rank or _fired or (at_step is not None and at_step != step):
        return None
    _fired = True
    if kind == "raise":
        raise RuntimeError(f"injected fault at {site}, step {step}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "freeze":  # said on stderr, so that a test can time what follows from this moment
        print(f"{VARIABLE}: freezing at {site}, step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return None
    if kind == "sleep":  # said on stderr, so that a test can aim a signal at the pause
        print(f"{VARIABLE}: sleeping {_seconds:g} s at {site}, step {step}", file=sys.stderr, flush=True)
        time.sleep(_seconds)
        return None
    return kind
