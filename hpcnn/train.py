"""The training loop and ``python -m hpcnn.train``.

One step: read my rows of the global batch -> forward -> loss -> backward (into the flat gradient
buffer) -> one Allreduce -> clip -> optimizer step on the flat parameter buffer. ``fit`` is that
loop over epochs, usable from Python with any ``Comm``; ``main`` is the command-line face that turns
errors into one message from rank 0 and an exit code on every rank.
"""

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from hpcnn import __version__
from hpcnn.backend import dtype_of, xp
from hpcnn.comm import Comm, blas_threads
from hpcnn.config import Config, resolve
from hpcnn.data import EpochSampler, open_dataset, set_num_classes, split_counts
from hpcnn.data_parallel import DataParallel
from hpcnn.errors import EXIT_OK, JobError, UserError
from hpcnn.losses import LOSSES, count_correct
from hpcnn.model import build_mlp
from hpcnn.optim import Schedule, clip_grad_norm, make_optimizer


@dataclass
class Result:
    """What ``fit`` returns: the trained model and the per-epoch metrics rank 0 printed."""

    model: object
    steps: int
    history: list = field(default_factory=list)  # one dict per epoch
    final: dict = field(default_factory=dict)  # held-out (or training-row) loss and accuracy


def _as_batch(x, y, dtype, classify: bool):
    x = xp.asarray(x, dtype=dtype)  # (rows, features)
    if classify:
        return x, xp.asarray(y)
    y = xp.asarray(y, dtype=dtype)
    return x, (y[:, None] if y.ndim == 1 else y)  # (rows, outputs), also for 0 rows


def evaluate(model, loss_fn, split, comm, cfg, classify: bool) -> dict:
    """Loss and accuracy over ``split``; each rank does a contiguous block, each row counted once."""
    dtype = dtype_of(cfg.dtype)
    start, count = split_counts(len(split), comm.size, comm.rank)
    ids = split.ids[start : start + count]
    sums = np.zeros(3)  # loss sum, correct, rows
    for i in range(0, count, cfg.eval_batch_size):
        x, y = _as_batch(*split.source.read(ids[i : i + cfg.eval_batch_size]), dtype, classify)
        out = model.forward(x, train=False)
        sums += (loss_fn.forward(out, y), count_correct(out, y) if classify else 0, len(x))
    comm.allreduce_sum_(sums)
    rows = max(sums[2], 1)
    return {"loss": sums[0] / rows, "accuracy": sums[1] / rows if classify else None, "rows": int(sums[2])}


def _prepare(cfg: Config, comm: Comm):
    """Open the data and build model, optimizer and sampler; collective errors are agreed on."""
    with comm.agreed(cfg.debug):
        if cfg.batch_size < comm.size:
            raise UserError(
                f"batch_size = {cfg.batch_size} is smaller than the {comm.size} ranks: every rank "
                f"needs at least one row of each global batch (use batch_size >= {comm.size})"
            )
        ds, label_range = open_dataset(cfg, comm.rank, comm.size)
    if label_range is not None:  # class labels from a file (the same on every rank): check them all
        lo, hi = comm.min(label_range[0]), comm.max(label_range[1])
        with comm.agreed(cfg.debug):
            if lo < 0:
                raise UserError(f"{ds.name}: labels must be class indices >= 0, found {lo}")
            if ds.num_classes is None:  # not recorded in the file: the largest label decides
                set_num_classes(ds, hi + 1)
            elif hi >= ds.num_classes:
                raise UserError(f"{ds.name}: label {hi} is out of range for num_classes = {ds.num_classes}")
    with comm.agreed(cfg.debug):
        sizes = [ds.features, *cfg.hidden, ds.outputs]
        model = build_mlp(sizes, cfg.activation, dtype_of(cfg.dtype), cfg.output_activation)
        model.params.initialize(np.random.default_rng(cfg.seed))
        sampler = EpochSampler(ds.train.ids, cfg.batch_size, comm.rank, comm.size, cfg.seed, cfg.drop_last)
        if len(sampler) == 0:
            raise UserError(
                f"drop_last with batch_size {cfg.batch_size} > {len(ds.train)} training rows leaves no step"
            )
    return ds, model, sampler


def fit(cfg: Config, comm: Comm, log=None) -> Result:
    """Train ``cfg``'s model on ``cfg``'s data over the ranks of ``comm``.

    ``log`` receives rank 0's progress lines (``None``: silent). Returns the model (identical on
    every rank), the per-epoch metrics and the final evaluation.
    """
    log = log if (log is not None and comm.is_root) else (lambda *a: None)
    ds, model, sampler = _prepare(cfg, comm)
    dtype, classify = dtype_of(cfg.dtype), ds.num_classes is not None
    loss_fn = LOSSES[cfg.loss]()
    dp = DataParallel(comm, model.params)
    dp.broadcast_parameters()
    opt = make_optimizer(cfg, model.params)
    steps = len(sampler) * cfg.epochs
    steps = min(cfg.max_steps, steps) if cfg.max_steps else steps
    schedule = Schedule(
        cfg.lr_schedule, cfg.lr, steps, cfg.warmup_steps, cfg.step_size, cfg.gamma, cfg.min_lr
    )
    kind = f"{ds.num_classes} classes" if classify else f"{ds.outputs} regression outputs"
    held_out = len(ds.test) if ds.test else 0
    log(
        f"data: {ds.name}: {len(ds.train)} training rows, {held_out} held-out, {ds.features} features, {kind}"
    )
    log(f"model: {model.describe()}, {cfg.dtype}")
    per_rank = min(cfg.batch_size, len(ds.train)) / comm.size
    stop = f", stopping after {steps} steps" if cfg.max_steps else ""
    log(
        f"training: {cfg.epochs} epochs x {len(sampler)} steps of {cfg.batch_size} rows "
        f"(~{per_rank:.3g} per rank){stop}, {cfg.optimizer} lr {cfg.lr:g}, {cfg.lr_schedule}"
    )
    result = Result(model, 0)
    grad = model.params.grad
    step = 0
    for epoch in range(cfg.epochs):
        t0 = comm.wtime()
        sums = np.zeros(3)  # loss sum, correct, rows on this rank
        for ids, global_rows in sampler.epoch(epoch):
            x, y = _as_batch(*ds.train.source.read(ids), dtype, classify)
            out = model.forward(x)
            loss_sum = loss_fn.forward(out, y)
            sums += (loss_sum, count_correct(out, y) if classify else 0, len(ids))
            model.backward(loss_fn.backward(1.0 / global_rows))
            dp.reduce_gradients()
            if cfg.clip_norm:
                clip_grad_norm(grad, cfg.clip_norm)
            opt.step(schedule(step))
            step += 1
            if step == cfg.max_steps:
                break
        comm.allreduce_sum_(sums)
        seconds = comm.wtime() - t0
        row = {
            "epoch": epoch + 1,
            "step": step,
            "loss": sums[0] / sums[2],
            "accuracy": sums[1] / sums[2] if classify else None,
            "lr": schedule(step - 1),
            "seconds": seconds,
            "samples_per_s": sums[2] / seconds,
        }
        last = epoch + 1 == cfg.epochs or step == cfg.max_steps
        if ds.test is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            row["test"] = evaluate(model, loss_fn, ds.test, comm, cfg, classify)
        result.history.append(row)
        log(_epoch_line(row, cfg.epochs))
        if step == cfg.max_steps:
            break
    result.steps = step
    split = ds.test if ds.test is not None else ds.train
    result.final = result.history[-1].get("test") or evaluate(model, loss_fn, split, comm, cfg, classify)
    result.final["split"] = "held-out" if ds.test is not None else "training"
    ds.close()
    return result


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


def _announce_layout(cfg: Config, comm: Comm) -> None:
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    comm = Comm.world()
    debug = "--debug" in argv  # until the config (which may set it too) is read
    try:
        with comm.agreed(debug):
            cfg = resolve(argv, is_root=comm.is_root)
        debug = cfg.debug
        _announce_layout(cfg, comm)
        t0 = time.perf_counter()
        result = fit(cfg, comm, log=comm.print0)
        final = result.final
        text = f"final {final['split']} loss {final['loss']:.4f}"
        if final["accuracy"] is not None:
            text += f", accuracy {100 * final['accuracy']:.2f}% ({final['rows']} rows)"
        comm.print0(f"{text}; {result.steps} steps in {time.perf_counter() - t0:.1f} s")
    except JobError as exc:
        if comm.is_root:
            print(f"hpcnn: error: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001  (a rank failing alone must take the job down, not hang it)
        comm.abort(exc, debug)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
