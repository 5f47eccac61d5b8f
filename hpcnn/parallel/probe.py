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
    inspector needs the value too (the stage a receive waits for). ``inner``: a wait inside the
    enclosing phase; as a region, the inspector returns to the operation before it once it ends
    (other regions leave their operation in place until the next one begins)."""

    op: str | None
    timer: str | None = None
    span: str | None = None
    site: str | None = None
    arg: str | None = None
    args: tuple = ()
    detailed: bool = False
    inner: bool = False
    op_index: int = -1

    def __post_init__(self):
        object.__setattr__(self, "op_index", OPS.index(self.op) if self.op is not None else -1)


_PIPELINE = "forward/backward"
_ACTIVATIONS, _GRADIENTS = (("data", "activations"),), (("data", "gradients"),)
PHASES = {
    # between steps, and the step itself (begin_step/end_step)
    "idle": Phase(None),
    "step": Phase(None, span="step {}", arg="epoch"),
    # a training step
    "data": Phase("read data", "data", "data", arg="rows"),
    "forward/backward": Phase(_PIPELINE, "forward"),
    "forward": Phase(_PIPELINE, "forward", "forward mb {}", arg="rows"),
    "backward": Phase(_PIPELINE, "backward", "backward mb {}", "backward", arg="rows"),
    "weight gradients": Phase(_PIPELINE, "backward", "weight gradients", arg="rows"),
    "clipping": Phase(_PIPELINE, "backward", "per-example clipping", arg="rows"),
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
    "gather parameters": Phase("parameter allgather", "optimizer", "parameter allgather", "allgather"),
    # between steps
    "stop check": Phase("stop check", span="stop check"),
    "callbacks": Phase("stop check", span="callbacks"),  # on_step/on_epoch: the user's stop check
    "evaluation": Phase("evaluation", span="evaluation", site="evaluation", arg="rows"),
    "evaluation receive": Phase("evaluation receive", arg="stage", detailed=True, inner=True),
    "evaluation allreduce": Phase("evaluation allreduce", inner=True),
    "checkpoint": Phase("checkpoint", span="checkpoint write", arg="step"),
}
_IDLE = PHASES["idle"]


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
        now = clock()
        self._top = _Frame(_IDLE, 0, 0, now)  # the phase in progress
        self._outer: list[_Frame] = []  # the phases it is nested in, innermost last
        # a step's frames, reused step after step: the step itself and its phase in progress
        self._step, self._in_step = _Frame(PHASES["step"], 0, 0, now), _Frame(_IDLE, 0, 0, now)

    def __call__(self, name: str, index: int = 0, value=0) -> None:
        """Begin phase ``name`` (``index``: e.g. its micro-batch; ``value``: its span argument, for
        a receive the stage waited for); the current phase at this level ends."""
        phase = PHASES[name]
        now = self.clock()
        frame = self._top
        self._charge(frame, now)
        if self.timeline is not None:
            self._span(frame, now)
        frame.phase, frame.index, frame.value, frame.start, frame.since = phase, index, value, now, now
        self._entered(phase, value)

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
        phase, inspector = PHASES[name], self.inspector
        resume = (inspector.op, inspector.detail) if inspector is not None and phase.inner else None
        self._push(_Frame(phase, index, value, self.clock(), resume))
        return self

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        frame = self._pop(self.clock())
        inspector, resume = self.inspector, frame.resume
        if inspector is not None and resume is not None and (inspector.op, inspector.detail) != resume:
            inspector.mark(OPS[resume[0]], resume[1])

    def begin_step(self, step: int, epoch: int) -> None:
        """Step ``step`` (0-based) of epoch ``epoch`` (0-based) begins; its phases follow (between
        steps no phase has a timer: the one in progress pauses nothing)."""
        self.step = step
        now = self.clock()
        frame = self._step
        frame.index, frame.value, frame.start = step + 1, epoch + 1, now
        self._outer.append(self._top)
        frame = self._top = self._in_step
        frame.phase, frame.start, frame.since = _IDLE, now, now

    def end_step(self) -> float:
        """The step's last phase ends, and the step: returns its seconds."""
        now = self.clock()
        frame = self._top
        self._charge(frame, now)
        step = self._step
        if self.timeline is not None:
            self._span(frame, now)
            self._span(step, now)
        self._top = self._outer.pop()
        seconds = now - step.start
        if self.inspector is not None:
            self.inspector.step_done(self.step + 1, seconds)
        return seconds

    def _push(self, frame: _Frame) -> None:
        """``frame`` begins inside the current phase, whose timer stops until it ends."""
        outer = self._top
        self._charge(outer, frame.start)
        self._outer.append(outer)
        self._top = frame
        self._entered(frame.phase, frame.value)

    def _pop(self, now: float) -> _Frame:
        """The current phase ends; the one it was nested in resumes. Returns the one that ended."""
        frame = self._top
        self._charge(frame, now)
        if self.timeline is not None:
            self._span(frame, now)
        self._top = self._outer.pop()
        self._top.since = now
        return frame

    def _charge(self, frame: _Frame, now: float) -> None:
        """The time since ``frame`` last (re)started goes to its phase's timer, if it has one."""
        timer = frame.phase.timer
        if timer is not None:
            times = self.times
            setattr(times, timer, getattr(times, timer) + now - frame.since)

    def _entered(self, phase, value) -> None:
        """``phase`` has begun: the inspector hears of a change of operation (and of a receive, which
        stage it waits for); a fault armed at its site fires."""
        inspector = self.inspector
        if (
            inspector is not None
            and phase.op_index >= 0
            and (inspector.op != phase.op_index or phase.detailed)
        ):
            inspector.mark(phase.op, value if phase.detailed else 0)
        if phase.site is not None and self.faults is not None:
            self.faults.point(phase.site, self.step)

    def _span(self, frame: _Frame, now: float) -> None:
        phase = frame.phase
        if phase.span is None:
            return
        args = dict(phase.args)
        if phase.arg is not None:
            args[phase.arg] = frame.value
        self.timeline.span(phase.span.format(frame.index), frame.start, now, COMPUTE, **args)
