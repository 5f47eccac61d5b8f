"""``python -m hpcnn.plot RUN_DIR [RUN_DIR ...]``: PNG plots of training runs, overlaid.

Reads each run directory's ``metrics.jsonl``, one JSON object per line:

- ``{"kind": "step", "step", "epoch", "loss", "accuracy", "lr", "grad_norm", "samples_per_s",
  "time": {"data", "forward_backward", "reduce", "optimizer", "other"}, "wall"}`` for each logged
  step (``step`` counts optimizer steps done; ``time`` is seconds per step over the logged
  interval);
- ``{"kind": "epoch", "epoch", "step", "loss", "accuracy", "lr", "seconds", "samples_per_s",
  "test": {"loss", "accuracy", "rows"}, "epsilon"}`` at the end of each epoch (``test`` only when
  held-out rows were scored, ``epsilon`` only in private runs);

and other kinds are skipped. A last line cut short (a run killed mid-write) is skipped with a
warning; any other line that is not JSON is an error. A resumed run appends to the file: its
records replace those of the steps it redid. NaN and infinite values are left out of the curves.
``facts.json`` in the run directory, when there, gives the rank count for the legend
(``runs/a (8 ranks)``); ``--label`` names the runs instead.

Writes into ``--out`` (default: the run directory when there is one, ``plots/`` when several runs
are overlaid), one line per run in each figure:

- ``loss.png``: training loss per logged step, each epoch's training loss (markers at the epoch's
  last step) and the held-out loss;
- ``accuracy.png``: the same for accuracy (only when some run has it);
- ``lr.png``, ``throughput.png`` (samples/s), ``grad_norm.png`` (log scale) per logged step;
- ``privacy.png``: the epsilon spent by the end of each epoch (private runs: ``--dp-sgd``);
- ``time_breakdown.png``: each run's step time split into data, forward+backward, gradient
  reduction, optimizer and the rest, stacked (one panel per run).

A figure no run has data for is not written. An argument that is the benchmark's ``scaling.json``
(or a directory holding one and no ``metrics.jsonl``, as ``python -m hpcnn.bench scaling DIR``
leaves it) gives ``scaling.png``, drawn as that command draws it.

Needs matplotlib (``pip install 'hpcnn[plots]'``) but not MPI.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcnn.errors import EXIT_OK, EXIT_USAGE, UserError

METRICS = "metrics.jsonl"
FACTS = "facts.json"
SCALING = "scaling.json"
TIME_PARTS = ("data", "forward_backward", "reduce", "optimizer", "other")
NEEDS_MATPLOTLIB = "python -m hpcnn.plot needs matplotlib: pip install 'hpcnn[plots]'"


@dataclass
class Run:
    label: str
    steps: list[dict]
    epochs: list[dict]


def _warn(message: str) -> None:
    print(f"hpcnn: warning: {message}", file=sys.stderr)


def load_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """The step records and the epoch records of ``RUN_DIR/metrics.jsonl``, in file order.

    A resumed run appends to the file and goes back to its checkpoint's step: a record drops the
    earlier records of its kind at the same or a later step (and, for an epoch, of the same epoch),
    which the resumed run has redone."""
    path = Path(run_dir) / METRICS
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (is {run_dir} a training run directory?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    # split("\n"), not splitlines(): the writer ends records with "\n" only.
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: empty (the run logged nothing)")
    steps, epochs = [], []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            if i == len(lines) - 1:
                _warn(f"{path}:{n}: last line is cut short (run stopped mid-write?); skipped")
                break
            raise UserError(f"{path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: not a JSON object")
        kind = record.get("kind")
        if kind not in ("step", "epoch"):
            continue
        if not _is_number(record.get("step")):
            raise UserError(f"{path}:{n}: a {kind} record without a numeric 'step'")
        records = steps if kind == "step" else epochs
        while records and (
            records[-1]["step"] >= record["step"]
            or (kind == "epoch" and records[-1].get("epoch") == record.get("epoch"))
        ):
            records.pop()
        records.append(record)
    if not steps and not epochs:
        raise UserError(f"{path}: no step or epoch records")
    return steps, epochs


def _is_number(value) -> bool:
    """A finite int or float: the writer allows NaN and Infinity (a diverged loss), which have no
    place on an axis, and bool is an int subclass that no metric means."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(run_dir: Path) -> str:
    return run_dir.name or run_dir.resolve().name  # "." names the working directory


def _default_label(run_dir: Path, name: str) -> str:
    path = run_dir / FACTS
    if not path.is_file():
        return name
    # The facts only decorate the legend: a broken file should not cost the user the plots.
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _warn(f"{path}: ignored ({exc})")
        return name
    ranks = facts.get("ranks") if isinstance(facts, dict) else None
    if _is_number(ranks) and int(ranks) == ranks:
        name += f" ({int(ranks)} rank{'' if ranks == 1 else 's'})"
    return name


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [_name(d) for d in run_dirs]
    if len(set(names)) < len(names):
        # runs/a and other/a would read alike in the legend: the paths as given tell them apart.
        names = [str(d) for d in run_dirs]
    return [_default_label(d, name) for d, name in zip(run_dirs, names, strict=True)]


def _check_labels(labels, run_dirs) -> None:
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} --label for {len(run_dirs)} run directories: give one per run")


def _pyplot():
    try:
        import matplotlib

        # Agg: no display on compute nodes, and no window popping up on a laptop.
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(NEEDS_MATPLOTLIB) from None
    return plt


def _xy(records: list[dict], key: str, sub: str | None = None, positive: bool = False):
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        if _is_number(value) and (value > 0 or not positive):
            xs.append(r["step"])
            ys.append(value)
    return xs, ys


def _series(run: Run, key: str, positive: bool = False):
    # Runs that log only epochs still get an lr / throughput curve, from the epoch records.
    return _xy(run.steps or run.epochs, key, positive=positive)


def _finish(ax, fig, runs: list[Run], ylabel: str, title: str):
    ax.set(xlabel="step", ylabel=ylabel, title=title if len(runs) > 1 else f"{title}: {runs[0].label}")
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _metric_figure(plt, runs: list[Run], key: str, ylabel: str, title: str):
    """Per-step training curve, epoch training markers and held-out curve of ``key``, per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for run in runs:
        prefix = f"{run.label} " if len(runs) > 1 else ""
        color = None
        xs, ys = _xy(run.steps, key)
        if xs:
            (line,) = ax.plot(xs, ys, "-", lw=1, label=f"{prefix}train")
            color = line.get_color()
        # Same colour for all of a run's series, so that the style alone tells train from held-out.
        for series, style, name in (
            (_xy(run.epochs, key), "o", "train (epoch)"),
            (_xy(run.epochs, "test", sub=key), "s--", "held-out"),
        ):
            if series[0]:
                (line,) = ax.plot(*series, style, color=color, ms=5, label=f"{prefix}{name}")
                color = line.get_color()
        drawn = drawn or color is not None
    if not drawn:
        plt.close(fig)
        return None
    return _finish(ax, fig, runs, ylabel, title)


def _simple_figure(
    plt, runs: list[Run], key: str, ylabel: str, title: str, log: bool = False, epochs: bool = False
):
    """One curve per run of ``key`` per logged step (``epochs``: per epoch, with markers)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for run in runs:
        xs, ys = _xy(run.epochs, key) if epochs else _series(run, key, positive=log)
        if xs:
            ax.plot(xs, ys, "o-" if epochs else "-", lw=1, label=run.label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if log:
        ax.set_yscale("log")
    return _finish(ax, fig, runs, ylabel, title)


def _time_figure(plt, runs: list[Run]):
    timed = [[r for r in run.steps if isinstance(r.get("time"), dict)] for run in runs]
    if not any(timed):
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1 + 3 * len(runs)), squeeze=False, sharex=True)
    for run, records, ax in zip(runs, timed, axes[:, 0], strict=True):
        ax.set(ylabel="ms per step", title=run.label)
        ax.grid(alpha=0.3)
        if not records:
            ax.text(0.5, 0.5, "no step timings", ha="center", va="center", transform=ax.transAxes)
            continue
        parts = [
            [1e3 * t if _is_number(t := r["time"].get(part)) else 0.0 for r in records] for part in TIME_PARTS
        ]
        ax.stackplot([r["step"] for r in records], parts, labels=TIME_PARTS, alpha=0.8)
        ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def figures(runs: list[Run]) -> dict:
    """File name -> matplotlib figure, for each figure some run has data for (the caller closes them)."""
    plt = _pyplot()
    made = {
        "loss.png": _metric_figure(plt, runs, "loss", "loss", "loss"),
        "accuracy.png": _metric_figure(plt, runs, "accuracy", "accuracy", "accuracy"),
        "lr.png": _simple_figure(plt, runs, "lr", "learning rate", "learning rate"),
        "throughput.png": _simple_figure(plt, runs, "samples_per_s", "samples/s", "throughput"),
        "time_breakdown.png": _time_figure(plt, runs),
        "grad_norm.png": _simple_figure(plt, runs, "grad_norm", "gradient norm", "gradient norm", log=True),
        "privacy.png": _simple_figure(plt, runs, "epsilon", "epsilon spent", "privacy spent", epochs=True),
    }
    return {name: fig for name, fig in made.items() if fig is not None}


def plot_runs(run_dirs, out, labels=None) -> list[Path]:
    """Overlay the runs in ``run_dirs`` and write the PNGs into ``out``; the paths written."""
    run_dirs = [Path(d) for d in run_dirs]
    _check_labels(labels, run_dirs)
    if labels is None:
        labels = _labels(run_dirs)
    plt = _pyplot()
    runs = [Run(label, *load_metrics(d)) for d, label in zip(run_dirs, labels, strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(runs).items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_scaling(source, out) -> Path:
    """Draw ``scaling.png`` into ``out`` from a ``scaling.json`` file (or a directory holding one)."""
    path = Path(source)
    if path.is_dir():
        path = path / SCALING
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a scaling report ({exc})") from None
    rows = data.get("runs") if isinstance(data, dict) else None
    needed = ("ranks", "samples_per_s", "efficiency")
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and all(_is_number(r.get(k)) for k in needed) for r in rows)
    ):
        raise UserError(
            f"{path}: not a scaling report (expected 'runs' with ranks, samples_per_s and efficiency; "
            "write it with python -m hpcnn.bench scaling DIR)"
        )
    _pyplot()  # our message, not bench's "scaling.json is written"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "scaling.png"
    draw_scaling(
        sorted(rows, key=lambda r: r["ranks"]), target, data.get("network", "?"), data.get("batch", "?")
    )
    return target


def draw_scaling(rows, path: Path, network: str, batch: int) -> None:
    """Throughput and parallel efficiency against the rank count (``bench scaling``'s picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            f"{path} needs matplotlib: pip install 'hpcnn[plots]' (scaling.json is written)"
        ) from None
    ranks = [r["ranks"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ranks, [r["samples_per_s"] for r in rows], "o-", label="measured")
    left.plot(ranks, [rows[0]["samples_per_s"] * n / ranks[0] for n in ranks], "--", label="ideal")
    left.set(xlabel="ranks", ylabel="samples/s", title=f"throughput ({network}, batch {batch})")
    left.legend()
    right.plot(ranks, [100 * r["efficiency"] for r in rows], "o-")
    right.set(xlabel="ranks", ylabel="%", title="parallel efficiency", ylim=(0, 110))
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _is_scaling(arg: Path) -> bool:
    if arg.is_file():
        return arg.name != METRICS
    return arg.is_dir() and not (arg / METRICS).exists() and (arg / SCALING).is_file()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcnn.plot",
        description=(
            "Draw PNG plots (loss, accuracy, learning rate, throughput, step-time breakdown, "
            "gradient norm) from training run directories' metrics.jsonl, overlaying several runs; "
            "a benchmark scaling.json (or its directory) gives scaling.png."
        ),
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="a run directory (or a scaling.json, or its directory)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the PNGs go (default: the directory given when there is one, else ./plots)",
    )
    p.add_argument(
        "--label",
        nargs="+",
        action="extend",
        metavar="NAME",
        default=None,
        help="legend names of the run directories, in order, one per run "
        "(default: the directory's name, with the rank count from facts.json)",
    )
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    paths = [Path(a) for a in args.runs]
    try:
        for path in paths:
            if not path.exists():
                raise UserError(f"{path}: no such file or directory")
        # A metrics.jsonl named directly stands for its run directory.
        run_dirs = [p.parent if p.name == METRICS and p.is_file() else p for p in paths if not _is_scaling(p)]
        scaling = [p for p in paths if _is_scaling(p)]
        if len(scaling) > 1:
            raise UserError(f"{len(scaling)} scaling reports: give one at a time (each is scaling.png)")
        _check_labels(args.label, run_dirs)
        if args.out is not None:
            out = Path(args.out)
        elif len(paths) == 1:
            out = run_dirs[0] if run_dirs else (scaling[0] if scaling[0].is_dir() else scaling[0].parent)
        else:
            out = Path("plots")
        _pyplot()  # say so before reading anything
        for path in plot_runs(run_dirs, out, args.label) if run_dirs else []:
            print(f"wrote {path}")
        if scaling:
            print(f"wrote {plot_scaling(scaling[0], out)}")
    except UserError as exc:
        print(f"hpcnn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
