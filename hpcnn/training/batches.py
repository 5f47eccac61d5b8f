"""A step's rows and an evaluation over a split.

Reading this stage's part of a batch (inputs on the first pipeline stage, labels on the last) into
the stage's workspace, finding the first non-finite or unreadable row (the rank carries on with
zeros until every rank has agreed to stop), cutting a replica's rows into micro-batches, and the
loss and accuracy over a whole split (``evaluate_split``), exactly summed in deterministic mode.
"""

import math

import numpy as np

from hpcnn.core.backend import dtype_of, to_host, xp
from hpcnn.errors import EXIT_NONFINITE, EXIT_USAGE, JobError
from hpcnn.io.datasets import UnreadableRows, describe_nonfinite, first_nonfinite, split_units
from hpcnn.parallel.comm import IN_PLACE, SUM, Grid
from hpcnn.parallel.deterministic import exact_metrics, shard_count
from hpcnn.parallel.pipeline import Pipeline


def as_batch(x, y, dtype, classify: bool):
    """Cast what a source returned (either part may be ``None``) for the model."""
    # A value beyond dtype's range (1e39 in a float64 file, for float32) becomes inf here; callers
    # find it with the NaNs (bad_row), so numpy's overflow warning would only repeat it per rank.
    with np.errstate(over="ignore"):
        if x is not None:
            x = xp.asarray(x, dtype=dtype)  # (rows, features)
        if y is not None and not classify:
            y = xp.asarray(y, dtype=dtype)
            y = y[:, None] if y.ndim == 1 else y  # (rows, outputs), also for 0 rows
        elif y is not None:
            y = xp.asarray(y)
    return x, y


def micro_batches(x, y, micro: int, unit: int = 1):
    """Cut a replica's rows into ``micro`` contiguous pieces that differ by at most one ``unit`` of
    rows (a shard in deterministic mode: pieces are whole shards; only the last shard may be short)."""
    rows = len(x) if x is not None else len(y)
    cuts = [split_units(rows, unit, micro, m) for m in range(micro)]
    pieces = lambda a: None if a is None else [a[s : s + n] for s, n in cuts]  # noqa: E731
    return pieces(x), pieces(y), [n for _, n in cuts]


def read_batch(split, ids, pipe: Pipeline, dtype, classify, mode: str = "infer"):
    """What this stage needs of rows ``ids``: inputs on the first stage, labels on the last (read
    into the stage's workspace: valid until the next read of the same ``mode``), and ``None`` or,
    for rows HDF5 cannot read (a damaged file), zeros in their place and the problem (see
    ``bad_row``): the rank carries on to the point where all ranks agree to stop."""
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
    return (*as_batch(x, y, dtype, classify), problem)


def bad_row(split, ids, x, y, pipe: Pipeline, classify: bool):
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


def problem_text(split, problem, step: int | None = None) -> str:
    """One line naming the file, the split and the row of a ``read_batch``/``bad_row`` problem."""
    row, headline, detail = problem
    if headline == "cannot be read":  # detail names the file, the dataset and the rows
        return f"{detail} ({split.name} rows{f', read for step {step}' if step is not None else ''})"
    when = f", read for step {step}" if step is not None else ""
    return f"{split.source.path}: {split.name} row {row} {headline}{when}: {detail}"


def forward_rows(pipe: Pipeline, inputs_of, start: int, count: int, cfg) -> list:
    """Rows ``[start, start + count)`` through this rank's stage, in chunks of ``eval_batch_size``
    rows (whole shards in deterministic mode), each cut into ``micro_batches`` micro-batches.
    ``inputs_of(i, n)``: the model's inputs for rows ``i .. i + n`` (asked on the first stage only).
    Returns the last stage's outputs, chunk by chunk (empty elsewhere)."""
    unit = pipe.shard_rows or 1
    chunk = max(1, cfg.eval_batch_size // unit) * unit
    kept = []
    for i in range(start, start + count, chunk):
        n = min(chunk, start + count - i)
        inputs = inputs_of(i, n) if pipe.is_first else xp.empty((n, 0))
        pieces, _, sizes = micro_batches(inputs, None, cfg.micro_batches, unit)
        pipe.forward_only(pieces if pipe.is_first else None, None, sizes, None, kept)
    return kept


def evaluate_split(pipe: Pipeline, loss_fn, split, grid: Grid, cfg, classify: bool) -> dict:
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
        x, y, found = read_batch(split, chunk, pipe, dtype, classify)
        found = found or bad_row(split, chunk, x, y, pipe, classify)
        if found is not None:
            problem, sums[3] = problem or found, sums[3] + 1
        inputs, targets, sizes = micro_batches(x, y, cfg.micro_batches, unit)
        # finite inputs can still overflow in the model: the loss is checked below
        with np.errstate(over="ignore", invalid="ignore"):
            loss_sum, correct = pipe.forward_only(inputs, targets, sizes, loss_fn)
        if pipe.is_last:
            sums[:3] += (loss_sum, correct, len(chunk))
            shard_losses += pipe.shard_losses
    with pipe.probe.region("evaluation allreduce"):
        if pipe.shard_rows:
            total, first = shard_count(len(split), unit), start // unit
            sums = exact_metrics(grid.world, shard_losses, first, total, sums[1:], pipe.is_last)
        else:
            grid.world.Allreduce(IN_PLACE, sums, op=SUM)
        if sums[3]:  # every rank knows: say which row (a collective only on this path)
            found = [p for p in grid.world.allgather(problem) if p is not None]
            raise JobError(f"{problem_text(split, min(found))}; evaluation stopped", EXIT_USAGE)
    rows = max(sums[2], 1)
    if not math.isfinite(sums[0]):
        raise JobError(
            f"{split.source.path}: the {split.name} loss is {sums[0] / rows} although every {split.name} "
            f"value is finite: the model's outputs or the loss overflow {np.dtype(dtype).name} "
            "(rescale the data, or train with a lower --lr or --clip-norm)",
            EXIT_NONFINITE,
        )
    return {"loss": sums[0] / rows, "accuracy": sums[1] / rows if classify else None, "rows": int(sums[2])}
