"""Elastic training (``--elastic MIN_RANKS``): when ranks die, the survivors go on.

MPI's User-Level Failure Mitigation (ULFM; Open MPI 5 under ``mpiexec --with-ft ulfm``) turns a
dead rank into an error (``ERR_PROC_FAILED``) on the ranks that talk to it. A survivor that meets
one revokes every communicator it holds, so that every other survivor, whatever it waits in, meets
one too (``ERR_REVOKED``); then they all ``Shrink`` the world to its survivors
(``Comm.shrink``) and ``recover`` decides, from one ``allgather`` of what each holds, how to go on:

- **The step.** No rank can finish step s+1's gradient reduction before every rank has finished
  step s, so survivors differ by at most one completed optimizer step. Each rank keeps a copy of
  its training state from the start of its current step (``Held``, taken by the training loop:
  one copy of the parameters and optimizer state per step); every survivor goes back to the
  fewest steps any survivor completed, with its live state or that copy. At most one step is redone.
- **The layout.** Pipeline stages keep their layers: replica j of the new grid takes, for each
  stage, the j-th surviving rank that holds that stage, so every rank keeps the stage (and the
  state) it has; the new replica count is the smallest number of survivors of any stage, and the
  ranks beyond it leave the training (whole replicas are dropped). Nothing is sent between ranks.
- **The math.** The run is rebuilt on the new grid with the same global batch, split over fewer
  replicas (``Training(restore=...)``), so it computes the same steps: with ``--deterministic``
  bitwise what an undisturbed run computes (every layout sums in one order).
- **A lost stage.** If some stage has no survivor holding it (or the optimizer state was sharded,
  ``--zero``), the state is gone from memory: the survivors resume from the newest checkpoint that
  reads back whole (or from the start, without one), without leaving the job.
- **Too few ranks.** Below ``MIN_RANKS`` survivors (or fewer than the stages): a checkpoint of the
  state (if it survived) and exit code 75, so that a job script requeues the job.

A failure during recovery itself is one more failure: the survivors shrink again and decide again
from the same held states. A rank that hangs instead of dying is the stall inspector's: MPI reports
nothing, and the job ends with the stall message and exit code 4, as without ``--elastic``.
"""

import dataclasses
import time

import numpy as np

from hpcnn.errors import EXIT_PREEMPTED, JobError, UserError
from hpcnn.io.checkpoints import Position
from hpcnn.parallel.comm import Comm, fault_tolerance


def check(cfg, comm: Comm) -> None:
    """Refuse ``--elastic`` (one ``UserError`` on every rank, before any training) where MPI cannot
    survive a dead rank, or where the minimum cannot be met."""
    with comm.agreed(cfg.debug):
        missing = fault_tolerance()
        if missing is not None:
            raise UserError(missing)
        if cfg.elastic > comm.size:
            raise UserError(f"elastic = {cfg.elastic}: more than the job's {comm.size} ranks")
        if cfg.elastic < cfg.pipeline_stages:
            raise UserError(
                f"elastic = {cfg.elastic}: fewer than the {cfg.pipeline_stages} pipeline stages, which "
                "every layout needs a rank each for"
            )


@dataclasses.dataclass
class Held:
    """This rank's training state after ``step`` completed optimizer steps: its stage's
    parameters, optimizer state (and step count ``t``), layer state, the epoch's summed metrics
    (global: the same on every rank), the finished epochs' rows and the loss list's length."""

    step: int
    params: np.ndarray
    opt_state: dict
    t: int
    layer_state: np.ndarray
    sums: np.ndarray
    finished: list
    losses: int

    @classmethod
    def like(cls, params, opt) -> "Held":
        """An empty copy with buffers shaped as ``params``' (a ``FlatParams``) and ``opt``'s."""
        state = {k: v.copy() for k, v in opt.state.items()}
        return cls(-1, params.data.copy(), state, 0, params.state.copy(), np.zeros(3), [], 0)

    def take(self, step, params, opt, sums, finished, losses) -> None:
        """Copy the live state in (no allocation: the step loop calls this once per step)."""
        self.step, self.t, self.finished, self.losses = step, opt.t, list(finished), losses
        self.params[...] = params.data
        for key, buf in opt.state.items():
            self.opt_state[key][...] = buf
        self.layer_state[...] = params.state
        self.sums[...] = sums

    def put(self, params, opt) -> None:
        """Copy this state into a rebuilt stage's buffers (the same stage: the same sizes)."""
        params.data[...] = self.params
        for key, buf in opt.state.items():
            buf[...] = self.opt_state[key]
        opt.t = self.t
        params.state[...] = self.layer_state


@dataclasses.dataclass
class Restore:
    """How a rebuilt run starts: ``position`` and this rank's ``held`` state (in memory), or
    ``held = None`` and the checkpoint ``resume`` (``auto``/empty) names."""

    position: Position | None
    held: Held | None
    losses: list  # this rank's per-step losses (``Result.step_losses``) up to the position
    report: dict  # what the recovery did (rank 0's log line, the run directory's record)
    below: str | None = None  # too few ranks: write a checkpoint and stop with this reason


@dataclasses.dataclass
class Survivor:
    """What one surviving rank says it holds (``recover``'s one ``allgather``)."""

    stage: int  # its pipeline stage (-1: it held none: it had not finished setting up)
    done: int  # optimizer steps it completed
    steps: dict  # step -> epochs closed in its state after that step, for each state it holds in memory
    noticed: float  # when it met the failure (time.time())
    phase: str


def survivor(training, noticed: float, phase: str) -> Survivor:
    """This rank's ``Survivor`` record (``training``: the run that held its state, or ``None``)."""
    if training is None:
        return Survivor(-1, -1, {}, noticed, phase)
    done, states = training.held_states()
    closed = {step: len(held.finished) for step, held in states.items()}
    return Survivor(training.grid.stage, done, closed, noticed, phase)


def plan(everyone: list[Survivor], stages: int) -> tuple[int | None, dict[int, int]]:
    """``(step, keep)``: the step every survivor can restore from memory and ``keep``: old rank ->
    new rank of the ranks that form the new grid (stage = new rank % stages, as ``Grid`` places
    them); ``(None, {})`` when some stage's state is gone (no survivor holds it at that step)."""
    step = min((s.done for s in everyone if s.stage >= 0), default=-1)  # (-1: none had set up)
    holders = [[r for r, s in enumerate(everyone) if s.stage == k and step in s.steps] for k in range(stages)]
    replicas = min(len(h) for h in holders)
    if replicas == 0:
        return None, {}
    keep = {holders[k][j]: j * stages + k for j in range(replicas) for k in range(stages)}
    return step, keep


def recover(comm: Comm, training, cfg, noticed: float, phase: str, fault=None):
    """Shrink ``comm`` to its survivors and decide how to go on (collective over the survivors).

    Returns ``(new_comm, restore)``: the communicator of the ranks that go on (``None`` on a rank
    that leaves) and this rank's ``Restore``. Raises ``JobError`` (exit 75) on every survivor when
    too few are left and no state survived to checkpoint. MPI errors from further failures propagate
    (the caller recovers again)."""
    t0 = time.perf_counter()
    old_size = comm.size
    shrunk, lost = comm.shrink()
    everyone = shrunk.allgather(survivor(training, noticed, phase))
    step, keep = plan(everyone, cfg.pipeline_stages) if cfg.zero == 0 else (None, {})
    me = shrunk.rank
    in_memory = step is not None
    if fault is not None:  # the test hook: a rank that dies in the middle of a recovery
        fault.point("recovery", step if in_memory else -1)
    left = shrunk.size
    report = {
        "lost": lost,
        "ranks_before": old_size,
        "ranks": left,
        "noticed_step": max(s.done for s in everyone),
        "phase": min(everyone, key=lambda s: s.noticed).phase,
        "noticed_at": min(s.noticed for s in everyone),
    }
    below = None
    if left < max(cfg.elastic, cfg.pipeline_stages):
        below = f"{left} rank(s) left of {old_size}, below --elastic {cfg.elastic}"
        if not in_memory:
            raise JobError(
                f"rank failure: {below}, and the state of some stage died with its ranks: nothing newer "
                f"than the last checkpoint to save; continue with --resume auto (exit code {EXIT_PREEMPTED})",
                EXIT_PREEMPTED,
            )
    if in_memory:
        new = shrunk.subset(me in keep, keep.get(me, 0))
        report.update(step=step, redone=max(s.done for s in everyone) - step, source="memory")
        if new is None:
            return None, None
        # epoch boundaries: a survivor that closed the epoch at ``step`` lends its rows to all
        closers = [r for r in keep if everyone[r].steps[step] * _per_epoch(training) >= step]
        held = training.held_states()[1][step]
        source = keep[closers[0]] if closers else 0
        finished = new.bcast(held.finished if new.rank == source else None, root=source)
        position = _position(training, step, held, finished)
        losses = training.result.step_losses[: held.losses]
        restore = Restore(position, held, losses, report, below)
    else:
        new = shrunk
        report.update(step=None, redone=None, source="checkpoint" if cfg.checkpoint_dir else "start")
        report["why"] = "a part of the sharded optimizer state (--zero)" if cfg.zero else "a stage's state"
        restore = Restore(None, None, [], report, below)
    replicas = new.size // cfg.pipeline_stages
    if new.size % cfg.pipeline_stages:  # checkpoint fallback: whole replicas only
        sub = new.subset(new.rank < replicas * cfg.pipeline_stages, new.rank)
        if sub is None:
            return None, None
        new = sub
    layout = f"{replicas} x {cfg.pipeline_stages}"
    report.update(layout=layout, kept=new.size, seconds=time.perf_counter() - t0)
    return new, restore


def _per_epoch(training) -> int:
    return len(training.sampler)


def _position(training, step: int, held: Held, finished: list) -> Position:
    """Where the restored run stands after ``step`` steps: after the ``finished`` epochs, with
    ``step`` minus theirs done in the next one. If some survivor had closed the epoch that
    ``step`` ends, ``finished`` is its list (batch 0 of the next epoch); if none had, the epoch
    stays open with all its batches done (its summary comes first), its summed metrics carried."""
    epoch = len(finished)
    batch = step - epoch * _per_epoch(training)
    sums = held.sums.tolist() if batch else [0.0, 0.0, 0.0]
    return Position(step, epoch, batch, sums, list(finished))
