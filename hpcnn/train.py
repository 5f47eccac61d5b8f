"""The training loop and ``python -m hpcnn.train``.

One step: read my rows of the global batch -> forward -> loss -> backward (into the flat gradient
buffer) -> one Allreduce -> clip -> optimizer step on the flat parameter buffer. ``fit`` is that
loop over epochs, usable from Python with any ``Comm``; it resumes from a checkpoint, writes them,
and stops after the same step on every rank when a stop signal arrives (``preempt``). ``main`` is
the command-line face that turns errors into one message from rank 0 and an exit code on every rank.
"""

import sys

if __name__ == "__main__":
    # `python -m hpcnn.train`: catch Ctrl-C and the stop signals before the imports below (numpy,
    # mpi4py, h5py: a third of a second in which a Ctrl-C would print a traceback on every rank).
    from hpcnn.parallel.preempt import EarlySignals

    _EARLY = EarlySignals().__enter__()

import dataclasses  # noqa: E402  (the imports below follow the signal catcher above)
import hashlib
import itertools
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcnn import __version__
from hpcnn.config import Config, config_changes, resolve
from hpcnn.core.backend import dtype_of, to_host, xp
from hpcnn.core.losses import LOSSES
from hpcnn.core.model import Sequential, describe, mlp_layers
from hpcnn.core.optim import Schedule, clip_grad_norm, make_optimizer
from hpcnn.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    JobError,
    UserError,
)
from hpcnn.io.checkpoints import (
    Position,
    architecture,
    architecture_difference,
    checkpoints,
    estimate_bytes,
    h5py_parallel,
    inspect,
    prune,
    read_stage,
    remove_temporaries,
    save,
    step_of,
    too_little_space,
    verify_bounded,
)
from hpcnn.io.datasets import (
    EpochSampler,
    UnreadableRows,
    describe_nonfinite,
    first_nonfinite,
    open_dataset,
    set_num_classes,
    split_units,
)
from hpcnn.io.dirlock import DirectoryLock
from hpcnn.io.runlog import STEP_TIMES, Progress, RunDir
from hpcnn.parallel import faults
from hpcnn.parallel.comm import Comm, Grid, blas_threads, run_command
from hpcnn.parallel.data_parallel import DataParallel
from hpcnn.parallel.deterministic import (
    Sharding,
    ShardReducer,
    Workers,
    exact_sum,
    shard_count,
    shard_range,
    shard_rows,
)
from hpcnn.parallel.inspector import Inspector
from hpcnn.parallel.pipeline import (
    Pipeline,
    balanced_partition,
    defers_weight_grads,
    explicit_partition,
    gpipe_bubble,
)
from hpcnn.parallel.preempt import (
    ALL,
    INTERRUPT,
    EarlySignals,
    HeldInterrupts,
    Interrupted,
    StopRequest,
    watch_interrupts,
)
from hpcnn.parallel.timeline import Timeline


@dataclass
class Result:
    """What ``fit`` returns: this rank's model (its pipeline stage) and the metrics rank 0 printed."""

    model: object  # the Sequential of this rank's stage (the whole model without pipeline stages)
    grid: Grid
    bounds: list  # first layer of each stage, then the number of layers
    pipeline: Pipeline
    steps: int = 0
    history: list = field(default_factory=list)  # one dict per epoch
    final: dict = field(default_factory=dict)  # held-out (or training-row) loss and accuracy
    # this rank's loss sum of each step run here (last stages; --deterministic: the global sum)
    step_losses: list = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped training early (a checkpoint was written)
    checkpoint: str | None = None  # the last checkpoint this run wrote


def _as_batch(x, y, dtype, classify: bool):
    """Cast what a source returned (either part may be ``None``) for the model."""
    # A value beyond dtype's range (1e39 in a float64 file, for float32) becomes inf here; callers
    # find it with the NaNs (_bad_row), so numpy's overflow warning would only repeat it per rank.
    with np.errstate(over="ignore"):
        if x is not None:
            x = xp.asarray(x, dtype=dtype)  # (rows, features)
        if y is not None and not classify:
            y = xp.asarray(y, dtype=dtype)
            y = y[:, None] if y.ndim == 1 else y  # (rows, outputs), also for 0 rows
        elif y is not None:
            y = xp.asarray(y)
    return x, y


def _micro_batches(x, y, micro: int, unit: int = 1):
    """Cut a replica's rows into ``micro`` contiguous pieces that differ by at most one ``unit`` of
    rows (a shard in deterministic mode: pieces are whole shards; only the last shard may be short)."""
    rows = len(x) if x is not None else len(y)
    cuts = [split_units(rows, unit, micro, m) for m in range(micro)]
    pieces = lambda a: None if a is None else [a[s : s + n] for s, n in cuts]  # noqa: E731
    return pieces(x), pieces(y), [n for _, n in cuts]


def _read(split, ids, pipe: Pipeline, dtype, classify, mode: str = "infer"):
    """What this stage needs of rows ``ids``: inputs on the first stage, labels on the last (read
    into the stage's workspace: valid until the next read of the same ``mode``), and ``None`` or,
    for rows HDF5 cannot read (a damaged file), zeros in their place and the problem (see
    ``_bad_row``): the rank carries on to the point where all ranks agree to stop."""
    if not (pipe.is_first or pipe.is_last):
        return xp.empty((len(ids), 0)), None, None  # a middle stage reads nothing; it only needs the count
    out = pipe.model.workspace.scope("data", mode)
    source = split.source
    try:
        x, y = source.read(ids, inputs=pipe.is_first, labels=pipe.is_last, out=out)
        problem = None
    except UnreadableRows as exc:
        n = len(ids)
        x = np.zeros((n, *source.x.shape[1:]), np.float32) if pipe.is_first else None
        y = np.zeros((n, *source.y.shape[1:]), source.y.dtype) if pipe.is_last else None
        problem = (exc.row, "cannot be read", str(exc))
    return (*_as_batch(x, y, dtype, classify), problem)


def _bad_row(split, ids, x, y, pipe: Pipeline, classify: bool):
    """The first of rows ``ids`` whose inputs (first stage) or regression targets (last stage) hold
    NaN/Inf as cast for the model: ``(row, headline, detail)``, else ``None``. If there is one, all
    the rows read are zeroed: the computation goes on, on finite values, until every rank has
    agreed to stop, and nothing is learnt from it."""
    checked = [("x", x, pipe.is_first), ("y", y, pipe.is_last and not classify)]
    found = [(part, a, first_nonfinite(a)) for part, a, mine in checked if mine and a is not None]
    bad = [(part, a, i) for part, a, i in found if i is not None]
    if not bad:
        return None
    part, a, i = bad[0]
    row, source = int(ids[i]), split.source
    # the row as stored (read again: only on this path) tells NaN in the file from overflow in the cast
    stored = source.read(np.array([row]), inputs=part == "x", labels=part == "y")[part == "y"][0]
    key, what = (source.x_key, "input") if part == "x" else (source.y_key, "target")
    problem = (row, *describe_nonfinite(key, row, stored, to_host(a[i]), what))
    for _, a, _ in found:
        a[...] = 0
    return problem


def _problem_text(split, problem, step: int | None = None) -> str:
    """One line naming the file, the split and the row of a ``_read``/``_bad_row`` problem."""
    row, headline, detail = problem
    if headline == "cannot be read":  # detail names the file, the dataset and the rows
        return f"{detail} ({split.name} rows{f', read for step {step}' if step is not None else ''})"
    when = f", read for step {step}" if step is not None else ""
    return f"{split.source.path}: {split.name} row {row} {headline}{when}: {detail}"


def evaluate(pipe: Pipeline, loss_fn, split, grid: Grid, cfg, classify: bool) -> dict:
    """Loss and accuracy over ``split``: each replica takes a contiguous block (each row counted
    once) and runs it through its pipeline in chunks of ``eval_batch_size`` rows, each chunk cut
    into ``micro_batches`` micro-batches. In deterministic mode (``pipe.shard_rows``) blocks, chunks
    and micro-batches are whole shards and the loss is summed exactly, as in training."""
    dtype, unit = dtype_of(cfg.dtype), pipe.shard_rows or 1
    start, count = split_units(len(split), unit, grid.replicas, grid.replica)
    step = max(1, cfg.eval_batch_size // unit) * unit  # chunks of whole shards (deterministic mode)
    ids = split.ids[start : start + count]
    # loss sum, correct, rows (on last stages only); rows found bad (any stage): the one reduction
    # below tells every rank whether some rank read a bad row
    sums = np.zeros(4)
    shard_losses, problem = [], None
    for i in range(0, len(ids), step):
        chunk = ids[i : i + step]
        x, y, found = _read(split, chunk, pipe, dtype, classify)
        found = found or _bad_row(split, chunk, x, y, pipe, classify)
        if found is not None:
            problem, sums[3] = problem or found, sums[3] + 1
        inputs, targets, sizes = _micro_batches(x, y, cfg.micro_batches, unit)
        # finite inputs can still overflow in the model: the loss is checked below
        with np.errstate(over="ignore", invalid="ignore"):
            loss_sum, correct = pipe.forward_only(inputs, targets, sizes, loss_fn)
        if pipe.is_last:
            sums[:3] += (loss_sum, correct, len(chunk))
            shard_losses += pipe.shard_losses
    pipe.mark("evaluation allreduce")
    if pipe.shard_rows:
        total, first = shard_count(len(split), unit), start // unit
        sums = _exact_metrics(grid.world, shard_losses, first, total, sums[1:], pipe.is_last)
    else:
        grid.world.allreduce_sum_(sums)
    if sums[3]:  # every rank knows: say which row (a collective only on this path)
        found = [p for p in grid.world.comm.allgather(problem) if p is not None]
        raise JobError(f"{_problem_text(split, min(found))}; evaluation stopped", EXIT_USAGE)
    pipe.mark("evaluation")
    rows = max(sums[2], 1)
    if not math.isfinite(sums[0]):
        raise JobError(
            f"{split.source.path}: the {split.name} loss is {sums[0] / rows} although every {split.name} "
            f"value is finite: the model's outputs or the loss overflow {np.dtype(dtype).name} "
            "(rescale the data, or train with a lower --lr or --clip-norm)",
            EXIT_NONFINITE,
        )
    return {"loss": sums[0] / rows, "accuracy": sums[1] / rows if classify else None, "rows": int(sums[2])}


def shard_stage(pipe: Pipeline, rows: int) -> Sharding:
    """Make ``pipe``'s stage compute in shards of ``rows`` rows on single-threaded BLAS, with as many
    shard threads as BLAS had (deterministic mode; ``sharding.workers.close()`` undoes it)."""
    sharding = Sharding(rows, Workers.replacing_blas_threads())
    for layer in pipe.model.layers:
        layer.shards = sharding
    pipe.shard_rows = rows
    return sharding


def _exact_metrics(world: Comm, shard_losses, first: int, total: int, counts, is_last: bool) -> np.ndarray:
    """``(loss sum, *counts)`` over all ``total`` shards, the same bits on every layout: each
    shard's loss sum travels alone (a sum over ranks of one value and zeros is exact in any order)
    and the values are added exactly; counts are integers (exact in float64), summed over every
    rank (zeros where a rank has nothing to count)."""
    v = np.zeros(total + len(counts))
    if is_last:
        v[first : first + len(shard_losses)] = shard_losses
    v[total:] = counts
    world.allreduce_sum_(v)
    return np.array([exact_sum(v[:total]), *v[total:]])


def open_data(cfg: Config, comm: Comm):
    """Open ``cfg``'s dataset on every rank and check its labels together; errors are agreed on."""
    with comm.agreed(cfg.debug):
        ds, label_range = open_dataset(cfg, comm.rank, comm.size)
    if label_range is not None:  # class labels from a file (the same on every rank): check them all
        ranges = comm.comm.allgather((*label_range, ds.unreadable))  # (min, max, unreadable) per rank
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        unreadable = [r[2] for r in ranges if r[2] is not None]
        with comm.agreed(cfg.debug):
            if unreadable:  # one rank's block, the file's fault: every rank says it alike
                raise UserError(unreadable[0])
            if lo < 0:
                raise UserError(f"{ds.name}: labels must be class indices >= 0, found {lo}")
            if ds.num_classes is None:  # not recorded in the file: the largest label decides
                set_num_classes(ds, hi + 1)
            elif hi >= ds.num_classes:
                raise UserError(f"{ds.name}: label {hi} is out of range for num_classes = {ds.num_classes}")
    return ds


def build_stages(cfg: Config, comm: Comm, layers, in_features: int):
    """Cut ``layers`` into ``cfg.pipeline_stages`` stages over the ranks of ``comm`` and build this
    rank's stage, initialised as the whole model would be. Returns ``(bounds, grid, pipeline)``."""
    stages = cfg.pipeline_stages
    with comm.agreed(cfg.debug):
        if comm.size % stages:
            raise UserError(
                f"pipeline_stages = {stages} does not divide the {comm.size} ranks "
                f"(ranks = data-parallel replicas x stages)"
            )
        if stages > len(layers):
            raise UserError(f"pipeline_stages = {stages} exceeds the model's {len(layers)} layers")
        if cfg.stage_layers:
            bounds = explicit_partition(cfg.stage_layers, len(layers), stages)
        else:
            bounds = balanced_partition(Sequential.layer_flops(layers, in_features), stages)
    grid = Grid(comm, stages)
    with comm.agreed(cfg.debug):
        first, stop = bounds[grid.stage], bounds[grid.stage + 1]
        try:
            model = Sequential(layers[first:stop], dtype_of(cfg.dtype))
        except MemoryError as exc:  # --hidden 100000000000, or a dataset with 10**9 features
            raise UserError(f"the model does not fit in memory ({exc}); use narrower layers") from None
        # Draw every earlier stage's initial values too, so each stage starts as the whole model would.
        skip = [spec for layer in layers[:first] for spec in layer.param_specs()]
        model.params.initialize(np.random.default_rng(cfg.seed), skip=skip)
        stage_in = Sequential.features_after(layers[:first], in_features)
        pipe = Pipeline(model, grid.pipe, grid.stage, stages, stage_in, cfg.schedule, comm.wtime)
    pipe.handshake()
    return bounds, grid, pipe


def _prepare(cfg: Config, comm: Comm):
    """Check the layout, open the data, build this rank's stage; setup errors are agreed on."""
    ds = open_data(cfg, comm)
    with comm.agreed(cfg.debug):
        replicas = comm.size // cfg.pipeline_stages
        if cfg.batch_size < replicas:
            raise UserError(
                f"batch_size = {cfg.batch_size} is smaller than the {replicas} data-parallel replicas: "
                f"every replica needs at least one row of each global batch (use batch_size >= {replicas})"
            )
        layers = mlp_layers([ds.features, *cfg.hidden, ds.outputs], cfg.activation, cfg.output_activation)
    bounds, grid, pipe = build_stages(cfg, comm, layers, ds.features)
    with comm.agreed(cfg.debug):
        rows = shard_rows(cfg) if cfg.deterministic else 0
        sampler = EpochSampler(
            ds.train.ids, cfg.batch_size, grid.replica, replicas, cfg.seed, cfg.drop_last, rows
        )
        if len(sampler) == 0:
            raise UserError(
                f"drop_last with batch_size {cfg.batch_size} > {len(ds.train)} training rows leaves no step"
            )
    return ds, layers, bounds, grid, pipe, sampler


def _total_steps(cfg: Config, sampler) -> int:
    steps = len(sampler) * cfg.epochs
    return min(cfg.max_steps, steps) if cfg.max_steps else steps


def fit(cfg: Config, comm: Comm, log=None, run: RunDir | None = None, terminal: bool = False) -> Result:
    """Train ``cfg``'s model on ``cfg``'s data over the ranks of ``comm``.

    ``log`` receives rank 0's progress lines (``None``: silent); with ``terminal`` (``log`` prints
    to the user's stdout) a progress bar may replace the step lines. ``run``: rank 0's run directory.
    Returns this rank's stage of the model (identical across data-parallel replicas), the per-epoch
    metrics and the final evaluation.
    With ``cfg.resume`` training continues from a checkpoint; with ``cfg.checkpoint_dir``
    checkpoints are written as configured, at the end, and when a stop signal arrives (then
    ``Result.stopped`` names the signal and no final evaluation runs). Ctrl-C (SIGINT on any rank)
    stops every rank at the same step, writes a checkpoint if a directory is set, and raises
    ``Interrupted`` (a ``KeyboardInterrupt``) on every rank; a second Ctrl-C ends the job at once.
    A stall inspector watches every rank throughout (``inspector``); non-finite values and bad input
    rows stop every rank at the same step with a ``JobError``.
    """
    watch_interrupts(comm.end_job)
    with HeldInterrupts():
        return _fit(cfg, comm, log, run, terminal)


def _fit(cfg: Config, comm: Comm, log, run: RunDir | None, terminal: bool) -> Result:
    log = log if (log is not None and comm.is_root) else None
    run = run if comm.is_root else None
    inspector = Inspector(comm, cfg.stall_timeout)
    training, lock = None, None
    try:
        lock = _lock_checkpoint_dir(cfg, comm, log)  # one run per checkpoint directory
        training = _Training(cfg, comm, log, inspector, run, terminal)
        try:
            result = training.run()
        finally:
            training.close()
        if training.timeline is not None:
            training.timeline.write(cfg.timeline)
            training.log(f"timeline: {cfg.timeline} ({len(training.timeline.spans)} spans on rank 0)")
    except JobError:
        inspector.close()  # a JobError is raised on every rank of comm: the collective shutdown is safe
        if training is not None:
            training.grid.free()
        raise
    except BaseException:  # one rank's failure: it is about to end the job; no collective now
        inspector.abandon()
        raise
    finally:
        if lock is not None:
            lock.release()
    inspector.close(training.log)
    if result.stopped == INTERRUPT.name:
        saved = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint"
        if result.checkpoint:
            saved += ": continue with --resume auto"
        elif not cfg.checkpoint_dir:
            saved += " (no checkpoint directory)"
        raise Interrupted(f"interrupted (Ctrl-C) after step {result.steps}; {saved}", result)
    return result


def _time_parts(t) -> np.ndarray:
    """A stage's times so far in the order of ``STEP_TIMES`` (without ``other``); pipeline waits
    count as forward_backward."""
    return np.array([t.data, t.forward + t.backward + t.wait, t.reduce, t.optimizer])


class _Training:
    """One run's state on this rank: what the loop, its epoch summaries and its checkpoints share."""

    def __init__(self, cfg: Config, comm: Comm, log, inspector: Inspector, run=None, terminal: bool = False):
        self.cfg, self.comm, self.inspector, self.run_dir = cfg, comm, inspector, run
        faults.rank = comm.world_rank
        faults.point("setup")
        ds, layers, bounds, grid, pipe, sampler = _prepare(cfg, comm)
        self.ds, self.layers, self.bounds, self.grid, self.pipe, self.sampler = (
            ds,
            layers,
            bounds,
            grid,
            pipe,
            sampler,
        )
        pipe.mark = inspector.mark
        self.model = pipe.model
        self.dtype, self.classify = dtype_of(cfg.dtype), ds.num_classes is not None
        self.loss_fn = LOSSES[cfg.loss]()
        self.dp = DataParallel(grid.dp, self.model.params, cfg.overlap == "on", cfg.bucket_mb, comm.wtime)
        self.dp.broadcast_parameters()
        self.reducer = None  # deterministic mode's gradient sum (instead of self.dp's)
        self.timeline = None
        if cfg.timeline:  # an unwritable path is found out now, not after training
            comm.root_decides(lambda: _check_output_file(cfg.timeline, "timeline"), cfg.debug)
            self.timeline = Timeline(comm, comm.wtime)
        pipe.timeline = self.dp.timeline = self.timeline
        self.opt = make_optimizer(cfg).bind(self.model.params)
        self.steps = _total_steps(cfg, sampler)
        # Rank 0 with a log shows progress (bar, lines or nothing); every other rank is silent.
        if log is None:
            self.progress = Progress.silent()
        else:
            self.progress = Progress.choose(cfg.quiet, self.steps, len(sampler), cfg.epochs, log, terminal)
        self.log = self.progress.log
        log = self.log
        self.lr = Schedule(
            cfg.lr_schedule, cfg.lr, self.steps, cfg.warmup_steps, cfg.step_size, cfg.gamma, cfg.min_lr
        )
        self.across_stages = grid.pipe.sum if grid.stages > 1 else None
        _describe(log, cfg, ds, layers, bounds, grid, sampler, self.steps)
        self.result = Result(self.model, grid, bounds, pipe)
        self.start, source = (
            _resume(cfg, grid, layers, ds.features, bounds, self.model, self.opt, log)
            if cfg.resume
            else (None, None)
        )
        size = estimate_bytes(layers, 1 + len(self.opt.state), np.dtype(cfg.dtype).itemsize)
        _check_checkpoint_dir(cfg, comm, self.start, size)
        if run is not None:
            run.write_start()
        at = self.start or Position()
        self.finished = list(at.history)  # rows of complete epochs (what checkpoints carry)
        self.result.history = list(at.history)
        self.step, self.epoch, self.batch = at.step, at.epoch, at.batch
        # The checkpoint resumed from is not written again into its own directory (into another
        # one it is: a run continued elsewhere has its starting point there).
        same_dir = (
            source is not None
            and cfg.checkpoint_dir
            and Path(source).parent.resolve() == Path(cfg.checkpoint_dir).resolve()
        )
        self.saved_at = (at.step, at.epoch, at.batch) if same_dir else None
        self.result.checkpoint = source if same_dir else None
        self.stop = None
        self.bad_input = None  # (step, row, headline, detail): the first bad input row read here
        if cfg.deterministic:  # last: nothing after it can fail and leave BLAS single-threaded
            self._shard()
        self.t_start = comm.wtime()
        self._new_interval()

    def _shard(self) -> None:
        """Deterministic mode: shard-wise kernels on single-threaded BLAS, and the tree-ordered
        gradient sum (``hpcnn.parallel.deterministic``)."""
        cfg, grid, model = self.cfg, self.grid, self.model
        rows = shard_rows(cfg)
        full = shard_count(min(cfg.batch_size, len(self.ds.train)), rows)
        most = -(-full // grid.replicas)
        with self.comm.agreed(cfg.debug):  # one gradient per shard: a large allocation, maybe too large
            reducer = ShardReducer(grid.dp, model, most)
        workers = shard_stage(self.pipe, rows).workers
        reducer.workers, self.reducer = workers, reducer
        # the gradient norm is summed per tensor, in model order: this stage's first tensor's index
        self._tensor_base = sum(len(layer.param_specs()) for layer in self.layers[: self.bounds[grid.stage]])
        self._tensor_count = sum(len(layer.param_specs()) for layer in self.layers)
        self.log(
            f"deterministic: shards of {rows} rows ({full} per full batch, at most {most} per replica); "
            f"BLAS single-threaded, {workers.n} shard thread(s) per rank"
        )
        if full < grid.replicas:
            self.log(
                f"deterministic: note: {grid.replicas - full} of {grid.replicas} replicas get no rows "
                f"(batch_size {cfg.batch_size} / shard_rows {rows} = {full} shards); a smaller "
                "--shard-rows uses them all (and gives other bits)"
            )

    def close(self) -> None:
        """Stop the shard threads and give BLAS its threads back (deterministic mode)."""
        if self.reducer is not None:
            self.reducer.workers.close()

    def _sq_norm(self) -> float:
        """The squared gradient norm, the same bits on every layout: one value per tensor (fixed
        shapes), exact across stages (each tensor's value on one stage, zeros elsewhere), added
        exactly."""
        params = self.model.params
        values = np.zeros(self._tensor_count)
        for i, slot in enumerate(params.slots):
            g = params.view(params.grad, slot).reshape(-1)
            values[self._tensor_base + i] = float(xp.dot(g, g))
        if self.grid.stages > 1:
            self.grid.pipe.allreduce_sum_(values)
        return exact_sum(values)

    def _new_interval(self) -> None:
        """Start summing the metrics of the next ``log_every`` steps."""
        t = self.pipe.times
        self._interval = np.zeros(4)  # loss sum, correct, rows (last stages), squared gradient norm
        self._interval_times = _time_parts(t)
        self._interval_steps, self._interval_wall = 0, 0.0

    def _step_record(self) -> dict:
        """The metrics of the steps since the last record (collective: every rank, same steps)."""
        n = self._interval_steps
        spent = _time_parts(self.pipe.times) - self._interval_times
        # Seconds inside steps only: evaluations and checkpoint writes in between are not steps.
        buf = np.concatenate([self._interval, spent / n, [self._interval_wall / n]])
        self.comm.allreduce_sum_(buf)
        loss, correct, rows, sq = buf[:4]
        per_step = buf[4:] / self.comm.size  # seconds per step, averaged over ranks
        split = dict(
            zip(STEP_TIMES, [*per_step[:4], max(0.0, per_step[4] - per_step[:4].sum())], strict=True)
        )
        self._new_interval()
        return {
            "step": self.step,
            "epoch": self.epoch + 1,
            "loss": loss / max(rows, 1),
            "accuracy": correct / max(rows, 1) if self.classify else None,
            "lr": self.lr(self.step - 1),
            "grad_norm": math.sqrt(sq),
            "samples_per_s": rows / (per_step[4] * n) if per_step[4] > 0 else 0.0,
            "time": split,
            "wall": self.comm.wtime() - self.t_start,
        }

    def run(self) -> Result:
        cfg, result = self.cfg, self.result
        sums = np.zeros(3)
        # Ctrl-C is honoured without checkpoints too; SIGTERM/SIGUSR1 only where a stop can be saved.
        with StopRequest(self.comm, ALL if cfg.checkpoint_dir else (INTERRUPT,)) as self.stop:
            while self.epoch < cfg.epochs and not (self.step >= self.steps and self.batch == 0):
                # Only rank 0 carries a resumed epoch's running sums: the epoch's reduction adds them once.
                resumed = self.start is not None and self.epoch == self.start.epoch and self.comm.is_root
                sums = np.array(self.start.epoch_sums) if resumed else np.zeros(3)  # loss, correct, rows
                t0, rows = self.comm.wtime(), 0
                for ids, global_rows in itertools.islice(self.sampler.epoch(self.epoch), self.batch, None):
                    if self.step >= self.steps:
                        break
                    # A step may overflow (a too large --lr): its loss and gradient are checked and the
                    # run stops with one message, which per-rank numpy warnings would only precede.
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        self._step(ids, global_rows, sums)
                    rows += global_rows
                    self.inspector.mark("stop check")
                    t_check = self.comm.wtime()
                    stop = self.stop.poll()
                    if self.timeline is not None:
                        self.timeline.span("stop check", t_check, self.comm.wtime())
                    if stop:
                        return self._stopped(sums)
                    if cfg.check_replicas and self.step % cfg.check_replicas == 0:
                        self._check_replicas()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.checkpoint(sums, f"every {cfg.checkpoint_every} steps")
                if self.stop.drain():  # nothing noted in the epoch's last steps may reach its summary
                    return self._stopped(sums)
                self._close_epoch(sums, rows, self.comm.wtime() - t0)
                if self.step >= self.steps:
                    break
            if self.stop.drain():
                return self._stopped(sums)
            self.checkpoint(sums if self.batch else np.zeros(3), "end of training")
            self._final()
        return result

    def _step(self, ids, global_rows: int, sums) -> None:
        """One optimizer step on the global batch whose rows ``ids`` are this replica's."""
        cfg, pipe, params = self.cfg, self.pipe, self.model.params
        t0 = self.comm.wtime()
        faults.step = self.step
        self.inspector.mark("read data")
        x, y, problem = _read(self.ds.train, ids, pipe, self.dtype, self.classify, "train")
        if faults.point("data") == "nan":
            x[-1, 0] = xp.nan
        problem = problem or _bad_row(self.ds.train, ids, x, y, pipe, self.classify)
        if problem is not None:  # every rank learns of it at the next stop check and stops there
            self.stop.note_bad_input(self.step, problem[0])
            self.bad_input = self.bad_input or (self.step, *problem)
        unit = pipe.shard_rows or 1
        inputs, targets, sizes = _micro_batches(x, y, cfg.micro_batches, unit)
        starts = [int(r) // unit for r in np.cumsum([0, *sizes[:-1]])] if self.reducer else None
        times = pipe.times
        t1 = self.comm.wtime()
        times.data += t1 - t0
        tl = self.timeline
        if tl is not None:
            tl.span("data", t0, t1, rows=len(ids))
        self.inspector.mark("forward/backward")
        hook = None if self.reducer else self.dp.on_layer_done
        loss_sum, correct = pipe.train_step(
            inputs, targets, sizes, 1.0 / global_rows, self.loss_fn, hook, starts
        )
        if self.reducer is not None:  # the metrics of all shards, counted once (on rank 0)
            total = shard_count(global_rows, unit)
            first, count = shard_range(total, self.grid.replicas, self.grid.replica)
            world, last = self.grid.world, pipe.is_last
            counts = (correct, len(ids)) if last else (0, 0)
            step = _exact_metrics(world, pipe.shard_losses, first, total, counts, last)
            loss_sum = step[0]
            if self.comm.is_root:
                sums += step
                self._interval[:3] += step
            if last:
                self.result.step_losses.append(loss_sum)
        elif pipe.is_last:
            sums += (loss_sum, correct, len(ids))
            self._interval[:3] += (loss_sum, correct, len(ids))
            self.result.step_losses.append(loss_sum)
        self.inspector.mark("gradient allreduce")
        faults.point("allreduce")
        t2 = self.comm.wtime()
        if self.reducer is not None:
            self.reducer.reduce(first, count, total)
        else:
            self.dp.reduce_gradients()
        t3 = self.comm.wtime()
        times.reduce += t3 - t2
        if tl is not None:
            tl.span("reduce wait", t2, t3)
        self.inspector.mark("optimizer step")
        if self.reducer is not None:  # the whole model's norm (collective across stages)
            sq = self._sq_norm()
            if cfg.clip_norm:
                clip_grad_norm(params.grad, cfg.clip_norm, None, sq)
        else:
            sq = float(xp.dot(params.grad, params.grad))
            if cfg.clip_norm:  # collective across stages: every rank takes part, finite or not
                clip_grad_norm(params.grad, cfg.clip_norm, self.across_stages, sq)
        # Whether to step depends on the reduced gradient only, which all replicas of a stage share,
        # so replicas stay identical; a non-finite gradient leaves the last finite state in place.
        # Every rank learns of a note at the next stop check.
        loss_bad = pipe.is_last and not math.isfinite(loss_sum)
        if math.isfinite(sq):
            self.opt.step(self.lr(self.step))
        if loss_bad or not math.isfinite(sq):
            layer = None if math.isfinite(sq) else self._first_nonfinite_layer()
            self.stop.note_nonfinite(self.step, layer, loss_bad)
        if faults.point("optimizer") == "diverge":
            params.data[0] += 1e-3
        t4 = self.comm.wtime()
        times.optimizer += t4 - t3
        if tl is not None:
            tl.span("optimizer", t3, t4)
            tl.span(f"step {self.step + 1}", t0, t4, epoch=self.epoch + 1)
        self.step, self.batch = self.step + 1, self.batch + 1
        seconds = self.comm.wtime() - t0
        self.inspector.step_done(self.step, seconds)
        # Replica 0 of each stage holds its stage's reduced gradient: their sum is the global norm
        # (deterministic mode: every rank holds the global one; rank 0 counts it).
        counted = self.comm.is_root if self.reducer is not None else self.grid.replica == 0
        self._interval[3] = sq if counted else 0.0
        self._interval_steps += 1
        self._interval_wall += seconds
        record = None
        if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.steps):
            record = self._step_record()
            if self.run_dir is not None:
                self.run_dir.record("step", record)
        self.progress.step(self.step, self.epoch, self.batch, record)

    def _first_nonfinite_layer(self) -> int:
        params = self.model.params
        for slot in params.slots:
            if not xp.isfinite(params.view(params.grad, slot)).all():
                return self.bounds[self.grid.stage] + slot.layer
        return self.bounds[self.grid.stage + 1]  # finite but overflowing: past this stage's layers

    def _close_epoch(self, sums, rows: int, seconds: float) -> None:
        """Report the epoch (the part run here, for a max_steps stop), evaluate, advance."""
        cfg = self.cfg
        total = sums.copy()
        self.comm.allreduce_sum_(total)
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": total[0] / total[2],
            "accuracy": total[1] / total[2] if self.classify else None,
            "lr": self.lr(self.step - 1),
            "seconds": seconds,
            "samples_per_s": rows / seconds,
        }
        last = self.epoch + 1 == cfg.epochs or self.step >= self.steps
        if self.ds.test is not None and (last or (cfg.eval_every and (self.epoch + 1) % cfg.eval_every == 0)):
            row["test"] = self._evaluate(self.ds.test)
        self.result.history.append(row)
        if self.run_dir is not None:
            self.run_dir.record("epoch", row)
        self.progress.close()  # the epoch's bar gives way to its line
        self.log(_epoch_line(row, cfg.epochs))
        if self.batch == len(self.sampler):
            self.finished.append(row)
            self.epoch, self.batch = self.epoch + 1, 0
            every = cfg.checkpoint_every_epochs
            if every and self.epoch % every == 0:
                self.checkpoint(np.zeros(3), f"every {every} epoch(s)")

    def _evaluate(self, split) -> dict:
        self.inspector.mark("evaluation")
        faults.step = self.step
        faults.point("evaluation")
        t0 = self.comm.wtime()
        scores = evaluate(self.pipe, self.loss_fn, split, self.grid, self.cfg, self.classify)
        if self.timeline is not None:
            self.timeline.span("evaluation", t0, self.comm.wtime(), rows=scores["rows"])
        return scores

    def checkpoint(self, sums, why: str) -> None:
        """Write the state after ``self.step`` (collective); ``sums``: this rank's running sums of
        the epoch in progress. Never writes a state some rank found non-finite."""
        cfg, comm = self.cfg, self.comm
        here = (self.step, self.epoch, self.batch)
        if not cfg.checkpoint_dir or self.saved_at == here:
            return
        if comm.max(int(self.stop.local_trouble)):
            return  # the next stop check ends the run and says why
        self.inspector.mark("checkpoint")
        total = sums.copy()
        comm.allreduce_sum_(total)  # the epoch's running sums, whatever the layout that resumes them
        position = Position(*here, total.tolist(), self.finished)
        t0 = comm.wtime()
        args = (cfg, self.layers, self.ds.features, self.bounds, self.grid, self.model, self.opt, position)
        path = save(cfg.checkpoint_dir, *args, cfg.checkpoint_io)
        seconds = comm.wtime() - t0
        if self.timeline is not None:
            self.timeline.span("checkpoint write", t0, t0 + seconds, step=self.step)
        self.result.checkpoint = str(path)
        if comm.is_root:
            if cfg.keep:
                prune(cfg.checkpoint_dir, cfg.keep, path)
            self.log(f"checkpoint ({why}): {path}, {path.stat().st_size / 2**20:.1f} MiB in {seconds:.3f} s")
        self.saved_at = here

    def _stopped(self, sums) -> Result:
        """Every rank agreed to stop: say why (or, for a signal, checkpoint and return)."""
        stop, result = self.stop, self.result
        result.steps = self.step
        stop.drain()  # notes made in the step after a signal's (a NaN, a bad row) must not be lost
        if stop.bad_input is not None:  # the ranks that noted one know what it was: gather that
            noted = [p for p in self.comm.comm.allgather(self.bad_input) if p is not None]
            at_step, *problem = min(noted)
            raise JobError(
                f"{_problem_text(self.ds.train, problem, at_step)}; training stopped, checkpoints untouched",
                EXIT_USAGE,
            )
        if stop.nonfinite is not None:
            at_step, layer, loss = stop.nonfinite
            if layer is None:
                what = "non-finite loss (the gradient is finite)"
            elif layer < len(self.layers):
                what = (
                    f"non-finite {'loss and ' if loss else ''}gradient (the first layer with a non-finite "
                    f"gradient is {layer}, {self.layers[layer]!r})"
                )
            else:
                what = f"{'non-finite loss and ' if loss else ''}a gradient whose squared norm overflows"
            raise JobError(
                f"{what} at step {at_step}; training stopped, no checkpoint written from that state "
                "(try a lower --lr or --clip-norm)",
                EXIT_NONFINITE,
            )
        result.stopped = stop.agreed
        self.checkpoint(sums, f"stop requested: {result.stopped}")
        self.progress.close()
        if self.run_dir is not None:
            self.run_dir.record("stopped", {"step": self.step, "signal": result.stopped})
        self.ds.close()
        return result

    def _check_replicas(self) -> None:
        """Every data-parallel replica of a stage must hold bitwise the same parameters."""
        digest = hashlib.blake2b(memoryview(to_host(self.model.params.data)), digest_size=16).hexdigest()
        rows = self.comm.comm.allgather((self.grid.stage, digest))
        problems = []
        for stage in range(self.grid.stages):
            held = [(r, d) for r, (s, d) in enumerate(rows) if s == stage]
            values = [d for _, d in held]
            common = max(set(values), key=values.count)
            if values.count(common) == len(values):
                continue
            if 2 * values.count(common) > len(values):  # a majority: the others are the odd ones
                problems.append(
                    f"rank(s) {[r for r, d in held if d != common]} differ from the other replicas"
                )
            else:  # e.g. two replicas: which one is wrong cannot be told
                problems.append(f"the replicas of stage {stage} (ranks {[r for r, _ in held]}) disagree")
        if problems:
            raise JobError(
                f"replicas diverged by step {self.step}: {'; '.join(problems)} (a silent hardware or "
                "communication fault?)",
                EXIT_INTERNAL,
            )

    def _final(self) -> None:
        result, ds = self.result, self.ds
        result.steps = self.step
        split = ds.test if ds.test is not None else ds.train
        final = result.history[-1].get("test") if result.history else None
        result.final = dict(final or self._evaluate(split))
        result.final["split"] = "held-out" if ds.test is not None else "training"
        self.progress.close()
        if self.run_dir is not None:
            self.run_dir.record("final", {"step": self.step, **result.final})
        if self.grid.stages > 1:
            _report_stages(self.log, self.cfg, self.grid, self.pipe)
        ds.close()


def _resume(cfg, grid, layers, in_features, bounds, model, opt, log):
    """Load the checkpoint ``cfg.resume`` names into this rank's stage; returns its position and
    path, or ``(None, None)`` when ``resume = auto`` finds no checkpoint (a requeued job's first run)."""
    world = grid.world
    chosen, notes = world.root_decides(lambda: _choose_checkpoint(cfg), cfg.debug)
    for note in notes:
        log(note)
    if chosen is None:
        log(f"resume: no checkpoint in {cfg.checkpoint_dir}: starting from the beginning")
        return None, None
    with world.agreed(cfg.debug):
        info = inspect(chosen)
        diff = architecture_difference(info.architecture, architecture(layers, in_features, cfg.dtype))
        if diff:
            raise UserError(f"cannot resume from {chosen}: {diff}")
        if info.optimizer != cfg.optimizer or info.state_names != sorted(opt.state):
            raise UserError(
                f"cannot resume from {chosen}: it holds {info.optimizer} state {info.state_names}, "
                f"this run's {cfg.optimizer} keeps {sorted(opt.state)} (match --optimizer and --momentum)"
            )
        stage = grid.stage
        read_stage(chosen, layers, bounds[stage], bounds[stage + 1], model.params, opt.state)
        opt.t = info.optimizer_t
    at = info.position
    layout = info.layout
    log(
        f"resumed from {chosen}: step {at.step}: {at.epoch} epoch(s) and {at.batch} batch(es) done; "
        f"written by {layout['ranks']} rank(s) ({layout['replicas']} x {layout['stages']} stages)"
    )
    changed = config_changes(info.config, cfg)
    if changed:
        log("resume: settings that differ from the checkpoint's run: " + "; ".join(changed))
    return at, chosen


def _lock_checkpoint_dir(cfg, comm, log) -> DirectoryLock | None:
    """Rank 0 locks ``checkpoint_dir`` for this run (``hpcnn.io.dirlock``; created if missing, and
    removed again if the run leaves it empty) before anything looks into it, and removes temporary
    files that interrupted writes left there. ``JobError`` (exit 2) naming the run that holds it."""
    if not cfg.checkpoint_dir:
        return None
    lock = None

    def take() -> list[str]:
        nonlocal lock
        advice = "wait for it to end, or choose another --checkpoint-dir"
        lock = DirectoryLock.acquire(cfg.checkpoint_dir, "checkpoint_dir", advice)
        removed = remove_temporaries(cfg.checkpoint_dir)
        done = f"note: removed the temporary files of interrupted writes: {', '.join(removed)}"
        return lock.notes + ([done] if removed else [])

    try:
        notes = comm.root_decides(take, cfg.debug)
    except JobError:
        if lock is not None:
            lock.release()
        raise
    for note in notes if log is not None else ():
        log(note)
    return lock


def _check_checkpoint_dir(cfg, comm, start: Position | None, needed: int) -> None:
    """Refuse to write into a directory whose checkpoints would be overwritten or mixed with this
    run's: a fresh run needs a directory without checkpoints, a resumed one no newer checkpoints
    than its starting point (``auto`` starts from the newest good one: newer ones are unreadable).
    Also, before any training: the directory must be writable, have room for one checkpoint of
    ``needed`` bytes, and ``mpio`` must be available if asked for."""
    if not cfg.checkpoint_dir:
        return
    with comm.agreed(cfg.debug):
        if cfg.checkpoint_io == "mpio" and not h5py_parallel():
            raise UserError(
                "checkpoint_io = 'mpio' needs h5py built with parallel HDF5 (h5py.get_config().mpi is "
                "False here); use --checkpoint-io gather or auto"
            )
    checks = lambda: _check_directory(cfg, start) or too_little_space(cfg.checkpoint_dir, needed)  # noqa: E731
    short = comm.root_decides(checks, cfg.debug)  # one answer from rank 0 for both
    if short:  # the run could never save its work
        advice = "free some space or choose another --checkpoint-dir"
        raise JobError(f"checkpoint_dir: {short}; {advice}", EXIT_IO)


def _check_writable(directory, message: str) -> None:
    """Create ``directory`` and write a file there; ``UserError(f"{message}: {reason}")`` if not."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".hpcnn-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"{message}: {exc}") from None


def _check_output_file(path, what: str) -> None:
    """``path`` must name a file (new or not) in a directory this process can create and write."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; name a file")
    _check_writable(path.parent, f"{what} {path}: cannot write there")


def _check_directory(cfg, start: Position | None) -> None:
    _check_writable(cfg.checkpoint_dir, f"checkpoint_dir {cfg.checkpoint_dir} is not writable")
    if cfg.resume == "auto":
        return
    step = start.step if start else -1
    ahead = [p for p in checkpoints(cfg.checkpoint_dir) if step_of(p) > step]
    if ahead and start is None:
        raise UserError(
            f"checkpoint_dir {cfg.checkpoint_dir} already holds checkpoints of another run "
            f"(newest {ahead[0].name}): continue it with --resume auto, or choose another --checkpoint-dir"
        )
    if ahead:
        raise UserError(
            f"checkpoint_dir {cfg.checkpoint_dir} holds checkpoints newer than {cfg.resume} "
            f"(newest {ahead[0].name}) that this run would overwrite: choose another --checkpoint-dir"
        )


def _choose_checkpoint(cfg) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from (rank 0): ``cfg.resume``, or for ``auto`` the newest one that
    reads back whole; the notes say which newer ones were unreadable. Each is verified in a child
    process that cannot hang this one (``verify_bounded``)."""
    if cfg.resume != "auto":
        verify_bounded(cfg.resume)
        return cfg.resume, []
    notes, skipped = [], []
    for path in checkpoints(cfg.checkpoint_dir):
        try:
            verify_bounded(path)
        except UserError as exc:
            notes.append(f"resume: skipping {exc}")
            skipped.append(path)
            continue
        # This run will write checkpoints under the skipped files' names: keep them, under other
        # names (a file whose check only stalled, on a slow file system, may be good).
        for bad in skipped:
            aside = bad.with_name(bad.name + ".unreadable")
            try:
                bad.rename(aside)
            except OSError as exc:
                raise UserError(f"cannot move the unreadable checkpoint {bad} aside: {exc}") from None
            notes.append(f"resume: kept {bad.name} as {aside.name}")
        return str(path), notes
    if notes:
        raise UserError(f"no readable checkpoint in {cfg.checkpoint_dir}: " + "; ".join(notes))
    return None, notes


def _describe(log, cfg, ds, layers, bounds, grid, sampler, steps) -> None:
    classify = ds.num_classes is not None
    kind = f"{ds.num_classes} classes" if classify else f"{ds.outputs} regression outputs"
    held_out = len(ds.test) if ds.test else 0
    log(
        f"data: {ds.name}: {len(ds.train)} training rows, {held_out} held-out, {ds.features} features, {kind}"
    )
    log(f"model: {describe(layers)}, {cfg.dtype}")
    if grid.stages > 1:
        costs = Sequential.layer_flops(layers, ds.features)
        log(
            f"pipeline: {grid.replicas} data-parallel replica(s) x {grid.stages} stages, "
            f"schedule {cfg.schedule}, {cfg.micro_batches} micro-batch(es) per step"
        )
        for s in range(grid.stages):
            a, b = bounds[s], bounds[s + 1]
            share = sum(costs[a:b]) / sum(costs)
            names = " -> ".join(map(repr, layers[a:b]))
            ranks = grid.ranks_of_stage(s)
            log(f"  stage {s}: layers {a}-{b - 1} {names}: {100 * share:.1f}% of FLOPs, ranks {ranks}")
    rows = min(cfg.batch_size, len(ds.train))
    share = f"~{rows / grid.replicas:.3g} per replica"
    if cfg.deterministic:
        size = shard_rows(cfg)
        share = f"at most {min(rows, -(-shard_count(rows, size) // grid.replicas) * size)} per replica"
    stop = f", stopping after {steps} steps" if cfg.max_steps else ""
    log(
        f"training: {cfg.epochs} epochs x {len(sampler)} steps of {cfg.batch_size} rows "
        f"({share}){stop}, {cfg.optimizer} lr {cfg.lr:g}, {cfg.lr_schedule}"
    )


def _report_stages(log, cfg, grid, pipe) -> None:
    """Rank 0 prints where each stage of pipeline 0 spent its time, against GPipe's theory."""
    t = pipe.times
    rows = grid.pipe.comm.gather((t.compute, t.wait, t.total, t.bubble, t.peak_live), root=0)
    if rows is None:
        return
    theory = gpipe_bubble(grid.stages, cfg.micro_batches)
    log(f"pipeline time per stage (replica 0; theory for equal stages: bubble {100 * theory:.1f}%):")
    for s, (compute, wait, total, bubble, peak) in enumerate(rows):
        log(
            f"  stage {s}: compute {compute:.2f} s, waiting {wait:.2f} s of {total:.2f} s, "
            f"bubble {100 * bubble:.1f}%, at most {peak} micro-batch(es) alive"
        )


def _pct(v) -> str:
    return f"{100 * v:6.2f}%"


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}"
    if row["accuracy"] is not None:
        text += f"  acc {_pct(row['accuracy'])}"
    if "test" in row:
        text += f"  | held-out loss {row['test']['loss']:.4f}"
        if row["test"]["accuracy"] is not None:
            text += f"  acc {_pct(row['test']['accuracy'])}"
    return text + f"  | lr {row['lr']:.2e}  {row['samples_per_s']:,.0f} rows/s  {row['seconds']:.2f} s"


def _announce_layout(cfg: Config, comm: Comm) -> tuple:
    """Set this rank's BLAS threads and say what the job looks like; returns the threads and why,
    and (on rank 0) every rank's host and PID."""
    threads = blas_threads(comm.local_size, cfg.threads)
    cores = os.cpu_count() or 1
    comm.print0(
        f"hpcnn {__version__}: {comm.size} rank(s), {comm.local_size} on this node with "
        f"{cores} cores; BLAS threads per rank: {threads[0] or 'user-set'} ({threads[1]})"
    )
    if comm.local_size > cores:
        comm.print0(
            f"hpcnn: note: {comm.local_size} ranks share {cores} cores on this node (oversubscribed): "
            "fine for testing, not for speed"
        )
    # Launchers report a dead process by host and PID (MPICH's "BAD TERMINATION ... PID 2456"):
    # this line turns that into a rank.
    placement = comm.comm.gather((socket.gethostname(), os.getpid()), root=0)
    if comm.size > 1 and placement is not None:
        comm.print0(f"hpcnn: ranks by host (rank=pid): {_placement(placement)}")
    return threads, placement


def _placement(rows) -> str:
    """``host: 0=2450 1=2451 ...`` per host, runs of consecutive ranks and PIDs folded."""
    hosts: dict[str, list] = {}
    for rank, (host, pid) in enumerate(rows):
        hosts.setdefault(host, []).append((rank, pid))
    parts = []
    for host, pairs in hosts.items():
        runs, i = [], 0
        while i < len(pairs):
            j = i
            while j + 1 < len(pairs) and pairs[j + 1] == (pairs[j][0] + 1, pairs[j][1] + 1):
                j += 1
            (r0, p0), (r1, p1) = pairs[i], pairs[j]
            runs.append(f"{r0}={p0}" if i == j else f"{r0}-{r1}={p0}-{p1}")
            i = j + 1
        parts.append(f"{host}: {' '.join(runs)}")
    return "; ".join(parts)


def _facts(cfg: Config, comm: Comm, threads: tuple, placement) -> dict:
    """What the run directory's facts.json records about the job (rank 0's view)."""
    import h5py
    import mpi4py

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ranks": comm.size,
        "pipeline_stages": cfg.pipeline_stages,
        "replicas": comm.size // cfg.pipeline_stages,
        "micro_batches": cfg.micro_batches,
        "blas_threads_per_rank": threads[0],
        "blas_threads_source": threads[1],
        "mpi_library": comm.library_version(),
        "hosts": _placement(placement) if placement else socket.gethostname(),
        "versions": {
            "hpcnn": __version__,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "mpi4py": mpi4py.__version__,
            "h5py": h5py.__version__,
        },
    }


def _open_run_dir(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None]:
    """Rank 0 creates the run directory (collective: every rank learns its path or the error);
    checkpoints go into it unless ``checkpoint_dir`` is set."""
    if not cfg.run_dir:
        return cfg, None
    run = None

    def create() -> str:
        nonlocal run
        try:
            run = RunDir.create(cfg.run_dir)
        except OSError as exc:
            raise UserError(f"run_dir {cfg.run_dir}: cannot create it: {exc}") from None
        return str(run.path)

    path = comm.root_decides(create, cfg.debug)
    if not cfg.checkpoint_dir:
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(Path(path) / "checkpoints"))
    return cfg, run


def _dry_run(cfg: Config, comm: Comm) -> int:
    """Print the resolved config and what every rank would hold; train nothing."""
    ds, layers, bounds, grid, pipe, sampler = _prepare(cfg, comm)
    steps = _total_steps(cfg, sampler)
    _describe(comm.print0, cfg, ds, layers, bounds, grid, sampler, steps)
    params = pipe.model.params
    itemsize = np.dtype(cfg.dtype).itemsize
    state = {"sgd": 1 if cfg.momentum else 0, "adam": 2, "adamw": 2}[cfg.optimizer]
    # Parameters, gradients, optimizer state; activations: every layer's output and input gradient
    # per micro-batch slot. The workspace keeps one set per slot under either schedule (1F1B bounds
    # the micro-batches alive, but a slot's output may still be in a pending send).
    unit = shard_rows(cfg) if cfg.deterministic else 1  # whole shards in deterministic mode
    _, rows = split_units(cfg.batch_size, unit, grid.replicas, grid.replica)  # this replica's rows per step
    micro_rows = -(-rows // cfg.micro_batches)
    widths, stacked, features = 0, 0, ds.features
    for i, layer in enumerate(layers):
        mine = bounds[grid.stage] <= i < bounds[grid.stage + 1]
        stacked += layer.deferred_width(features) if mine else 0
        features = layer.out_features(features)
        widths += features if mine else 0
    activation_bytes = 2 * cfg.micro_batches * micro_rows * widths * itemsize
    # A pipeline stage keeps its layers' inputs and output gradients for the whole step's rows
    # until the weight-gradient products.
    if defers_weight_grads(grid.stages, cfg.micro_batches, cfg.deterministic):
        activation_bytes += rows * stacked * itemsize
    buffers = 2 + state  # parameters, gradients, optimizer state
    if cfg.deterministic:  # one gradient per shard this replica holds in a step
        full = shard_count(min(cfg.batch_size, len(ds.train)), shard_rows(cfg))
        buffers += -(-full // grid.replicas)
    bytes_total = buffers * params.size * itemsize + activation_bytes
    row = (comm.rank, socket.gethostname(), grid.stage, grid.replica, bounds[grid.stage],
           bounds[grid.stage + 1] - 1, params.size, bytes_total, rows)  # fmt: skip
    rows_all = comm.comm.gather(row, root=0)
    comm.print0("layout (rank: host, stage, replica, layers, parameters, estimated memory, rows per step):")
    for r, host, stage, replica, a, b, n, nbytes, batch_rows in rows_all or []:
        comm.print0(
            f"  rank {r}: {host}, stage {stage}, replica {replica}, layers {a}-{b}, {n:,} parameters, "
            f"~{nbytes / 2**20:.1f} MiB, ~{batch_rows} rows of each global batch"
        )
    total = sum(row[6] for row in rows_all or [] if row[3] == 0)
    comm.print0(f"parameters: {total:,} in all; {steps} steps")
    comm.print0("resolved config (TOML):")
    comm.print0(cfg.to_toml().rstrip())
    ds.close()
    grid.free()
    return EXIT_OK


def _main(comm: Comm, argv, early: EarlySignals) -> int:
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    with comm.agreed(comm.debug):
        cfg = resolve(argv, is_root=comm.is_root)
    comm.debug = cfg.debug
    if dry_run:
        early.__exit__(None, None, None)  # nothing to stop at a step: Ctrl-C ends the dry run at once
        blas_threads(comm.local_size, cfg.threads)
        return _dry_run(cfg, comm)
    given = cfg  # what config.toml records: run_dir resolved, checkpoint_dir as given
    cfg, run = _open_run_dir(cfg, comm)
    if not cfg.checkpoint_dir:
        early.release()  # nowhere to save a stop: signals act as they would without hpcnn
    threads, placement = _announce_layout(cfg, comm)
    if run is not None:
        recorded = dataclasses.replace(given, run_dir=str(run.path))
        run.prepare(recorded.to_toml(), argv, _facts(cfg, comm, threads, placement))
        comm.print0(f"run directory: {run.path}")
    t0 = time.perf_counter()
    try:
        result = fit(cfg, comm, log=comm.print0, run=run, terminal=True)
    except Interrupted as stop:  # every rank, after the agreed stop
        if run is not None:
            run.close()
        comm.print0(f"hpcnn: {stop.message} (exit code {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:
        if run is not None:
            run.discard_if_unused()  # e.g. refused: the directory holds checkpoints of another run
        raise
    if run is not None:
        run.close()
    if result.stopped:
        comm.print0(
            f"hpcnn: stopped by {result.stopped} after step {result.steps}; continue with "
            f"--resume auto (exit code {EXIT_PREEMPTED})"
        )
        return EXIT_PREEMPTED
    final = result.final
    text = f"final {final['split']} loss {final['loss']:.4f}"
    if final["accuracy"] is not None:
        text += f", accuracy {100 * final['accuracy']:.2f}% ({final['rows']} rows)"
    comm.print0(f"{text}; {result.steps} steps in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def main(argv=None) -> int:
    # From the first line: a stop signal during start-up is honoured after the first step.
    early = globals().pop("_EARLY", None) or EarlySignals().__enter__()
    try:
        return run_command(
            lambda comm, args: _main(comm, args, early), sys.argv[1:] if argv is None else list(argv)
        )
    finally:
        early.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
