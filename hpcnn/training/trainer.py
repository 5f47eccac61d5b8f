"""The ``Trainer``: a model, data, a loss and an optimizer, trained over the ranks of a communicator.

Every rank of the job runs the same script and builds the same ``Trainer``; hpcnn splits the work
(data-parallel replicas x pipeline stages, as ``Config`` says)::

    model = Sequential([Dense(2, 4), Sigmoid(), Dense(4, 1), Sigmoid()])
    trainer = Trainer(model, hpcnn.arrays(x, y), loss="mse", optimizer=SGD(), lr=0.5, epochs=2000)
    result = trainer.fit()        # history, final, steps, stopped, checkpoint
    trainer.predict(x)            # the same array on every rank

Settings are ``Config`` fields by keyword (``Trainer.from_config`` takes a whole ``Config``: what
``python -m hpcnn.train`` does). ``fit`` runs ``hpcnn.training.engine.Training`` inside the run's
guarantees (``fit`` below): one run per checkpoint directory, Ctrl-C agreed by every rank
(``Interrupted``), the stall inspector, stop signals with a checkpoint, exact resume. A failure
inside the run is a ``JobError`` raised on every rank with the same message.
"""

import copy
import dataclasses
import math
import time

import numpy as np

from hpcnn.config import Config, from_dict
from hpcnn.core.backend import dtype_of, to_host, xp
from hpcnn.core.layers import Layer, layer_from_spec
from hpcnn.core.losses import LOSSES
from hpcnn.core.model import Sequential
from hpcnn.core.optim import make_optimizer
from hpcnn.errors import JobError, UserError
from hpcnn.io.checkpoints import Position, remove_temporaries, save
from hpcnn.io.datasets import Dataset, as_rows, image_shape, split_units
from hpcnn.io.runlog import RunDir
from hpcnn.parallel import elastic
from hpcnn.parallel.comm import IN_PLACE, SUM, Comm, blas_threads, process_failure
from hpcnn.parallel.inspector import OPS, Inspector
from hpcnn.parallel.preempt import INTERRUPT, HeldInterrupts, Interrupted, watch_interrupts
from hpcnn.training.batches import as_batch, evaluate_split, forward_rows
from hpcnn.training.engine import Result, Training
from hpcnn.training.setup import (
    Parts,
    build_stages,
    check_model,
    command_layers,
    lock_checkpoint_dir,
    model_shape,
    open_data,
    resume_from,
)


def fit(
    cfg: Config, comm: Comm, log=None, run: RunDir | None = None, terminal: bool = False, parts=None
) -> Result:
    """Train ``cfg``'s model on ``cfg``'s data over the ranks of ``comm`` (or ``parts``' layers,
    data, loss and optimizer where given: ``hpcnn.training.setup.Parts``).

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
        return _fit(cfg, comm, log, run, terminal, parts)


def _fit(cfg: Config, comm: Comm, log, run: RunDir | None, terminal: bool, parts) -> Result:
    speak, first = log, comm  # log: rank 0's; after a recovery the survivors' rank 0 speaks
    log = log if (log is not None and comm.is_root) else None
    run = run if comm.is_root else None
    if cfg.elastic:
        elastic.check(cfg, comm)
    run_path = comm.bcast(str(run.path) if run is not None else None) if cfg.elastic else None
    inspector = Inspector(comm, cfg.stall_timeout)
    training, lock, holder, restore, fault = None, None, None, None, False
    abandoned = []  # runs that ranks died under: MPI may still hold their buffers
    try:
        lock = lock_checkpoint_dir(cfg, comm, log)  # one run per checkpoint directory
        while True:
            try:
                run_cfg = cfg
                if restore is not None and restore.held is None:  # the state died: a checkpoint
                    run_cfg = dataclasses.replace(cfg, resume="auto" if cfg.checkpoint_dir else "")
                training = None
                training = Training(run_cfg, comm, log, inspector, run, terminal, parts, restore, fault)
                holder, fault = training, training.probe.faults
                if restore is not None:
                    _report_recovery(training, restore.report, abandoned)
                if restore is not None and restore.below:
                    result = training.stop_below(f"rank failure ({restore.below})")
                else:
                    result = training.run()
                training.close()
                break
            except BaseException as exc:
                failed = cfg.elastic and process_failure(exc)
                if training is not None:  # (a rank failure revoked its communicators: not freed)
                    training.close(freeing=not failed)
                if not failed:
                    raise
                noticed = time.time()
                phase = OPS[inspector.op]
                inspector.abandon()
                if training is not None:
                    abandoned.append(training)
                comm, restore = _recover(comm, holder, cfg, noticed, phase, fault)
                first.speak_as(comm)
                if comm is None:  # this rank left the training: the survivors go on without it
                    return Result(None, None, [], None, steps=holder.step if holder else 0, left=True)
                comm.debug = first.debug
                log = speak if comm.is_root else None
                if comm.is_root and run is None and run_path is not None:
                    run = RunDir(run_path)  # rank 0 died: its successor keeps the run directory
                lock = _relock(cfg, comm, log, lock)
                inspector = Inspector(comm, cfg.stall_timeout)
        timeline = training.probe.timeline
        if timeline is not None:
            timeline.write(cfg.timeline)
            training.log(f"timeline: {cfg.timeline} ({len(timeline.spans)} spans on rank 0)")
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
    training.probe.inspector = None  # it has stopped: the stage's later evaluations run unwatched
    if result.stopped == INTERRUPT.name:
        saved = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint"
        if result.checkpoint:
            saved += ": continue with --resume auto"
        elif not cfg.checkpoint_dir:
            saved += " (no checkpoint directory)"
        raise Interrupted(f"interrupted (Ctrl-C) after step {result.steps}; {saved}", result)
    return result


def _recover(comm: Comm, holder, cfg: Config, noticed: float, phase: str, fault):
    """``elastic.recover`` until it completes: a rank that dies during a recovery is one more
    failure, recovered from by shrinking ``comm`` again (its survivors now)."""
    while True:
        try:
            return elastic.recover(comm, holder, cfg, noticed, phase, fault)
        except Exception as exc:
            if not process_failure(exc):
                raise


def _relock(cfg: Config, comm: Comm, log, lock):
    """After a recovery: the survivors' rank 0 holds the checkpoint directory's lock (taking it
    over from a dead rank 0) and removes what an interrupted checkpoint write left there."""
    if not cfg.checkpoint_dir:
        return lock
    if comm.bcast(lock is None if comm.is_root else None):
        return lock_checkpoint_dir(cfg, comm, log)
    if comm.is_root:
        removed = remove_temporaries(cfg.checkpoint_dir)
        if removed and log is not None:
            log(f"elastic: removed what an interrupted checkpoint write left: {', '.join(removed)}")
    return lock


def _report_recovery(training: Training, report: dict, abandoned: list) -> None:
    """Say what a recovery did on rank 0, in the run directory and on the timeline."""
    lost = ", ".join(map(str, report["lost"]))
    if report["source"] != "memory":  # known once the rebuilt run has read its checkpoint
        report.update(step=training.step, redone=report["noticed_step"] - training.step)
    if report["source"] == "memory":
        went = f"went on from step {report['step']} held in memory ({report['redone']} step(s) redone)"
    elif report["source"] == "checkpoint":
        went = (
            f"{report['why']} died with its ranks: went on from the checkpoint of step {training.step} "
            f"({report['redone']} step(s) redone)"
        )
    else:
        went = f"{report['why']} died with its ranks, and no checkpoint: started over"
        went += f" ({report['redone']} step(s) redone)"
    training.progress.close()
    training.speak(
        f"elastic: lost world rank(s) {lost} (noticed after step {report['noticed_step']}, in "
        f"{report['phase']}); {went}; {report['kept']} of {report['ranks_before']} ranks now, "
        f"{report['layout']} (replicas x stages); recovery took {report['seconds']:.2f} s"
    )
    if training.run_dir is not None:
        training.run_dir.record("recovery", report)
    timeline = training.probe.timeline
    if timeline is not None:
        earlier = next((t.probe.timeline for t in reversed(abandoned) if t.probe.timeline), None)
        if earlier is not None:  # this rank's spans before the failure, on the run's first clock origin
            shift, timeline.t0 = timeline.t0 - earlier.t0, earlier.t0
            since = [(n, k, a + shift, b + shift, x) for n, k, a, b, x in timeline.spans]
            timeline.spans[:] = earlier.spans + since
        now = training.comm.wtime()
        timeline.span("recovery", now - report["seconds"], now, lost=report["lost"])


@dataclasses.dataclass
class _Stage:
    """This rank's part of the model as it stands now, and what saving it needs."""

    layers: list
    in_shape: tuple
    bounds: list
    grid: object
    pipe: object
    optimizer: object
    position: Position | None = None
    owned: bool = False  # built by the trainer (not a fit's): its communicators are the trainer's to free


class Trainer:
    """Train a model on data over the ranks of ``comm``.

    Parameters
    ----------
    model : a ``Sequential``, a list of layers (``Layer`` objects or spec dicts, as checkpoints
        store them), a built-in model's name or a model file (``"lenet"``, ``"cnn-digits"``,
        ``"net.toml"``: ``hpcnn.models``), or ``None``: the ``model`` field, by default the
        command's MLP of ``hidden`` widths (``activation``, ``output_activation``) from the data's
        features to its outputs.
    data : ``hpcnn.arrays(...)`` (in-memory arrays), a built-in dataset's name (``"digits"``,
        ``"xor"``, ``"synthetic"``), an HDF5 file's path, or ``None``: the ``data`` field.
    loss : a name (``"cross_entropy"``, ``"mse"``) or a loss object (``forward``/``backward`` as in
        ``hpcnn.core.losses``).
    optimizer : a name (``"sgd"``, ``"adam"``, ``"adamw"``: its settings from the fields) or an
        unbound optimizer object (``SGD(momentum=0.9)``); the trainer binds it to each stage's
        parameters. A built-in one's settings become the config's (what checkpoints record).
    comm : an ``hpcnn.Comm`` (default: a duplicate of the world communicator).
    on_step, on_epoch : callbacks, run on every rank with the same reduced record: ``on_step`` at
        each ``log_every`` step record, ``on_epoch`` after each epoch's summary (the row
        ``Result.history`` gets). True returned by rank 0's call stops training after that step or
        epoch on every rank, as ``max_steps`` would: a final checkpoint and evaluation follow.
    log : rank 0's progress lines (``None``: silent).
    **fields : any ``hpcnn.Config`` field (``lr=0.5``, ``epochs=20``, ``pipeline_stages=2``, ...);
        an unknown name or a wrong value is a ``UserError`` naming it.
    """

    def __init__(
        self, model=None, data=None, *, loss=None, optimizer=None, comm=None, on_step=None, on_epoch=None,
        log=print, **fields,
    ):  # fmt: skip
        settings = dict(fields)
        if isinstance(model, str):  # a built-in model's name or a model file: built once the data is known
            settings["model"], model = model, None
        self._data = None
        if isinstance(data, Dataset):
            self._data = data
            settings["data"] = data.name
        elif data is not None:
            settings["data"] = str(data)
        self._loss = None
        if isinstance(loss, str):
            settings["loss"] = loss
        elif loss is not None:
            self._loss = loss
            known = [name for name, cls in LOSSES.items() if type(loss) is cls]
            if known:  # what checkpoints and the evaluation command read
                settings["loss"] = known[0]
        self._optimizer = None
        if isinstance(optimizer, str):
            settings["optimizer"] = optimizer
        elif optimizer is not None:
            self._optimizer = optimizer
            chosen = _optimizer_fields(optimizer)
            for key, value in chosen.items():
                if key in fields and fields[key] != value:
                    raise UserError(f"{key} = {fields[key]!r} contradicts the optimizer {optimizer!r}")
                settings[key] = value
        self.config = from_dict(settings, "Trainer").validate()
        if self.config.resume == "auto" and not self.config.checkpoint_dir:  # a trainer makes no run_dir
            raise UserError("resume = 'auto' looks in checkpoint_dir: name one (checkpoint_dir=...)")
        self.layers = _layer_list(model)
        self.comm = comm if comm is not None else Comm.world()
        self.on_step, self.on_epoch, self.log = on_step, on_epoch, log
        self.result = None  # the last fit's Result
        self._run, self._terminal, self._stage = None, False, None

    @classmethod
    def from_config(
        cls, cfg: Config, comm=None, *, model=None, data=None, loss=None, optimizer=None, on_step=None,
        on_epoch=None, log=print, run: RunDir | None = None, terminal: bool = False,
    ) -> "Trainer":  # fmt: skip
        """A trainer of ``cfg``'s settings (``python -m hpcnn.train``'s: the model from ``hidden``,
        the data from ``data``). ``run``: rank 0's run directory; ``terminal``: ``log`` prints to a
        terminal (a progress bar may replace the step lines)."""
        fields = dataclasses.asdict(cfg)
        # model, data, loss and optimizer given as objects replace the config's
        model = fields.pop("model") if model is None else model
        data = fields.pop("data") if data is None else data
        loss = fields.pop("loss") if loss is None else loss
        if optimizer is None:
            optimizer = fields.pop("optimizer")
        for key in ("model", "data", "loss", *_optimizer_fields(optimizer)):
            fields.pop(key, None)
        trainer = cls(
            model, data, loss=loss, optimizer=optimizer, comm=comm, on_step=on_step, on_epoch=on_epoch,
            log=log, **fields,
        )  # fmt: skip
        trainer._run, trainer._terminal = run, terminal
        return trainer

    @property
    def model(self) -> Sequential:
        """This rank's pipeline stage of the model (the whole model without stages): its ``params``."""
        return self._current().pipe.model

    @property
    def optimizer(self):
        """This rank's stage's optimizer, bound to ``model.params`` (its ``state``, ``t``)."""
        return self._current().optimizer

    def fit(self) -> Result:
        """Train (from the initial parameters ``seed`` draws, or from the checkpoint ``resume`` or
        ``load`` names) and return the ``Result``; ``Interrupted`` on every rank after Ctrl-C."""
        cfg = self.config
        blas_threads(self.comm.local_size, cfg.threads)  # as the command does
        parts = Parts(self.layers, self._data, self._loss, self._optimizer, self.on_step, self.on_epoch)
        self._release()
        result = fit(cfg, self.comm, self.log, self._run, self._terminal, parts)
        self.result = result
        if result.left:  # --elastic: ranks died and this one left the training
            return result
        self.layers, self.comm = result.layers, result.grid.world  # (after a recovery: the survivors)
        self._stage = _Stage(
            result.layers, result.in_shape, result.bounds, result.grid, result.pipeline,
            result.optimizer, result.position,
        )  # fmt: skip
        return result

    def evaluate(self, data=None) -> dict:
        """``{"loss", "accuracy", "rows"}`` of the current parameters on ``data``'s held-out rows
        (its training rows if it has none); ``data`` as in the constructor, default the trainer's.
        Accuracy is ``None`` for regression targets."""
        cfg, stage = self.config, self._current()
        ds = self._open(data)
        try:
            with self.comm.agreed(cfg.debug):
                check_model(stage.layers, ds)
            split = ds.test if ds.test is not None else ds.train
            loss_fn = LOSSES[cfg.loss]() if self._loss is None else self._loss
            return evaluate_split(stage.pipe, loss_fn, split, stage.grid, cfg, ds.num_classes is not None)
        finally:
            ds.close()

    def predict(self, x, image_layout: str | None = None) -> np.ndarray:
        """The model's outputs for rows ``x``, the same array on every rank: each data-parallel
        replica runs a block of the rows through its pipeline; one sum over the ranks (of each
        value and zeros: exact) gives every rank all of them.

        ``x``: (rows, features), or images as ``hpcnn.arrays`` takes them: (rows, C, H, W) or
        (rows, H, W, C) as ``image_layout`` says (default: the ``image_layout`` field), or (rows, H, W).
        """
        cfg, stage = self.config, self._current()
        layout = cfg.image_layout if image_layout is None else image_layout
        x = np.asarray(x)
        with self.comm.agreed(cfg.debug):
            if layout not in ("nchw", "nhwc"):
                raise UserError(f"predict: image_layout = {layout!r}: expected nchw or nhwc")
            if x.ndim not in (2, 3, 4):
                raise UserError(
                    f"predict takes rows (rows, features) or images (rows, C, H, W), (rows, H, W, C) or "
                    f"(rows, H, W); x has shape {x.shape}"
                )
            shape = image_shape(x.shape[1:], layout) or x.shape[1:]
            model_in = stage.in_shape
            # flat rows and images of as many values are the same rows (hpcnn's are flat, channels last)
            if shape != model_in and not (
                1 in (len(shape), len(model_in)) and math.prod(shape) == math.prod(model_in)
            ):
                raise UserError(f"predict: x has rows of shape {shape}; the model takes rows of {model_in}")
            width = math.prod(model_shape(stage.layers, model_in, "these rows"))
        x = as_rows(x, layout) if x.ndim > 2 else x  # (rows, features)
        pipe, grid, dtype = stage.pipe, stage.grid, dtype_of(cfg.dtype)
        unit = pipe.shard_rows or 1  # deterministic mode: whole shards, as in training
        start, count = split_units(len(x), unit, grid.replicas, grid.replica)
        kept = forward_rows(
            pipe, lambda i, n: as_batch(x[i : i + n], None, dtype, False)[0], start, count, cfg
        )
        out = np.zeros((len(x), width), dtype)  # (rows, outputs)
        if pipe.is_last and kept:
            out[start : start + count] = to_host(xp.concatenate(kept))
        self.comm.Allreduce(IN_PLACE, out, op=SUM)
        return out

    def save(self, directory) -> str:
        """Write a checkpoint of the current state (parameters, optimizer state, position) into
        ``directory`` (created if missing); returns its path. Collective: every rank calls it."""
        cfg, stage = self.config, self._current()
        position = stage.position or Position()
        args = (cfg, stage.layers, stage.in_shape, stage.bounds, stage.grid, stage.pipe.model)
        return str(save(directory, *args, stage.optimizer, position, cfg.checkpoint_io))

    def load(self, path) -> None:
        """Restore the checkpoint ``path`` (of this model and optimizer: the layouts may differ) into
        the current state; a later ``fit`` continues from it, as ``resume`` would."""
        cfg, stage = self.config, self._current()
        resumed = dataclasses.replace(cfg, resume=str(path))
        say = self.log if (self.log is not None and self.comm.is_root) else (lambda text: None)
        args = (stage.grid, stage.layers, stage.in_shape, stage.bounds, stage.pipe.model, stage.optimizer)
        stage.position, _ = resume_from(resumed, *args, say)
        self.config = resumed

    def _current(self) -> _Stage:
        """This rank's stage as it stands: the last fit's, else one built from the initial values."""
        if self._stage is None:
            cfg = self.config
            ds = self._open(None)
            try:
                with self.comm.agreed(cfg.debug):
                    layers = command_layers(cfg, ds) if self.layers is None else self.layers
                    check_model(layers, ds)
                bounds, grid, pipe = build_stages(cfg, self.comm, layers, ds.in_shape)
            finally:
                ds.close()
            opt = make_optimizer(cfg) if self._optimizer is None else copy.copy(self._optimizer)
            self.layers = layers
            opt = opt.bind(pipe.model.params)
            self._stage = _Stage(layers, ds.in_shape, bounds, grid, pipe, opt, owned=True)
        return self._stage

    def _open(self, data) -> Dataset:
        """``data`` (or the trainer's own) opened on every rank."""
        if data is None:
            return open_data(self.config, self.comm, self._data)
        if isinstance(data, Dataset):
            return open_data(self.config, self.comm, data)
        return open_data(dataclasses.replace(self.config, data=str(data)), self.comm)

    def _release(self) -> None:
        """Let go of the current stage (a fit builds its own), freeing its communicators if the
        trainer built it (a fit's belong to its ``Result``)."""
        if self._stage is not None and self._stage.owned:
            self._stage.grid.free()
        self._stage = None


def _optimizer_fields(optimizer) -> dict:
    """The ``Config`` fields a built-in optimizer object stands for (none for one of the user's)."""
    try:
        return dict(optimizer.config_fields())
    except (AttributeError, NotImplementedError):
        return {}


def _layer_list(model) -> list | None:
    """``model`` as a list of layer objects (``None``: the command's MLP, built once the data's
    widths are known)."""
    if model is None:
        return None
    items = model.layers if isinstance(model, Sequential) else [model] if isinstance(model, Layer) else model
    try:
        items = list(items)
    except TypeError:
        raise UserError(
            f"model {model!r}: expected a Sequential, a list of layers or of spec dicts"
        ) from None
    layers = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            layers.append(layer_from_spec(item))
        elif isinstance(item, Layer):
            layers.append(item)
        else:
            raise UserError(f"model item {i} is {item!r}: expected a Layer or a spec dict")
    owners = [layer for layer in layers if layer.param_specs()]
    if len({id(layer) for layer in owners}) < len(owners):  # one object bound to two places in the buffer
        raise UserError("a layer with parameters appears twice in the model; make one object per place")
    return layers
