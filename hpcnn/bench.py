"""``python -m hpcnn.bench``: training throughput, measured against this machine's own ceilings.

One launch, at any rank count and layout (``mpirun -n R python -m hpcnn.bench [training flags]``),
runs real training steps (the training command's own step, on synthetic rows held in memory) and
reports, on rank 0 and as JSON (``--json FILE``):

- throughput: samples/s of ``--steps`` steps after ``--warmup`` steps, median of ``--repeats``;
  achieved GFLOP/s counts the matrix products the step performs (forward, weight gradient, and the
  input gradient of every layer but the model's first);
- the **GEMM ceiling**: the same matrix products at the same shapes, timed on every rank at once
  with the same BLAS threads (no communication, no elementwise work, no pipeline bubble); the
  ceiling throughput is the global batch over the slowest rank's time, and ``efficiency`` is the
  measured throughput over it;
- a per-step breakdown from ``MPI.Wtime`` timers (rank 0, and every rank in the JSON): data,
  forward, backward, pipeline waits, gradient reduction *exposed* (time blocked waiting for it
  after backward), optimizer, and the rest (stop check, Python);
- the raw ``Allreduce`` time of the gradient's bytes over the data-parallel group, and the ratio
  of the exposed reduction to it.

``python -m hpcnn.bench scaling DIR`` reads the ``bench-*.json`` files that launches at several rank
counts wrote into ``DIR`` (``jobs/scaling.sbatch`` does this), and writes ``DIR/scaling.json``
(throughput, speed-up and parallel efficiency against the smallest rank count) and
``DIR/scaling.png`` (needs matplotlib: ``pip install 'hpcnn[plots]'``).

Defaults are the reference benchmark network: 784-1024-1024-10, ReLU, softmax cross-entropy, SGD
momentum 0.9, float32, global batch 256. Any training flag changes them (``--hidden``,
``--batch-size``, ``--pipeline-stages``, ``--micro-batches``, ``--overlap off``, ``--threads`` ...).
``--model lenet`` and ``--model cnn-cifar`` benchmark the convolutional networks on synthetic 1x28x28
and 3x32x32 images (docs/performance.md compares them with PyTorch).
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from hpcnn import __version__
from hpcnn.command import run_command
from hpcnn.config import build_parser, from_dict, load_toml
from hpcnn.core.backend import xp
from hpcnn.core.model import Sequential
from hpcnn.errors import EXIT_OK, EXIT_USAGE, JobError, UserError
from hpcnn.parallel.comm import IN_PLACE, SUM, Comm
from hpcnn.parallel.inspector import Inspector
from hpcnn.parallel.preempt import StopRequest
from hpcnn.parallel.probe import StageTimes
from hpcnn.plot import draw_scaling

BENCH_DEFAULTS = {
    "data": "synthetic",
    "synthetic_features": 784,
    "synthetic_classes": 10,
    "hidden": [1024, 1024],
    "batch_size": 256,
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": 0.01,
    "lr_schedule": "constant",
    "eval_every": 0,
    "epochs": 1_000_000,
}
# The images a built-in convolutional network is benchmarked on (synthetic, CxHxW), unless given.
BENCH_IMAGES = {"lenet": "1x28x28", "cnn-cifar": "3x32x32", "cnn-digits": "1x8x8"}
PARTS = ("data", "forward", "backward", "pipeline_wait", "reduce_exposed", "optimizer", "other")


def _parser(is_root: bool) -> argparse.ArgumentParser:
    p = build_parser("python -m hpcnn.bench", is_root)
    p.description = (
        "Measure training throughput against the GEMM ceiling and the raw Allreduce "
        "(run under mpirun/srun at any rank count). 'python -m hpcnn.bench scaling DIR' combines "
        "several launches' JSON into a scaling table and plot."
    )
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default: 20)")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    g.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    g.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    return p


def bench_config(argv, is_root: bool = True):
    """The training config (benchmark defaults, then ``--config``, then flags) and the bench options."""
    args = vars(_parser(is_root).parse_args(argv))
    opts = {k: args.pop(k) for k in ("steps", "warmup", "repeats", "json")}
    path = args.pop("config", None)
    values = dict(BENCH_DEFAULTS, **(load_toml(path) if path else {}))
    cfg = dataclasses.replace(from_dict(values, path or "benchmark defaults"), **args)
    if cfg.data == "synthetic" and not cfg.synthetic_image and cfg.model in BENCH_IMAGES:
        cfg.synthetic_image = BENCH_IMAGES[cfg.model]
    if "synthetic_rows" not in values and "synthetic_rows" not in args and cfg.data == "synthetic":
        cfg.synthetic_rows = 4 * cfg.batch_size  # enough distinct batches; generated in memory
    cfg.checkpoint_dir, cfg.resume = "", ""  # a benchmark writes no checkpoints
    for key in ("steps", "repeats"):
        if opts[key] <= 0:
            raise UserError(f"--{key} = {opts[key]}: must be a positive integer")
    if opts["warmup"] < 0:
        raise UserError(f"--warmup = {opts['warmup']}: must be >= 0")
    return cfg.validate(), argparse.Namespace(**opts)


def layer_products(layers, in_shape=None) -> list[tuple[int, int, int, int]]:
    """``(layer index, m, k, n)`` of every matrix product the layers' forward passes perform per
    row (``Layer.products``); ``in_shape`` defaults to the first layer's input width."""
    shape = in_shape if in_shape is not None else (layers[0].fan_in,)
    out = []
    for i, (layer, s) in enumerate(zip(layers, Sequential.shapes(layers, shape), strict=False)):
        out += [(i, m, k, n) for m, k, n in layer.products(s)]
    return out


def step_flops(layers, rows: int, in_shape=None) -> float:
    """Floating-point operations of the matrix products of one step over ``rows`` rows of the whole
    model: forward and weight gradient for every product (Dense, Conv2D), input gradient for all
    but the first layer's."""
    flops = 0.0
    for i, m, k, n in layer_products(layers, in_shape):
        flops += (2 if i == 0 else 3) * 2.0 * rows * m * k * n
    return flops


def gemm_seconds(model, rows: int, first_stage: bool, micro: int = 1, deferred: bool = False, repeats=7):
    """Median time of the matrix products a step of ``micro`` micro-batches of ``rows`` rows costs
    this stage (``deferred``: the weight gradients as one product over all the step's rows, as a
    pipeline stage forms them)."""
    dtype, per_micro, once = model.dtype, [], []
    for i, m, k, n in layer_products(model.layers, model.in_shape):
        x, dy = xp.ones((rows * m, k), dtype), xp.ones((rows * m, n), dtype)
        W, dW = xp.ones((k, n), dtype), xp.empty((k, n), dtype)
        y, dx = xp.empty_like(dy), xp.empty_like(x)
        per_micro.append((x, W, y))
        if not (first_stage and i == 0):
            per_micro.append((dy, W.T, dx))
        if deferred:
            total = rows * m * micro
            once.append((xp.ones((total, k), dtype).T, xp.ones((total, n), dtype), dW))
        else:
            per_micro.append((x.T, dy, dW))
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(micro):
            for a, b, out in per_micro:
                xp.matmul(a, b, out=out)
        for a, b, out in once:
            xp.matmul(a, b, out=out)
        if r:  # the first round warms caches and BLAS threads
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_allreduce_seconds(dp: Comm, size: int, dtype, repeats: int = 10) -> float:
    """Median time of one blocking in-place Allreduce of ``size`` elements over ``dp``."""
    if dp.size == 1:
        return 0.0
    buf = xp.ones(size, dtype)
    times = []
    for r in range(repeats + 2):
        dp.Barrier()
        t0 = dp.wtime()
        dp.Allreduce(IN_PLACE, buf, op=SUM)
        if r >= 2:
            times.append(dp.wtime() - t0)
    return statistics.median(times)


def _breakdown(t: StageTimes, step_seconds: float, steps: int) -> dict:
    """Milliseconds per step of each part of this rank's step."""
    parts = {
        "data": t.data,
        "forward": t.forward,
        "backward": t.backward,
        "pipeline_wait": t.wait,
        "reduce_exposed": t.reduce,
        "optimizer": t.optimizer,
    }
    ms = {k: 1e3 * v / steps for k, v in parts.items()}
    ms["other"] = max(0.0, 1e3 * step_seconds - sum(ms.values()))
    return ms


def run(cfg, opts, comm: Comm, log=None) -> dict | None:
    """Run the benchmark on ``comm``; returns the results on rank 0 (``None`` elsewhere)."""
    from hpcnn.training.engine import Training  # the training command's own step
    from hpcnn.training.report import announce_layout

    log = log if (log is not None and comm.is_root) else (lambda *a: None)
    threads, _ = announce_layout(cfg, comm)
    inspector = Inspector(comm, cfg.stall_timeout)
    try:
        training = Training(cfg, comm, lambda *a: None, inspector)
        try:
            seconds, samples, parts = _timed_steps(training, opts, comm)
        finally:
            training.close()  # BLAS gets its threads back (deterministic mode) for the ceiling
    except JobError:  # raised on every rank: the inspector's collective shutdown is safe
        inspector.close()
        raise
    except BaseException:
        inspector.abandon()
        raise
    inspector.close()
    pipe, grid, sync = training.pipe, training.grid, training.sync

    # Ceilings, measured after the timed steps on every rank at once (memory bandwidth is shared).
    rows = _micro_rows(cfg, grid)
    deferred = pipe.defers_weight_grads(cfg.micro_batches)
    gemm = gemm_seconds(pipe.model, rows, pipe.is_first, cfg.micro_batches, deferred)
    comm.Barrier()
    raw = raw_allreduce_seconds(grid.dp, pipe.model.params.size, pipe.model.dtype)
    grad_bytes = int(pipe.model.params.size * pipe.model.params.data.itemsize)
    per_rank = comm.gather(
        {
            "gemm_s": gemm,
            "breakdown_ms": _median_parts(parts),
            "stage": grid.stage,
            "replica": grid.replica,
            "grad_bytes": grad_bytes,
        }
    )
    raw = comm.max(raw)
    grid.free()
    if not comm.is_root:
        return None
    rates = [n / s for n, s in zip(samples, seconds, strict=True)]
    samples_per_s = statistics.median(rates)
    step = statistics.median(seconds) / opts.steps
    flops_per_row = step_flops(training.layers, 1, training.ds.in_shape)
    flops = step_flops(training.layers, cfg.batch_size, training.ds.in_shape)  # the ceiling's unit
    ceiling_step = max(r["gemm_s"] for r in per_rank)
    mine = per_rank[0]["breakdown_ms"]
    exposed = max(r["breakdown_ms"]["reduce_exposed"] for r in per_rank)
    result = {
        "hpcnn": __version__,
        "network": _network(cfg, training.ds),
        "parameters": sum(layer_params(layer) for layer in training.layers),
        "ranks": comm.size,
        "replicas": grid.replicas,
        "stages": grid.stages,
        "micro_batches": cfg.micro_batches,
        "schedule": cfg.schedule,
        "overlap": cfg.overlap,
        "zero": cfg.zero,
        "deterministic": cfg.deterministic,
        "shard_rows": training.pipe.shard_rows or None,
        "bucket_mb": cfg.bucket_mb,
        "buckets": len(getattr(sync, "buckets", ())),  # the overlapped reduction's (none: deterministic)
        "batch": cfg.batch_size,
        "dtype": cfg.dtype,
        "optimizer": cfg.optimizer,
        "threads_per_rank": threads[0],
        "threads_source": threads[1],
        "ranks_per_node": comm.local_size,
        "cores_per_node": os.cpu_count(),
        "steps": opts.steps,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "samples_per_s": samples_per_s,
        "samples_per_s_repeats": rates,
        "step_ms": 1e3 * step,
        "gflops": flops_per_row * samples_per_s / 1e9,
        "ceiling": {
            "samples_per_s": cfg.batch_size / ceiling_step,
            "gflops": flops / ceiling_step / 1e9,
            "step_ms": 1e3 * ceiling_step,
        },
        "efficiency": samples_per_s / (cfg.batch_size / ceiling_step),
        "breakdown_ms": mine,
        "breakdown_ms_per_rank": [r["breakdown_ms"] for r in per_rank],
        "allreduce": {
            "bytes": max(r["grad_bytes"] for r in per_rank),  # the largest stage's gradient
            "raw_ms": 1e3 * raw,
            "exposed_ms": exposed,
            "exposed_over_raw": (exposed / (1e3 * raw)) if raw else None,
            "exposed_fraction_of_step": exposed / (1e3 * step),
        },
        "mpi": Comm.library_version(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    _report(log, result)
    return result


def _timed_steps(training, opts, comm):
    """Warm-up, then ``opts.repeats`` timed runs of ``opts.steps`` steps: seconds and rows of each
    run (an epoch's last batch may be partial) and each run's per-step breakdown."""
    pipe, batches, sums = training.pipe, _batches(training), np.zeros(3)
    with StopRequest(comm, ()) as training.stop:

        def steps(n: int) -> int:
            rows_done = 0
            for _ in range(n):
                ids, rows = next(batches)
                training._step(ids, rows, sums)
                training.stop.poll()
                rows_done += rows
            return rows_done

        steps(opts.warmup)
        seconds, samples, parts = [], [], []
        for _ in range(opts.repeats):
            pipe.times = StageTimes()
            comm.Barrier()
            t0 = comm.wtime()
            samples.append(steps(opts.steps))
            comm.Barrier()
            seconds.append(comm.wtime() - t0)
            parts.append(_breakdown(pipe.times, seconds[-1] / opts.steps, opts.steps))
        training.stop.drain()
    return seconds, samples, parts


def _network(cfg, ds) -> str:
    """The network's name in the results: the MLP's widths, or the model and its input images."""
    if cfg.model != "mlp":
        shape = ds.in_shape
        return cfg.model + ("" if len(shape) == 1 else f" ({shape[2]}x{shape[0]}x{shape[1]})")
    if cfg.data == "synthetic":
        return "-".join(map(str, [cfg.synthetic_features, *cfg.hidden, cfg.synthetic_classes]))
    return ds.name


def layer_params(layer) -> int:
    return sum(int(np.prod(spec.shape)) for spec in layer.param_specs())


def _micro_rows(cfg, grid) -> int:
    """Rows of one full micro-batch on this replica."""
    per_replica = -(-cfg.batch_size // grid.replicas)
    return max(1, -(-per_replica // cfg.micro_batches))


def _median_parts(parts: list[dict]) -> dict:
    return {k: statistics.median(p[k] for p in parts) for k in PARTS}


def _batches(training):
    """Global batches without end: the sampler's epochs one after another."""
    epoch = 0
    while True:
        yield from training.sampler.epoch(epoch)
        epoch += 1


def _report(log, r: dict) -> None:
    layout = f"{r['replicas']} replica(s) x {r['stages']} stage(s)"
    if r["stages"] > 1:
        layout += f", {r['micro_batches']} micro-batches ({r['schedule']})"
    log(
        f"benchmark: {r['network']} ({r['parameters']:,} parameters), batch {r['batch']}, {r['dtype']}, "
        f"{r['optimizer']}; {r['ranks']} rank(s) = {layout}, {r['threads_per_rank'] or 'user-set'} BLAS "
        f"thread(s) per rank, "
        + (
            f"deterministic (shards of {r['shard_rows']} rows)"
            if r["deterministic"]
            else f"overlap {r['overlap']} ({r['buckets']} bucket(s))"
        )
        + (f", zero {r['zero']}" if r.get("zero") else "")
    )
    spread = ", ".join(f"{s:,.0f}" for s in r["samples_per_s_repeats"])
    log(
        f"throughput: {r['samples_per_s']:,.0f} samples/s (repeats: {spread}), "
        f"{r['step_ms']:.2f} ms/step, {r['gflops']:.1f} GFLOP/s"
    )
    c = r["ceiling"]
    log(
        f"GEMM ceiling (same products, same threads, no communication): {c['samples_per_s']:,.0f} "
        f"samples/s, {c['gflops']:.1f} GFLOP/s -> efficiency {100 * r['efficiency']:.1f}%"
    )
    b = r["breakdown_ms"]
    log("per step on rank 0 (ms): " + ", ".join(f"{k.replace('_', ' ')} {b[k]:.2f}" for k in PARTS))
    a = r["allreduce"]
    if a["raw_ms"]:
        log(
            f"gradient reduction: {a['bytes'] / 2**20:.1f} MiB; raw Allreduce {a['raw_ms']:.2f} ms; "
            f"exposed (slowest rank) {a['exposed_ms']:.2f} ms = {100 * a['exposed_fraction_of_step']:.1f}% "
            f"of the step, {a['exposed_over_raw']:.2f} x raw"
        )


# --- scaling ----------------------------------------------------------------------------------


def scaling(directory: str, plot: bool = True) -> dict:
    """Combine ``DIR/bench-*.json`` into ``DIR/scaling.json`` (and ``DIR/scaling.png``)."""
    d = Path(directory)
    runs = []
    for path in sorted(d.glob("bench-*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a benchmark result ({exc})") from None
    if not runs:
        raise UserError(f"{d}: no bench-*.json files (write them with python -m hpcnn.bench --json)")
    runs.sort(key=lambda r: r["ranks"])
    base = runs[0]
    rows = []
    for r in runs:
        speedup = r["samples_per_s"] / base["samples_per_s"]
        ideal = r["ranks"] / base["ranks"]
        rows.append(
            {
                "ranks": r["ranks"],
                "replicas": r["replicas"],
                "stages": r["stages"],
                "samples_per_s": r["samples_per_s"],
                "speedup": speedup,
                "efficiency": speedup / ideal,
                "ceiling_efficiency": r["efficiency"],
                "reduce_exposed_fraction": r["allreduce"]["exposed_fraction_of_step"],
            }
        )
    out = {"network": base["network"], "batch": base["batch"], "baseline_ranks": base["ranks"], "runs": rows}
    (d / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['ranks']:>5} ranks  {row['samples_per_s']:>10,.0f} samples/s  speed-up "
            f"{row['speedup']:5.2f}  efficiency {100 * row['efficiency']:5.1f}%"
        )
    print(f"wrote {d / 'scaling.json'}")
    if plot:
        draw_scaling(rows, d / "scaling.png", out["network"], out["batch"])
        print(f"wrote {d / 'scaling.png'}")
    return out


def _main(comm: Comm, argv) -> int:
    with comm.agreed(comm.debug):
        cfg, opts = bench_config(argv, comm.is_root)
    comm.debug = cfg.debug
    result = run(cfg, opts, comm, log=comm.print0)
    with comm.agreed(cfg.debug):
        if comm.is_root and opts.json:
            path = Path(opts.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            comm.print0(f"wrote {path}")
    return EXIT_OK


def _scaling_main(argv) -> int:
    """``scaling DIR``: file work only, so it runs without MPI (e.g. in a batch script after the
    launches)."""
    p = argparse.ArgumentParser(prog="python -m hpcnn.bench scaling")
    p.add_argument("dir", help="directory holding the bench-*.json of several launches")
    p.add_argument("--no-plot", action="store_true", help="write scaling.json only")
    args = p.parse_args(argv)
    try:
        scaling(args.dir, plot=not args.no_plot)
    except UserError as exc:
        print(f"hpcnn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["scaling"]:
        return _scaling_main(argv[1:])
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
