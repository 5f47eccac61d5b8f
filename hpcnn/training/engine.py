"""The training loop on one rank: ``Training`` holds one run's state (its stage of the model, the
optimizer, the data, the position) and runs the steps, the epoch summaries, the evaluations and the
checkpoints; ``Result`` is what a run returns. ``hpcnn.training.trainer.fit`` runs it inside the
run's guarantees (directory lock, agreed Ctrl-C, stall inspector).

One step: read my rows of the global batch -> forward -> loss -> backward (into the flat gradient
buffer) -> the gradient reduction (``hpcnn.parallel.sync``) -> clip -> optimizer step on the flat
parameter buffer; the step tells its probe (``hpcnn.parallel.probe``) each phase, which is how the
timers, the timeline, the stall inspector and fault injection see it. Every rank stops
after the same step when a stop signal arrives (``preempt``), a step goes non-finite, a bad input
row is read, or a callback (``on_step``/``on_epoch``) asks for it on rank 0.
"""

import copy
import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcnn.config import Config
from hpcnn.core.backend import dtype_of, to_host, xp
from hpcnn.core.losses import LOSSES
from hpcnn.core.optim import Schedule, make_optimizer
from hpcnn.errors import EXIT_INTERNAL, EXIT_NONFINITE, EXIT_USAGE, JobError, UserError
from hpcnn.io.checkpoints import Position, estimate_bytes, prune, save
from hpcnn.io.datasets import split_units
from hpcnn.io.runlog import STEP_TIMES, Progress
from hpcnn.parallel import elastic, faults
from hpcnn.parallel.batchstats import batch_stats
from hpcnn.parallel.comm import IN_PLACE, SUM, Comm, Grid
from hpcnn.parallel.data_parallel import DataParallel
from hpcnn.parallel.deterministic import ShardReducer, shard_count, shard_rows
from hpcnn.parallel.inspector import Inspector
from hpcnn.parallel.pipeline import Pipeline
from hpcnn.parallel.preempt import ALL, INTERRUPT, StopRequest
from hpcnn.parallel.probe import Probe
from hpcnn.parallel.sync import GradientSync
from hpcnn.parallel.timeline import Timeline
from hpcnn.parallel.zero import ZeroSync
from hpcnn.training import privacy
from hpcnn.training.batches import (
    bad_row,
    evaluate_split,
    micro_batches,
    problem_text,
    read_batch,
)
from hpcnn.training.report import describe_run, epoch_line, report_stages
from hpcnn.training.setup import (
    Parts,
    check_checkpoint_dir,
    check_output_file,
    prepare,
    resume_from,
    total_steps,
)


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
    layers: list = field(default_factory=list)  # the whole model's layers (``model`` is this rank's run)
    in_shape: tuple = ()
    optimizer: object = None  # this stage's optimizer, bound to ``model.params``
    position: Position | None = None  # where training ended (what a checkpoint of this state records)
    left: bool = False  # --elastic: this rank left the training after ranks died (it holds no model)
    # --dp-sgd: epsilon spent at delta, the noise multiplier, the accountant, the private steps
    privacy: dict | None = None


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _time_parts(t) -> np.ndarray:
    """A stage's times so far in the order of ``STEP_TIMES`` (without ``other``); pipeline waits
    count as forward_backward."""
    return np.array([t.data, t.forward + t.backward + t.wait, t.reduce, t.optimizer])


class Training:
    """One run's state on this rank: what the loop, its epoch summaries and its checkpoints share."""

    def __init__(
        self, cfg: Config, comm: Comm, log, inspector: Inspector, run=None, terminal: bool = False,
        parts=None, restore=None, fault=False,
    ):  # fmt: skip
        """``restore`` (``hpcnn.parallel.elastic.Restore``): a run rebuilt after a rank failure
        starts from a state held in memory (or from a checkpoint: ``cfg.resume``); ``fault``: the
        armed ``HPCNN_FAULT`` to keep (``False``: arm it from the variable)."""
        self.cfg, self.comm, self.inspector, self.run_dir = cfg, comm, inspector, run
        parts = parts or Parts()
        self.on_step, self.on_epoch = parts.on_step, parts.on_epoch
        # what watches this rank's phases: step timers, the stall inspector, the timeline, faults
        fault = faults.armed(comm.world_rank) if fault is False else fault
        self.probe = probe = Probe(comm.wtime, inspector, faults=fault)
        probe.fault("setup")
        ds, layers, bounds, grid, pipe, sampler = prepare(cfg, comm, parts, probe)
        self.ds, self.layers, self.bounds, self.grid, self.pipe, self.sampler = (
            ds,
            layers,
            bounds,
            grid,
            pipe,
            sampler,
        )
        self.model = pipe.model
        # BatchNorm's statistics over the stage's replicas (a communicator of their own)
        self.model.context.stats = batch_stats(grid.dp)
        self.dtype, self.classify = dtype_of(cfg.dtype), ds.num_classes is not None
        self.loss_fn = LOSSES[cfg.loss]() if parts.loss is None else parts.loss
        self.sync = self._gradient_sync()
        self.sync.broadcast_parameters()
        if cfg.timeline:  # an unwritable path is found out now, not after training
            comm.root_decides(lambda: check_output_file(cfg.timeline, "timeline"), cfg.debug)
            probe.timeline = Timeline(comm, comm.wtime)
        # a copy: one optimizer object given to two trainers must not end up bound to the second's buffers
        self.opt = (make_optimizer(cfg) if parts.optimizer is None else copy.copy(parts.optimizer)).bind(
            self.sync.optimizer_params()
        )
        self.steps = total_steps(cfg, sampler)
        self.speak = log if log is not None else (lambda text: None)  # what --quiet does not silence
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
        if restore is None:
            describe_run(log, cfg, ds, layers, bounds, grid, sampler, self.steps)
        self.result = Result(
            self.model, grid, bounds, pipe, layers=layers, in_shape=ds.in_shape, optimizer=self.opt
        )
        held = restore.held if restore is not None else None
        if held is not None:  # the state this rank held when ranks died (the same stage)
            held.put(self.model.params, self.opt)
            self.start, source = restore.position, None
            self.result.step_losses = list(restore.losses)
        elif cfg.resume:
            args = (cfg, grid, layers, ds.in_shape, bounds, self.model, self.opt, log)
            self.start, source = resume_from(*args)
        else:
            self.start, source = None, None
        if held is None:
            size = estimate_bytes(layers, 1 + len(self.opt.state), np.dtype(cfg.dtype).itemsize)
            check_checkpoint_dir(cfg, comm, self.start, size)
        if run is not None and restore is None:
            run.write_start()
        at = self.start or Position()
        self.private = None  # --dp-sgd: the accountant, the noise (``hpcnn.training.privacy``)
        if cfg.dp_sgd:
            args = (cfg, comm, len(ds.train), self.steps, at, layers, bounds, grid, pipe)
            self.private = privacy.PrivateRun(*args)
            self.steps = self.private.steps
            self.speak(self.private.description)
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
        # --elastic: the state at the start of the step in progress, and where in the step this
        # rank is (``held_states``); the epoch's metrics summed over every rank, step by step
        self._held = None
        if cfg.elastic and not cfg.zero:
            self._held = elastic.Held.like(self.model.params, self.opt)
        self._in_step, self._updated = False, False
        self.global_sums = np.array(at.epoch_sums, float)
        self.recovery = restore.report if restore is not None else None  # said once the next step is done
        if cfg.deterministic:  # last: nothing after it can fail and leave BLAS single-threaded
            self._shard()
        self.t_start = comm.wtime()
        self._new_interval()

    def _gradient_sync(self) -> GradientSync:
        """How this stage's replicas agree on the gradient: the overlapped bucketed Allreduce, or
        (deterministic mode) the tree-ordered sum of per-shard gradients, whose per-shard buffer
        is allocated here (agreed on: it may be too large)."""
        cfg, grid, pipe = self.cfg, self.grid, self.pipe
        stages = grid.pipe if grid.stages > 1 else None
        if not cfg.deterministic:
            params, overlap = self.model.params, cfg.overlap == "on"
            if cfg.zero:
                stage_layers = self.layers[self.bounds[grid.stage] : self.bounds[grid.stage + 1]]
                pipe.always_defer = cfg.zero == 2 and grid.replicas > 1
                return ZeroSync(
                    grid.dp, params, cfg.zero, stage_layers, cfg.micro_batches, overlap, cfg.bucket_mb,
                    self.probe, stages, pipe.is_last,
                )  # fmt: skip
            return DataParallel(grid.dp, params, overlap, cfg.bucket_mb, self.probe, stages, pipe.is_last)
        rows, _, most = self._shard_counts()
        # the gradient norm is summed per tensor, in model order: this stage's first tensor's index
        base = sum(len(layer.param_specs()) for layer in self.layers[: self.bounds[grid.stage]])
        tensors = (base, sum(len(layer.param_specs()) for layer in self.layers))
        with self.comm.agreed(cfg.debug):  # one gradient per shard: a large allocation, maybe too large
            return ShardReducer(
                grid.dp, self.model, most, rows, grid.world, stages, pipe.is_last, tensors, bool(cfg.zero)
            )

    def _shard_counts(self) -> tuple[int, int, int]:
        """Deterministic mode: rows per shard, shards in a full batch, and at most per replica."""
        rows = shard_rows(self.cfg)
        full = shard_count(min(self.cfg.batch_size, len(self.ds.train)), rows)
        return rows, full, -(-full // self.grid.replicas)

    def _shard(self) -> None:
        """Deterministic mode: shard threads in place of BLAS's own (``hpcnn.parallel.deterministic``)."""
        cfg, grid = self.cfg, self.grid
        rows, full, most = self._shard_counts()
        workers = self.sync.start().workers
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

    def close(self, freeing: bool = True) -> None:
        """Stop the shard threads and give BLAS its threads back (deterministic mode); free the
        batch statistics' communicator (``freeing``: not after a rank failure, which revoked it)."""
        self.sync.close()
        stats, self.model.context.stats = self.model.context.stats, None
        if stats is not None and freeing:
            stats.close()

    def held_states(self) -> tuple[int, dict]:
        """``(done, states)``: the optimizer steps this rank completed, and ``{step: Held}`` for
        each state it can restore from memory (``--elastic``; none with ``--zero``): the live one
        and the copy taken at the start of the step in progress."""
        done = self.step + (self._in_step and self._updated)
        if self._held is None:
            return done, {}
        states = {self._held.step: self._held} if self._held.step >= 0 else {}
        if not self._in_step or self._updated:  # the live buffers hold the state after ``done`` steps
            params = self.model.params
            live = elastic.Held(
                done, params.data, self.opt.state, self.opt.t, params.state, self.global_sums.copy(),
                list(self.finished), len(self.result.step_losses),
            )  # fmt: skip
            states[done] = live
        return done, states

    def _recovered(self) -> None:
        took = time.time() - self.recovery["noticed_at"]
        self.progress.close()
        self.speak(f"elastic: step {self.step} done {took:.2f} s after the failure was noticed")
        if self.run_dir is not None:
            self.run_dir.record(
                "recovered", {"step": self.step, "seconds_since_failure": took, "at": time.time()}
            )
        self.recovery = None

    def stop_below(self, reason: str) -> Result:
        """Too few ranks are left to go on (``--elastic``): checkpoint the restored state, stop."""
        result = self.result
        with StopRequest(self.comm, ()) as self.stop:
            result.steps, result.stopped, result.position = self.step, reason, self.start
            self.checkpoint(None, "too few ranks left", self.start)
        self.progress.close()
        return result

    def _new_interval(self) -> None:
        """Start summing the metrics of the next ``log_every`` steps."""
        t = self.probe.times
        self._interval = np.zeros(4)  # loss sum, correct, rows (last stages), squared gradient norm
        self._interval_times = _time_parts(t)
        self._interval_steps, self._interval_wall = 0, 0.0

    def _step_record(self) -> dict:
        """The metrics of the steps since the last record (collective: every rank, same steps)."""
        n = self._interval_steps
        spent = _time_parts(self.probe.times) - self._interval_times
        # Seconds inside steps only: evaluations and checkpoint writes in between are not steps.
        buf = np.concatenate([self._interval, spent / n, [self._interval_wall / n]])
        self.comm.Allreduce(IN_PLACE, buf, op=SUM)
        loss, correct, rows, sq = buf[:4]
        per_step = buf[4:] / self.comm.size  # seconds per step, averaged over ranks
        split = dict(
            zip(STEP_TIMES, [*per_step[:4], max(0.0, per_step[4] - per_step[:4].sum())], strict=True)
        )
        self._new_interval()
        self.last_record = {
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
        return self.last_record

    def run(self) -> Result:
        cfg, result = self.cfg, self.result
        sums = np.zeros(3)
        # Ctrl-C is honoured without checkpoints too; SIGTERM/SIGUSR1 only where a stop can be saved.
        with StopRequest(self.comm, ALL if cfg.checkpoint_dir else (INTERRUPT,)) as self.stop:
            while self.epoch < cfg.epochs and not (self.step >= self.steps and self.batch == 0):
                # Only rank 0 carries a resumed epoch's running sums: the epoch's reduction adds them once.
                resumed = self.start is not None and self.epoch == self.start.epoch
                sums = np.array(self.start.epoch_sums) if resumed and self.comm.is_root else np.zeros(3)
                self.global_sums = np.array(self.start.epoch_sums) if resumed else np.zeros(3)
                t0, rows = self.comm.wtime(), 0
                for ids, global_rows in itertools.islice(self.sampler.epoch(self.epoch), self.batch, None):
                    if self.step >= self.steps:
                        break
                    # A step may overflow (a too large --lr): its loss and gradient are checked and the
                    # run stops with one message, which per-rank numpy warnings would only precede.
                    self.last_record = None
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        self._step(ids, global_rows, sums)
                    rows += global_rows
                    with self.probe.region("stop check"):
                        stop = self.stop.poll()
                    if stop:
                        return self._stopped(sums)
                    if cfg.check_replicas and self.step % cfg.check_replicas == 0:
                        self._check_replicas()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.checkpoint(sums, f"every {cfg.checkpoint_every} steps")
                    record = self.last_record
                    if record is not None and self._asks_to_stop(self.on_step, record, "on_step"):
                        self.steps = self.step  # as if max_steps ended here
                if self.stop.drain():  # nothing noted in the epoch's last steps may reach its summary
                    return self._stopped(sums)
                self._close_epoch(sums, rows, self.comm.wtime() - t0)
                if self._asks_to_stop(self.on_epoch, self.result.history[-1], "on_epoch"):
                    self.steps = self.step
                if self.step >= self.steps:
                    break
            if self.stop.drain():
                return self._stopped(sums)
            if self.private is not None and self.step == self.private.budget_steps:
                self.speak(
                    f"dp-sgd: the privacy budget (epsilon {cfg.target_epsilon:g}) allows no further step: "
                    f"training ends at step {self.step}"
                )
            result.position = self.position(sums if self.batch else np.zeros(3))
            self.checkpoint(None, "end of training", result.position)
            self._final()
        return result

    def _asks_to_stop(self, callback, record: dict, name: str) -> bool:
        """Run a user callback on every rank (its failure on any rank is one ``JobError`` on every
        rank); rank 0's answer decides for all (one broadcast)."""
        if callback is None:
            return False
        with self.probe.region("callbacks"):  # the callbacks are the user's stop check
            with self.comm.agreed(self.cfg.debug):
                try:
                    answer = bool(callback(record))
                except Exception as exc:  # the user's code: a UserError naming the callback
                    raise UserError(f"the {name} callback raised {type(exc).__name__}: {exc}") from exc
            return bool(self.comm.bcast(answer if self.comm.is_root else None))

    def _step(self, ids, global_rows: int, sums) -> None:
        """One optimizer step on the global batch whose rows ``ids`` are this replica's."""
        cfg, pipe, probe, sync = self.cfg, self.pipe, self.probe, self.sync
        if self._held is not None:  # --elastic: what survivors go back to if this step fails
            self._held.take(
                self.step, self.model.params, self.opt, self.global_sums, self.finished,
                len(self.result.step_losses),
            )  # fmt: skip
        self._in_step, self._updated = True, False
        probe.begin_step(self.step, self.epoch)
        probe("data", value=len(ids))
        x, y, problem = read_batch(self.ds.train, ids, pipe, self.dtype, self.classify, "train")
        if probe.fault("data") == "nan":
            x[-1, 0] = xp.nan
        problem = problem or bad_row(self.ds.train, ids, x, y, pipe, self.classify)
        if problem is not None:  # every rank learns of it at the next stop check and stops there
            self.stop.note_bad_input(self.step, problem[0])
            self.bad_input = self.bad_input or (self.step, *problem)
        inputs, targets, sizes = micro_batches(x, y, cfg.micro_batches, pipe.shard_rows or 1)
        probe("forward/backward")
        hook = sync.on_layer_done
        # what the layers' training forwards see: the step, the global batch, where my rows start
        context = self.model.context
        context.step, context.batch_rows = self.step, global_rows
        first_row = split_units(global_rows, pipe.shard_rows or 1, self.grid.replicas, self.grid.replica)[0]
        # a private step divides by the expected batch size, whatever the batch drawn (maybe empty)
        scale = self.private.loss_scale if self.private is not None else 1.0 / global_rows
        loss_sum, correct = pipe.train_step(inputs, targets, sizes, scale, self.loss_fn, hook, first_row)
        probe("metrics")
        counted, loss_sum = sync.metrics(global_rows, loss_sum, correct, len(ids), pipe.shard_losses)
        if counted is not None:
            sums += counted
            self._interval[:3] += counted
        if pipe.is_last:
            self.result.step_losses.append(loss_sum)
        if cfg.elastic:  # the epoch's metrics must survive any rank: summed over all, every step
            step_sums = np.zeros(3) if counted is None else np.array(counted, float)
            summing = self.comm.Iallreduce(IN_PLACE, step_sums, op=SUM)
        probe("reduce")
        sync.reduce(global_rows)
        if self.private is not None:  # the same noise on every replica: added once to the sum
            self.private.add_noise(self.model.params, self.step)
        if cfg.elastic:
            summing.Wait()
            self.global_sums += step_sums
        probe("optimizer")
        sq, share = sync.sq_norm(cfg.clip_norm)
        # Whether to step depends on the reduced gradient only, which all replicas of a stage share,
        # so replicas stay identical; a non-finite gradient leaves the last finite state in place.
        # Every rank learns of a note at the next stop check.
        loss_bad = pipe.is_last and not math.isfinite(loss_sum)
        if math.isfinite(sq):
            sync.step(self.opt, self.lr(self.step))
        self._updated = True
        if loss_bad or not math.isfinite(sq):
            layer = None if math.isfinite(sq) else self._first_nonfinite_layer()
            self.stop.note_nonfinite(self.step, layer, loss_bad)
        if probe.fault("optimizer") == "diverge":
            self.model.params.data[0] += 1e-3
        seconds = probe.end_step()
        self.step, self.batch = self.step + 1, self.batch + 1
        self._in_step = False
        self._interval[3] = share  # the ranks' shares add up to the whole model's squared norm
        self._interval_steps += 1
        self._interval_wall += seconds
        if self.recovery is not None:  # the first step after a recovery: how long the failure cost
            self._recovered()
        record = None
        if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.steps):
            record = self._step_record()
            if self.run_dir is not None:
                self.run_dir.record("step", record)
        self.progress.step(self.step, self.epoch, self.batch, record)

    def _first_nonfinite_layer(self) -> int:
        layer = self.sync.first_nonfinite()  # (sharded gradients: collective over the replicas)
        if layer is not None:
            return self.bounds[self.grid.stage] + layer
        return self.bounds[self.grid.stage + 1]  # finite but overflowing: past this stage's layers

    def _close_epoch(self, sums, rows: int, seconds: float) -> None:
        """Report the epoch (the part run here, for a max_steps stop), evaluate, advance."""
        cfg = self.cfg
        total = sums.copy()
        self.comm.Allreduce(IN_PLACE, total, op=SUM)
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": total[0] / total[2],
            "accuracy": total[1] / total[2] if self.classify else None,
            "lr": self.lr(self.step - 1),
            "seconds": seconds,
            "samples_per_s": rows / seconds,
        }
        if self.private is not None:
            row["epsilon"] = self.private.spent(self.comm)["epsilon"]
        last = self.epoch + 1 == cfg.epochs or self.step >= self.steps
        if self.ds.test is not None and (last or (cfg.eval_every and (self.epoch + 1) % cfg.eval_every == 0)):
            row["test"] = self._evaluate(self.ds.test)
        self.result.history.append(row)
        if self.run_dir is not None:
            self.run_dir.record("epoch", row)
        self.progress.close()  # the epoch's bar gives way to its line
        self.log(epoch_line(row, cfg.epochs))
        if self.batch == len(self.sampler):
            self.finished.append(row)
            self.epoch, self.batch = self.epoch + 1, 0
            every = cfg.checkpoint_every_epochs
            if every and self.epoch % every == 0:
                self.checkpoint(np.zeros(3), f"every {every} epoch(s)")

    def _evaluate(self, split) -> dict:
        with self.probe.region("evaluation", value=len(split), step=self.step):
            return evaluate_split(self.pipe, self.loss_fn, split, self.grid, self.cfg, self.classify)

    def checkpoint(self, sums, why: str, position: Position | None = None) -> None:
        """Write the state after ``self.step`` (collective); ``sums``: this rank's running sums of
        the epoch in progress (or the ``position`` they make, where the caller has it already).
        Never writes a state some rank found non-finite."""
        cfg, comm = self.cfg, self.comm
        here = (self.step, self.epoch, self.batch)
        if not cfg.checkpoint_dir or self.saved_at == here:
            return
        if comm.max(int(self.stop.local_trouble)):
            return  # the next stop check ends the run and says why
        with self.probe.region("checkpoint", value=self.step):
            position = position or self.position(sums)
            t0 = comm.wtime()
            state = (self.layers, self.ds.in_shape, self.bounds, self.grid, self.model, self.opt, position)
            path = save(cfg.checkpoint_dir, cfg, *state, cfg.checkpoint_io, self.probe.fault)
            seconds = comm.wtime() - t0
        self.result.checkpoint = str(path)
        if comm.is_root:
            if cfg.keep:
                prune(cfg.checkpoint_dir, cfg.keep, path)
            self.log(f"checkpoint ({why}): {path}, {path.stat().st_size / 2**20:.1f} MiB in {seconds:.3f} s")
        self.saved_at = here

    def position(self, sums) -> Position:
        """Where training stands (collective): ``sums``, this rank's running sums of the epoch in
        progress, summed over the ranks, whatever the layout that resumes them."""
        total = sums.copy()
        self.comm.Allreduce(IN_PLACE, total, op=SUM)
        spent = self.private.accountant.state() if self.private is not None else None
        return Position(self.step, self.epoch, self.batch, total.tolist(), self.finished, spent)

    def _stopped(self, sums) -> Result:
        """Every rank agreed to stop: say why (or, for a signal, checkpoint and return)."""
        stop, result = self.stop, self.result
        result.steps = self.step
        stop.drain()  # notes made in the step after a signal's (a NaN, a bad row) must not be lost
        if stop.bad_input is not None:  # the ranks that noted one know what it was: gather that
            noted = [p for p in self.comm.allgather(self.bad_input) if p is not None]
            at_step, *problem = min(noted)
            raise JobError(
                f"{problem_text(self.ds.train, problem, at_step)}; training stopped, checkpoints untouched",
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
        result.position = self.position(sums)
        self.checkpoint(None, f"stop requested: {result.stopped}", result.position)
        self.progress.close()
        if self.run_dir is not None:
            self.run_dir.record("stopped", {"step": self.step, "signal": result.stopped})
        self.ds.close()
        return result

    def _check_replicas(self) -> None:
        """Every data-parallel replica of a stage must hold bitwise the same parameters."""
        digest = hashlib.blake2b(memoryview(to_host(self.model.params.data)), digest_size=16).hexdigest()
        rows = self.comm.allgather((self.grid.stage, digest))
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

    def memory(self) -> dict:
        """This rank's training-state bytes as allocated (parameters, gradients, optimizer state;
        ``--zero`` shards the last two) and its peak resident set size so far."""
        params = self.model.params
        return {
            "rank": self.comm.rank,
            "parameters": int(params.data.nbytes),
            "gradients": self.sync.grad_bytes(),
            "optimizer_state": int(sum(buf.nbytes for buf in self.opt.state.values())),
            "peak_rss": peak_rss(),
        }

    def _final(self) -> None:
        result, ds = self.result, self.ds
        result.steps = self.step
        split = ds.test if ds.test is not None else ds.train
        final = result.history[-1].get("test") if result.history else None
        result.final = dict(final or self._evaluate(split))
        result.final["split"] = "held-out" if ds.test is not None else "training"
        result.privacy = self.private.spent(self.comm) if self.private is not None else None
        self.progress.close()
        memory = self.comm.gather(self.memory(), root=0)
        if self.run_dir is not None:
            self.run_dir.record("final", {"step": self.step, **result.final})
            self.run_dir.add_facts({"memory_per_rank": memory})
        if self.grid.stages > 1:
            report_stages(self.log, self.cfg, self.grid, self.pipe)
        ds.close()
