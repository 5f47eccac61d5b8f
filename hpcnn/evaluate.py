"""``python -m hpcnn.evaluate``: score a checkpoint, or predict new inputs, at any rank count.

The model is rebuilt from the architecture stored in the checkpoint and cut into whatever
pipeline layout this run asks for; each rank reads only its stage's tensors. Data settings default
to those the checkpoint was trained with, so ``--checkpoint FILE`` alone scores the held-out rows
(or, without any, the training rows) of the training data.

``--predict OUT.h5`` instead runs the ``x`` rows of ``--data`` (no labels needed) through the
model and writes, in row order, ``outputs`` (the model's outputs: logits for cross-entropy) and,
for classifiers, ``probabilities`` (softmax) and ``predictions`` (the class index). Rank 0 writes
the file under a temporary name and renames it when complete.
"""

import argparse
import importlib
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

import hpcnn.models  # noqa: F401  (registers the convolution, normalisation and dropout layers checkpoints name)
from hpcnn.command import run_command
from hpcnn.config import Config, Parser, from_dict, int_list, parse_toml
from hpcnn.core.backend import dtype_of, to_host, xp
from hpcnn.core.layers import layer_from_spec
from hpcnn.core.losses import LOSSES
from hpcnn.core.model import Sequential
from hpcnn.errors import EXIT_OK, UserError
from hpcnn.io.checkpoints import in_shape_of, inspect, read_stage, verify_bounded
from hpcnn.io.datasets import (
    BUILTIN,
    UnreadableRows,
    as_rows,
    describe_nonfinite,
    first_nonfinite,
    image_shape,
    input_dataset,
    open_h5,
    read_rows,
    split_counts,
)
from hpcnn.parallel.comm import Comm, blas_threads
from hpcnn.parallel.deterministic import shard_rows, shard_stage
from hpcnn.training.batches import as_batch, bad_row, evaluate_split, forward_rows, problem_text
from hpcnn.training.report import scores_text
from hpcnn.training.setup import build_stages, open_data

# Flags that may override the checkpoint's own settings (data and parallel layout only: the
# model is the checkpoint's).
OVERRIDES = {
    "data": str,
    "x_key": str,
    "y_key": str,
    "test_x_key": str,
    "test_y_key": str,
    "test_fraction": float,
    "image_layout": str,
    "eval_batch_size": int,
    "pipeline_stages": int,
    "stage_layers": int_list,
    "micro_batches": int,
    "threads": int,
}


def build_parser(is_root: bool = True) -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m hpcnn.evaluate",
        is_root=is_root,
        description="Score a checkpoint on labelled rows, or write predictions for new inputs "
        "(run under mpirun/srun at any rank count and pipeline layout).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="an hpcnn checkpoint (.h5)")
    p.add_argument(
        "--split",
        choices=["held-out", "training"],
        help="rows to score (default: held-out if the data has any, else training)",
    )
    p.add_argument("--predict", metavar="OUT.h5", help="write predictions for the x rows of --data")
    for key, kind in OVERRIDES.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, help="(default: the checkpoint's)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import MODULE first: one that defines the user layers the checkpoint holds (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    return p


def import_modules(names) -> None:
    """Import the user's modules, whose ``Layer`` subclasses register themselves on definition."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--import {name}: {exc}") from None


def load(path, overrides: dict, comm: Comm):
    """The checkpoint's config (with ``overrides``), its layers, and this rank's stage loaded."""
    # Rank 0 checks the file first, in a child process: a damaged one can make HDF5 loop forever.
    comm.root_decides(lambda: verify_bounded(path), overrides.get("debug", False))
    with comm.agreed(overrides.get("debug", False)):
        info = inspect(path)
        saved = parse_toml(info.config)
        # The layout the checkpoint was written with says nothing about this run's ranks.
        layout = {f.name for f in fields(Config) if f.metadata["group"] == "parallel"} | {"threads"}
        cfg = from_dict({k: v for k, v in saved.items() if k not in layout}, str(path))
        for key, value in overrides.items():
            setattr(cfg, key, value)
        cfg.checkpoint_dir, cfg.resume = "", ""
        cfg.validate()
        layers = [layer_from_spec(spec) for spec in info.architecture["layers"]]
    bounds, grid, pipe = build_stages(cfg, comm, layers, in_shape_of(info.architecture))
    with comm.agreed(cfg.debug):
        read_stage(path, layers, bounds[grid.stage], bounds[grid.stage + 1], pipe.model.params, {})
    return cfg, info, layers, grid, pipe


def score(path, split_name, overrides: dict, comm: Comm) -> dict:
    cfg, info, layers, grid, pipe = load(path, overrides, comm)
    ds = open_data(cfg, comm)
    with comm.agreed(cfg.debug):
        _check_widths(ds.name, ds.in_shape, ds.outputs, info, layers)
        split = ds.train if split_name == "training" or ds.test is None else ds.test
        if split_name == "held-out" and ds.test is None:
            raise UserError(f"{ds.name} has no held-out rows (use --split training)")
    classify = ds.num_classes is not None
    # A deterministic run's checkpoint is scored as its training scored: the same bits at any layout.
    sharding = shard_stage(pipe.model, shard_rows(cfg)) if cfg.deterministic else None
    try:
        metrics = evaluate_split(pipe, LOSSES[cfg.loss](), split, grid, cfg, classify)
    finally:
        if sharding is not None:
            sharding.workers.close()
    metrics.update(
        split="held-out" if split is ds.test else "training", data=ds.name, step=info.position.step
    )
    ds.close()
    return metrics


def _check_widths(name, shape, outputs, info, layers) -> None:
    """The data's rows (of ``shape``) must be the checkpoint's model's: as many features, and the
    same images (flat rows of an image's size are taken as that image, in hpcnn's order)."""
    want_in, want_out = in_shape_of(info.architecture), _last_width(info, layers)
    features, want_features = math.prod(shape), math.prod(want_in)
    if features != want_features:
        raise UserError(f"{name} has {features} features; the checkpoint's model takes {want_features}")
    if len(shape) > 1 and len(want_in) > 1 and tuple(shape) != tuple(want_in):
        h, w, c = want_in
        raise UserError(
            f"{name} has images of shape {tuple(shape)} (H, W, C); the checkpoint's model takes {c}x{h}x{w} "
            "images (check --image-layout)"
        )
    if outputs is not None and outputs != want_out:
        raise UserError(f"{name} has {outputs} classes/outputs; the checkpoint's model gives {want_out}")


def predict(path, out_path, overrides: dict, comm: Comm) -> int:
    """Write predictions for the inputs of ``--data`` to ``out_path``; returns the rows written."""

    cfg, info, layers, grid, pipe = load(path, overrides, comm)
    with comm.agreed(cfg.debug):
        source = Path(cfg.data)
        if cfg.data in BUILTIN and not source.is_file():
            raise UserError(f"--predict reads inputs from an HDF5 file; --data {cfg.data!r} is not one")
        f = open_h5(source, "--data file")
        x = input_dataset(f, cfg.x_key)
        shape = image_shape(x.shape[1:], cfg.image_layout) or x.shape[1:]
        _check_widths(str(source), shape, None, info, layers)
    rows, features = x.shape[0], math.prod(shape)
    start, count = split_counts(rows, grid.replicas, grid.replica)
    dtype = dtype_of(cfg.dtype)
    width = _last_width(info, layers)
    problem = None

    def inputs_of(i, n):
        """Rows ``i .. i + n`` of the file; zeros, once a row is bad, until every rank knows (below)."""
        nonlocal problem
        try:
            block = read_rows(x, slice(i, i + n), i, i + n)  # (n, *row as stored)
            inputs = as_batch(as_rows(block, cfg.image_layout), None, dtype, False)[0]  # (n, features)
            bad = first_nonfinite(inputs)
            if bad is not None:  # named by its index in the file: the row as stored, cast
                seen = as_batch(block[bad : bad + 1], None, dtype, False)[0][0]
                headline, detail = describe_nonfinite(cfg.x_key, i + bad, block[bad], seen)
                problem = problem or f"{source}: row {i + bad} {headline}: {detail}"
        except UnreadableRows as exc:
            problem, inputs = problem or str(exc), xp.zeros((n, features), dtype)
        if problem is not None:
            inputs[...] = 0
        return inputs

    kept = forward_rows(pipe, inputs_of, start, count, cfg)
    f.close()
    problems = [p for p in grid.world.allgather(problem) if p is not None]
    world, last = grid.world, grid.stages - 1
    block = to_host(xp.concatenate(kept)) if kept else np.empty((0, width), dtype)
    if pipe.is_last and not world.is_root:
        world.Send(np.ascontiguousarray(block), dest=0, tag=grid.replica)
    if world.is_root:
        blocks = []
        for r in range(grid.replicas):
            n = split_counts(rows, grid.replicas, r)[1]
            if r * grid.stages + last == 0:
                blocks.append(block)
            else:
                blocks.append(np.empty((n, width), dtype))
                world.Recv(blocks[-1], source=r * grid.stages + last, tag=r)
    with comm.agreed(cfg.debug):
        if problems:
            raise UserError(f"{problems[0]}; no predictions written")
        if world.is_root:
            _write_predictions(Path(out_path), np.concatenate(blocks), cfg.loss == "cross_entropy", path)
    return rows


def member_probabilities(path):
    """Softmax outputs of a classifier checkpoint on its own data's held-out rows, and the labels,
    computed on this process alone (an ensemble's members, averaged by the sweep)."""
    comm = Comm.serial()
    cfg, info, layers, grid, pipe = load(path, {}, comm)
    ds = open_data(cfg, comm)
    with comm.agreed(cfg.debug):
        if ds.num_classes is None or ds.test is None:
            raise UserError(f"{path}: an ensemble needs a classifier and held-out rows")
    probs, labels = [], []
    for i in range(0, len(ds.test), cfg.eval_batch_size):
        ids = ds.test.ids[i : i + cfg.eval_batch_size]
        x, y = as_batch(*ds.test.source.read(ids), dtype_of(cfg.dtype), True)
        problem = bad_row(ds.test, ids, x, y, pipe, True)
        if problem is not None:
            raise UserError(problem_text(ds.test, problem))
        out = to_host(pipe.model.forward(x, train=False))
        probs.append(_softmax(out))
        labels.append(np.asarray(y))
    ds.close()
    grid.free()
    comm.Free()
    return np.concatenate(probs), np.concatenate(labels)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # (rows, classes); the row max is 0
    return e / e.sum(axis=1, keepdims=True)


def _last_width(info, layers) -> int:
    """Values per output row of the checkpoint's model."""
    return math.prod(Sequential.shape_after(layers, in_shape_of(info.architecture)))


def _write_predictions(out: Path, outputs, classify: bool, checkpoint) -> None:
    import h5py

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["checkpoint"] = str(checkpoint)
            f.create_dataset("outputs", data=outputs)
            if classify:
                f.create_dataset("probabilities", data=_softmax(outputs))
                f.create_dataset("predictions", data=outputs.argmax(axis=1).astype(np.int64))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write predictions to {out}: {exc}") from None


def _main(comm: Comm, argv) -> int:
    with comm.agreed(comm.debug):
        args = vars(build_parser(is_root=comm.is_root).parse_args(argv))
    path, split, out = args.pop("checkpoint"), args.pop("split", None), args.pop("predict", None)
    with comm.agreed(comm.debug):
        import_modules(args.pop("imports", []))
    blas_threads(comm.local_size, args.get("threads", 0))
    if out is not None:
        rows = predict(path, out, args, comm)
        comm.print0(f"predictions for {rows} rows written to {out}")
        return EXIT_OK
    m = score(path, split, args, comm)
    text = f"{path} (step {m['step']}): {m['split']} rows of {m['data']}: {scores_text(m)}"
    comm.print0(f"{text} ({m['rows']} rows, {comm.size} rank(s))")
    return EXIT_OK


def main(argv=None) -> int:
    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
