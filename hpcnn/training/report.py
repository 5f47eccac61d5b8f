"""What rank 0 says about a run: the job's layout, the data and model, epoch lines, stage times,
and the facts a run directory records. Functions take a ``log`` callable (rank 0's, or silent)."""

import os
import socket
import sys
import time

import numpy as np

from hpcnn import __version__
from hpcnn.config import Config
from hpcnn.core.model import Sequential, describe
from hpcnn.parallel.comm import Comm, blas_threads
from hpcnn.parallel.deterministic import shard_count, shard_rows
from hpcnn.parallel.pipeline import gpipe_bubble


def describe_run(log, cfg, ds, layers, bounds, grid, sampler, steps) -> None:
    classify = ds.num_classes is not None
    kind = f"{ds.num_classes} classes" if classify else f"{ds.outputs} regression outputs"
    held_out = len(ds.test) if ds.test else 0
    rows = f"{ds.features} features"
    if ds.shape:  # (H, W, C)
        rows = f"{ds.shape[0]}x{ds.shape[1]} images with {ds.shape[2]} channel(s)"
    log(f"data: {ds.name}: {len(ds.train)} training rows, {held_out} held-out, {rows}, {kind}")
    log(f"model: {describe(layers)}, {cfg.dtype}")
    if grid.stages > 1:
        costs = Sequential.layer_flops(layers, ds.in_shape)
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


def report_stages(log, cfg, grid, pipe) -> None:
    """Rank 0 prints where each stage of pipeline 0 spent its time, against GPipe's theory."""
    t = pipe.times
    rows = grid.pipe.gather((t.compute, t.wait, t.total, t.bubble, t.peak_live), root=0)
    if rows is None:
        return
    theory = gpipe_bubble(grid.stages, cfg.micro_batches)
    log(f"pipeline time per stage (replica 0; theory for equal stages: bubble {100 * theory:.1f}%):")
    for s, (compute, wait, total, bubble, peak) in enumerate(rows):
        log(
            f"  stage {s}: compute {compute:.2f} s, waiting {wait:.2f} s of {total:.2f} s, "
            f"bubble {100 * bubble:.1f}%, at most {peak} micro-batch(es) alive"
        )


def scores_text(scores: dict) -> str:
    """``loss 0.0751, accuracy 98.61%`` (no accuracy for a regression)."""
    text = f"loss {scores['loss']:.4f}"
    if scores["accuracy"] is not None:
        text += f", accuracy {100 * scores['accuracy']:.2f}%"
    return text


def _pct(v) -> str:
    return f"{100 * v:6.2f}%"


def epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}"
    if row["accuracy"] is not None:
        text += f"  acc {_pct(row['accuracy'])}"
    if "test" in row:
        text += f"  | held-out loss {row['test']['loss']:.4f}"
        if row["test"]["accuracy"] is not None:
            text += f"  acc {_pct(row['test']['accuracy'])}"
    if "epsilon" in row:
        text += f"  | epsilon {row['epsilon']:.3g}"
    return text + f"  | lr {row['lr']:.2e}  {row['samples_per_s']:,.0f} rows/s  {row['seconds']:.2f} s"


def announce_layout(cfg: Config, comm: Comm) -> tuple:
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
    placement = comm.gather((socket.gethostname(), os.getpid()), root=0)
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


def facts(cfg: Config, comm: Comm, threads: tuple, placement) -> dict:
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
