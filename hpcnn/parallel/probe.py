"""The probe: the training step says which phase it is in; what watches a run listens to it.

The step and the pipeline announce each phase of their work (``probe("data")``,
``probe("forward", m, rows)``, ``probe("reduce")``, ...). A phase lasts until the next one begins;
``with probe.region("evaluation"):`` nests one (an evaluation, a checkpoint write, a wait inside
them) and resumes the enclosing phase after it. Four things subscribe:

- the step timers (``probe.times``, always): each phase's seconds go to its part of the step;
- the stall inspector (``probe.inspector``): the operation this rank is in, as its phases change;
- the timeline (``probe.timeline``, ``--timeline``): one span per phase, inside its step's span;
- fault injection (``probe.faults``, only when ``HPCNN_FAULT`` arms one): a fault at a phase's site
  fires as the phase begins; ``probe.fault(site)`` is a site where the caller acts on the fault.

Without a timeline or a fault, a phase change reads the clock, adds to one timer and tells the
inspector only when the operation changes: the step pays a few attribute lookups per phase.
"""

from dataclasses import dataclass

from hpcnn.parallel.inspector import OPS
from hpcnn.parallel.timeline import COMPUTE


@dataclass(slots=True)
class StageTimes:
    """Where a rank's step time went, summed over steps (seconds)."""

    data: float = 0.0  # reading and casting this rank's rows
    forward: float = 0.0  # forward and loss
    backward: float = 0.0  # backward (including starting and testing gradient reductions)
    wait: float = 0.0  # blocked in pipeline receives and in completing sends
    reduce: float = 0.0  # blocked on the gradient reduction (not hidden by backward)
    optimizer: float = 0.0  # gradient norm, clipping, optimizer step
    peak_live: int = 0  # most micro-batches with forward done and backward not yet

    @property
    def compute(self) -> float:
        return self.forward + self.backward

    @property
    def total(self) -> float:
        """The pipeline's part of the steps: forward, backward and the waits between them."""
        return self.forward + self.backward + self.wait

    @property
    def bubble(self) -> float:
        """The fraction of the pipeline's time this stage was not computing."""
        total = self.total
        return 1.0 - self.compute / total if total else 0.0


@dataclass(frozen=True, slots=True)
class Phase:
    """How one phase shows: its inspector operation (``None``: the enclosing one's), the timer its
    seconds count in (``None``: none, e.g. outside steps), its timeline span (``"{}"`` takes the
    phase's index; ``None``: no span), the fault site that fires as it begins, the name of its
    ``value`` among the span's arguments, and constant span arguments. ``detailed``: the
    inspector needs the value too (the stage a receive waits for)."""

    op: str | None
    timer: str | None = None
    span: str | None = None
    site: str | None = None
    arg: str | None = None
    args: tuple = ()
    detailed: bool = False
    op_index: int = -1

    def __post_init__(self):
        object.__setattr__(self, "op_index", OPS.index(self.op) if self.op is not None else -1)


_PIPELINE = "forward/backward"
_ACTIVATIONS, _GRADIENTS = (("data", "activations"),), (("data", "gradients"),)
PHASES = {
    # between steps, and the step itself (begin_step/end_step)
    "idle": Phase(None),
    "step": Phase(None, span="step {}", arg="epoch"),
    "setup": Phase("setup", site="setup"),
    # a training step
    "data": Phase("read data", "data", "data", arg="rows"),
    "forward/backward": Phase(_PIPELINE, "forward"),
    "forward": Phase(_PIPELINE, "forward", "forward mb {}", arg="rows"),
    "backward": Phase(_PIPELINE, "backward", "backward mb {}", "backward", arg="rows"),
    "weight gradients": Phase(_PIPELINE, "backward", "weight gradients", arg="rows"),
    "receive activations": Phase(
        "pipeline receive", "wait", "recv wait mb {}", arg="stage", args=_ACTIVATIONS, detailed=True
    ),
    "receive gradients": Phase(
        "pipeline receive", "wait", "recv wait mb {}", arg="stage", args=_GRADIENTS, detailed=True
    ),
    "send wait": Phase(_PIPELINE, "wait", "send wait", arg="sends"),
    "metrics": Phase(_PIPELINE),
    "reduce": Phase("gradient allreduce", "reduce", "reduce wait", "allreduce"),
    "optimizer": Phase("optimizer step", "optimizer", "optimizer"),
    # between steps
    "stop check": Phase("stop check", span="stop check"),
    "evaluation": Phase("evaluation", span="evaluation", site="evaluation", arg="rows"),
    "evaluation receive": Phase("evaluation receive", arg="stage", detailed=True),
    "evaluation allreduce": Phase("evaluation allreduce"),
    "checkpoint": Phase("checkpoint", span="checkpoint write", arg="step"),
}


class _Frame:
    """A phase in progress: which, its index and value, when it began, since when its timer runs,
    and (a region) the inspector's operation and detail to restore when it ends."""

    __slots__ = ("phase", "index", "value", "start", "since", "resume")

    def __init__(self, phase: Phase, index: int, value, start: float, resume=None):
        self.phase, self.index, self.value, self.start, self.since = phase, index, value, start, start
        self.resume = resume


class Probe:
    """This rank's phases, told to ``times`` and to whichever of ``inspector`` (an
    ``Inspector``), ``timeline`` (a ``Timeline``) and ``faults`` (an armed ``faults.Fault``) are set.

    Parameters
    ----------
    clock : seconds (``MPI.Wtime``)
    """

    def __init__(self, clock, inspector=None, timeline=None, faults=None):
        self.clock = clock
        self.times = StageTimes()
        self.inspector, self.timeline, self.faults = inspector, timeline, faults
        self.step = 0  # the step the phases belong to (what a fault's ``step`` is compared with)
        self._stack = [_Frame(PHASES["idle"], 0, 0, clock())]

    def __call__(self, name: str, index: int = 0, value=0) -> None:
        """Begin phase ``name`` (``index``: e.g. its micro-batch; ``value``: its span argument, for
        a receive the stage waited for); the current phase at this level ends."""
        phase = PHASES[name]
        now = self.clock()
        frame = self._stack[-1]
        self._leave(frame, now)
        frame.phase, frame.index, frame.value, frame.start, frame.since = phase, index, value, now, now
        self._enter(phase, value)

    def fault(self, site: str) -> str | None:
        """A site where the caller acts on an armed fault: its kind if it fires here (see
        ``faults``), else ``None``."""
        if self.faults is None:
            return None
        return self.faults.point(site, self.step)

    # --- nesting ---------------------------------------------------------------------------

    def region(self, name: str, index: int = 0, value=0, step: int | None = None) -> "Probe":
        """``with probe.region(name):`` phase ``name`` inside the current one, which resumes after
        it. ``step``: the step count it happens at (an evaluation after ``step`` steps)."""
        if step is not None:
            self.step = step
        phase, now, inspector = PHASES[name], self.clock(), self.inspector
        self._pause(self._stack[-1], now)
        resume = None if inspector is None else (inspector.op, inspector.detail)
        self._stack.append(_Frame(phase, index, value, now, resume))
        self._enter(phase, value)
        return self

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        now = self.clock()
        frame = self._stack.pop()
        self._leave(frame, now)
        self._stack[-1].since = now
        inspector, resume = self.inspector, frame.resume
        if inspector is not None and resume is not None and (inspector.op, inspector.detail) != resume:
            inspector.mark(OPS[resume[0]], resume[1])

    def begin_step(self, step: int, epoch: int) -> None:
        """Step ``step`` (0-based) of epoch ``epoch`` (0-based) begins; its phases follow."""
        self.step = step
        now = self.clock()
        self._pause(self._stack[-1], now)
        self._stack.append(_Frame(PHASES["step"], step + 1, epoch + 1, now))
        self._stack.append(_Frame(PHASES["idle"], 0, 0, now))

    def end_step(self) -> float:
        """The step's last phase ends, and the step: returns its seconds."""
        now = self.clock()
        self._leave(self._stack.pop(), now)
        step = self._stack.pop()
        self._leave(step, now)
        self._stack[-1].since = now
        seconds = now - step.start
        if self.inspector is not None:
            self.inspector.step_done(self.step + 1, seconds)
        return seconds

    # --- the subscribers -------------------------------------------------------------------

    def _leave(self, frame: _Frame, now: float) -> None:
        phase = frame.phase
        if phase.timer is not None:
            times = self.times
            setattr(times, phase.timer, getattr(times, phase.timer) + now - frame.since)
        if self.timeline is not None and phase.span is not None:
            args = dict(phase.args)
            if phase.arg is not None:
                args[phase.arg] = frame.value
            self.timeline.span(phase.span.format(frame.index), frame.start, now, COMPUTE, **args)

    def _pause(self, frame: _Frame, now: float) -> None:
        """A phase nested in ``frame`` begins: ``frame``'s timer stops until it ends."""
        phase = frame.phase
        if phase.timer is not None:
            times = self.times
            setattr(times, phase.timer, getattr(times, phase.timer) + now - frame.since)
            frame.since = now

    def _enter(self, phase: Phase, value) -> None:
        self._mark(phase, value)
        if phase.site is not None and self.faults is not None:
            self.faults.point(phase.site, self.step)

    def _mark(self, phase: Phase, value) -> None:
        inspector = self.inspector
        if (
            inspector is not None
            and phase.op is not None
            and (inspector.op != phase.op_index or phase.detailed)
        ):
            inspector.mark(phase.op, value if phase.detailed else 0)
