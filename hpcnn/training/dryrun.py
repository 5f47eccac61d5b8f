"""``--dry-run``: the resolved config and what every rank would hold (parameters, an estimate of its
memory, rows per step), computed from the real setup without training."""

import math
import socket

import numpy as np

from hpcnn.config import Config
from hpcnn.core.model import Sequential
from hpcnn.errors import EXIT_OK
from hpcnn.io.datasets import split_units
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.deterministic import shard_count, shard_rows
from hpcnn.parallel.pipeline import defers_weight_grads
from hpcnn.parallel.zero import plan
from hpcnn.training.report import describe_run
from hpcnn.training.setup import prepare, total_steps


def dry_run(cfg: Config, comm: Comm) -> int:
    """Print the resolved config and what every rank would hold; train nothing."""
    ds, layers, bounds, grid, pipe, sampler = prepare(cfg, comm)
    steps = total_steps(cfg, sampler)
    describe_run(comm.print0, cfg, ds, layers, bounds, grid, sampler, steps)
    params = pipe.model.params
    itemsize = np.dtype(cfg.dtype).itemsize
    state = {"sgd": 1 if cfg.momentum else 0, "adam": 2, "adamw": 2}[cfg.optimizer]
    # Parameters, gradients, optimizer state; activations: every layer's output and input gradient
    # per micro-batch slot. The workspace keeps one set per slot under either schedule (1F1B bounds
    # the micro-batches alive, but a slot's output may still be in a pending send).
    unit = shard_rows(cfg) if cfg.deterministic else 1  # whole shards in deterministic mode
    _, rows = split_units(cfg.batch_size, unit, grid.replicas, grid.replica)  # this replica's rows per step
    micro_rows = -(-rows // cfg.micro_batches)
    widths, stacked, shapes = 0, 0, Sequential.shapes(layers, ds.in_shape)
    for i, layer in enumerate(layers):
        if bounds[grid.stage] <= i < bounds[grid.stage + 1]:
            stacked += layer.deferred_width(shapes[i])
            # its output, its input gradient and its temporaries (a convolution's unfolded input)
            widths += 2 * math.prod(shapes[i + 1]) + layer.workspace_width(shapes[i])
    activation_bytes = cfg.micro_batches * micro_rows * widths * itemsize
    # A pipeline stage keeps its layers' inputs and output gradients for the whole step's rows
    # until the weight-gradient products.
    always = cfg.zero == 2 and grid.replicas > 1  # ZeroSync defers them on a single stage too
    if defers_weight_grads(grid.stages, cfg.micro_batches, cfg.deterministic, always):
        activation_bytes += rows * stacked * itemsize
    # gradients and optimizer state at the --zero level (sharded over the stage's replicas)
    level = cfg.zero if grid.replicas > 1 else 0
    stage_layers = layers[bounds[grid.stage] : bounds[grid.stage + 1]]
    level = min(level, 1) if cfg.deterministic else level  # (its per-shard gradients stay)
    grads, part = plan(
        params, stage_layers, level, grid.replicas, grid.replica, cfg.micro_batches, cfg.bucket_mb
    )
    if cfg.deterministic:  # one gradient per shard this replica holds in a step
        full = shard_count(min(cfg.batch_size, len(ds.train)), shard_rows(cfg))
        grads += -(-full // grid.replicas) * params.size
    parts = [params.size * itemsize, grads * itemsize, state * part * itemsize, activation_bytes]
    row = (comm.rank, socket.gethostname(), grid.stage, grid.replica, bounds[grid.stage],
           bounds[grid.stage + 1] - 1, params.size, parts, rows)  # fmt: skip
    rows_all = comm.gather(row, root=0)
    comm.print0(
        "layout (rank: host, stage, replica, layers, parameters, estimated memory: parameters + gradients "
        f"+ optimizer state{f' (zero {cfg.zero})' if cfg.zero else ''} + activations, rows per step):"
    )
    for r, host, stage, replica, a, b, n, nbytes, batch_rows in rows_all or []:
        split = " + ".join(f"{x / 2**20:.1f}" for x in nbytes)
        comm.print0(
            f"  rank {r}: {host}, stage {stage}, replica {replica}, layers {a}-{b}, {n:,} parameters, "
            f"~{sum(nbytes) / 2**20:.1f} MiB ({split}), ~{batch_rows} rows of each global batch"
        )
    total = sum(row[6] for row in rows_all or [] if row[3] == 0)
    comm.print0(f"parameters: {total:,} in all; {steps} steps")
    comm.print0("resolved config (TOML):")
    comm.print0(cfg.to_toml().rstrip())
    ds.close()
    grid.free()
    return EXIT_OK
