"""Setting a run up: data, this rank's pipeline stage, resume, the checkpoint directory.

``open_data`` and ``build_stages`` are what the training loop, the evaluation command and the
``Trainer`` share; ``prepare`` checks the layout and builds both with the epoch sampler.
``resume_from`` loads a checkpoint into this rank's stage; the checkpoint directory is locked for one
run (``lock_checkpoint_dir``) and checked before any training (``check_checkpoint_dir``). Every
error is agreed on: raised on every rank with one message.
"""

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

from hpcnn.config import Config, config_changes
from hpcnn.core.backend import dtype_of
from hpcnn.core.model import Sequential, as_shape, mlp_layers
from hpcnn.errors import EXIT_IO, JobError, UserError
from hpcnn.io.checkpoints import (
    Position,
    architecture,
    architecture_difference,
    checkpoints,
    h5py_parallel,
    inspect,
    read_stage,
    remove_temporaries,
    step_of,
    too_little_space,
    verify_bounded,
)
from hpcnn.io.datasets import Dataset, EpochSampler, PoissonSampler, open_dataset, set_num_classes
from hpcnn.io.dirlock import DirectoryLock
from hpcnn.io.runlog import RunDir
from hpcnn.parallel.comm import Comm, Grid
from hpcnn.parallel.deterministic import shard_rows
from hpcnn.parallel.pipeline import Pipeline, balanced_partition, explicit_partition
from hpcnn.training import privacy


@dataclasses.dataclass
class Parts:
    """What a run trains beyond its settings; ``None`` takes it from the ``Config`` (the command).

    ``layers``: the whole model's layers, in order (every rank holds them all and builds its
    pipeline stage from them); ``None``: an MLP of ``cfg.hidden`` sized to the data. ``data``: an
    in-memory ``Dataset`` (``hpcnn.arrays``); ``None``: ``cfg.data`` opened. ``loss``: a loss object;
    ``None``: ``cfg.loss``. ``optimizer``: an unbound optimizer, bound to each stage's parameters;
    ``None``: ``cfg.optimizer``. ``on_step(record)`` / ``on_epoch(row)``: callbacks run on every
    rank; rank 0's True stops training after that step or epoch.
    """

    layers: list | None = None
    data: Dataset | None = None
    loss: object = None
    optimizer: object = None
    on_step: object = None
    on_epoch: object = None


def open_data(cfg: Config, comm: Comm, data: Dataset | None = None) -> Dataset:
    """Open ``cfg``'s dataset (or take the in-memory ``data``) on every rank and check its labels
    together; errors are agreed on."""
    if data is not None:
        with comm.agreed(cfg.debug):
            if data.num_classes is None and cfg.loss != "mse":
                raise UserError(
                    f"{data.name}: y holds regression targets; class labels for {cfg.loss} are 1-D "
                    'integers (use loss="mse" for regression targets)'
                )
        return data
    with comm.agreed(cfg.debug):
        ds, label_range = open_dataset(cfg, comm.rank, comm.size)
    if label_range is not None:  # class labels from a file (the same on every rank): check them all
        ranges = comm.allgather((*label_range, ds.unreadable))  # (min, max, unreadable) per rank
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


def build_stages(cfg: Config, comm: Comm, layers, in_shape, probe=None):
    """Cut ``layers`` into ``cfg.pipeline_stages`` stages over the ranks of ``comm`` and build this
    rank's stage, initialised as the whole model would be. Returns ``(bounds, grid, pipeline)``;
    ``probe``: the training's (``hpcnn.parallel.probe``), which the pipeline tells its phases."""
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
            bounds = balanced_partition(Sequential.layer_flops(layers, in_shape), stages)
    grid = Grid(comm, stages)
    with comm.agreed(cfg.debug):
        first, stop = bounds[grid.stage], bounds[grid.stage + 1]
        try:
            stage_in = Sequential.shape_after(layers[:first], in_shape)
            model = Sequential(layers[first:stop], dtype_of(cfg.dtype), stage_in)
        except MemoryError as exc:  # --hidden 100000000000, or a dataset with 10**9 features
            raise UserError(f"the model does not fit in memory ({exc}); use narrower layers") from None
        # Draw every earlier stage's initial values too, so each stage starts as the whole model would.
        skip = [spec for layer in layers[:first] for spec in layer.param_specs()]
        model.params.initialize(np.random.default_rng(cfg.seed), skip=skip)
        model.context.seed, model.context.first_layer = cfg.seed, first  # what training forwards see
        pipe = Pipeline(
            model, grid.pipe, grid.stage, stages, math.prod(stage_in), cfg.schedule, comm.wtime, probe
        )
    pipe.handshake()
    return bounds, grid, pipe


def prepare(cfg: Config, comm: Comm, parts: Parts | None = None, probe=None):
    """Check the layout, open the data, build this rank's stage; setup errors are agreed on."""
    parts = parts or Parts()
    ds = open_data(cfg, comm, parts.data)
    with comm.agreed(cfg.debug):
        replicas = comm.size // cfg.pipeline_stages
        if cfg.batch_size < replicas:
            raise UserError(
                f"batch_size = {cfg.batch_size} is smaller than the {replicas} data-parallel replicas: "
                f"every replica needs at least one row of each global batch (use batch_size >= {replicas})"
            )
        layers = command_layers(cfg, ds) if parts.layers is None else list(parts.layers)
        check_model(layers, ds)
    bounds, grid, pipe = build_stages(cfg, comm, layers, ds.in_shape, probe)
    with comm.agreed(cfg.debug):
        privacy.check(cfg, layers)
        rows = shard_rows(cfg) if cfg.deterministic else 0
        if cfg.dp_sgd and cfg.sampling == "poisson":
            rate = privacy.sampling_rate(cfg, len(ds.train))
            sampler = PoissonSampler(ds.train.ids, rate, grid.replica, replicas, cfg.seed)
        else:
            sampler = EpochSampler(
                ds.train.ids, cfg.batch_size, grid.replica, replicas, cfg.seed, cfg.drop_last, rows
            )
        if len(sampler) == 0:
            raise UserError(
                f"drop_last with batch_size {cfg.batch_size} > {len(ds.train)} training rows leaves no step"
            )
    return ds, layers, bounds, grid, pipe, sampler


def command_layers(cfg: Config, ds: Dataset) -> list:
    """The command's model (``cfg.model``): by default an MLP of ``cfg.hidden`` from the data's
    features to its outputs; else a built-in network or a model file's (``hpcnn.models``)."""
    if cfg.model == "mlp":
        return mlp_layers([ds.features, *cfg.hidden, ds.outputs], cfg.activation, cfg.output_activation)
    from hpcnn.models import model_layers  # imports the convolution layers: only for such models

    return model_layers(cfg.model, ds.in_shape, ds.outputs, ds.name)


def check_model(layers, ds: Dataset) -> None:
    """``UserError`` unless ``layers`` take ``ds``'s features and give one value per output."""
    if not layers:
        raise UserError("the model has no layers")
    width = math.prod(model_shape(layers, ds.in_shape, ds.name))
    if width != ds.outputs:
        kind = (
            f"{ds.num_classes} classes" if ds.num_classes is not None else f"{ds.outputs} regression outputs"
        )
        raise UserError(f"the model gives {width} values per row; {ds.name} has {kind}")


def total_steps(cfg: Config, sampler) -> int:
    steps = len(sampler) * cfg.epochs
    return min(cfg.max_steps, steps) if cfg.max_steps else steps


def model_shape(layers, in_shape, where: str) -> tuple:
    """The shape of ``layers``' output rows for input rows of shape ``in_shape`` from ``where``;
    ``UserError`` naming the first layer that cannot take what reaches it."""
    shape = as_shape(in_shape)
    for i, layer in enumerate(layers):
        try:
            shape = as_shape(layer.out_shape(shape))
        except (ValueError, AssertionError) as exc:
            raise UserError(
                f"layer {i} ({layer!r}) cannot take the rows that reach it: {exc} ({where} has rows "
                f"of shape {as_shape(in_shape)})"
            ) from None
    return shape


def resume_from(cfg, grid, layers, in_shape, bounds, model, opt, log):
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
        diff = architecture_difference(info.architecture, architecture(layers, in_shape, cfg.dtype))
        if diff:
            raise UserError(f"cannot resume from {chosen}: {diff}")
        if info.optimizer != cfg.optimizer or info.state_names != sorted(opt.state):
            raise UserError(
                f"cannot resume from {chosen}: it holds {info.optimizer} state {info.state_names}, "
                f"this run's {cfg.optimizer} keeps {sorted(opt.state)} (match --optimizer and --momentum)"
            )
        stage = grid.stage
        lo = getattr(opt.params, "lo", 0)  # an optimizer of a part (--zero): its first element
        read_stage(chosen, layers, bounds[stage], bounds[stage + 1], model.params, opt.state, lo)
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


def lock_checkpoint_dir(cfg, comm, log) -> DirectoryLock | None:
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


def check_checkpoint_dir(cfg, comm, start: Position | None, needed: int) -> None:
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


def check_output_file(path, what: str) -> None:
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


def open_run_dir(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None]:
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
