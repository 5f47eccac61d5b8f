"""What a training run leaves behind and what it shows while it runs (rank 0 writes and prints).

**Run directory** (``--run-dir``; ``auto``: ``runs/<YYYYmmdd-HHMMSS>``, a suffix added if taken;
empty: none). Rank 0 creates it and writes:

- ``config.toml``: the resolved config (``--config`` reads it back);
- ``command.txt``: each launch's command line, ranks and start time, one line per launch;
- ``facts.json``: ranks, stages, replicas, micro-batches, BLAS threads, MPI library, versions, hosts;
- ``metrics.jsonl``: one JSON object per line: ``{"kind": "step", ...}`` every ``--log-every``
  steps (loss, accuracy, learning rate, gradient norm, samples/s over the interval, seconds per
  step split into data / forward_backward / reduce / optimizer / other, averaged over ranks),
  ``{"kind": "epoch", ...}`` per epoch (the epoch line's numbers and held-out scores), and one
  ``{"kind": "final", ...}`` or ``{"kind": "stopped", ...}`` at the end;
- ``checkpoints/``: the checkpoints, unless ``--checkpoint-dir`` says otherwise.

A resumed run that names the same directory appends to ``metrics.jsonl`` and ``command.txt``.
``python -m hpcnn.plot RUN_DIR`` draws the metrics.

**Progress** on rank 0: on a terminal (also through ``mpirun`` typed at a prompt), a tqdm bar per
epoch (loss, accuracy, samples/s, ETA of the whole run), with the usual lines written above it;
otherwise (a SLURM output file) a plain line every ``--log-every`` steps. ``--quiet`` prints
neither, nor the epoch lines.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

STEP_TIMES = ("data", "forward_backward", "reduce", "optimizer", "other")
# Processes that stand between a rank and the user's screen, passing its output on (comm names are
# at most 15 characters).
LAUNCHERS = {"mpiexec", "mpirun", "mpiexec.hydra", "hydra_pmi_proxy", "mpirun.openmpi", "mpiexec.openmpi",
             "mpirun.mpich", "mpiexec.mpich", "orted", "orterun", "prterun", "prted"}  # fmt: skip


def _launcher_output(pid: int) -> str | None:
    """Where the launcher above ``pid`` writes (its stdout's target), or ``None`` if ``pid`` is
    not a launcher. Looks through a few launcher levels (rank <- hydra_pmi_proxy <- mpiexec)."""
    target = None
    for _ in range(4):
        if Path(f"/proc/{pid}/comm").read_text().strip() not in LAUNCHERS:
            return target
        target = os.readlink(f"/proc/{pid}/fd/1")
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return target
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return target


def on_terminal() -> bool:
    """Whether this process's output ends up on a terminal. Under an MPI launcher that is decided
    by the launcher's own stdout (``mpirun -n 8 python -m hpcnn.train`` typed at a prompt: yes;
    the same with ``> file`` or in a batch job: no), whatever the rank's stdout is (Open MPI gives
    each rank a pseudo-terminal of its own). Without a launcher: whether stdout is a terminal."""
    try:
        target = _launcher_output(os.getppid())
    except (OSError, ValueError, IndexError):  # not Linux, or a parent gone or not ours
        target = None
    if target is not None:
        return target.startswith(("/dev/pts/", "/dev/tty"))
    return sys.stdout.isatty()


def _unique(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first name free, created atomically."""
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: no free name")


class RunDir:
    """A run directory; create with ``RunDir.create`` on rank 0 only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._start = None  # (config TOML, argv, facts), written once training has accepted the directory
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():  # a resumed run: drop a record torn by the kill that ended the last one
            data = metrics.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(metrics, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self._metrics = open(metrics, "a")  # noqa: SIM115  (open for the run; close())

    @classmethod
    def create(cls, spec: str) -> "RunDir":
        """``spec``: a directory (created if missing, reused if present: a resumed run) or
        ``auto``. Raises ``OSError`` if it cannot be created or written."""
        if spec == "auto":
            path = _unique(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        else:
            path = Path(spec)
            path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def prepare(self, config_toml: str, argv, facts: dict) -> None:
        self._start = (config_toml, argv, facts)

    def write_start(self) -> None:
        """Write what ``prepare`` was given (after the run has checked its checkpoint directory:
        a refused run changes nothing)."""
        if self._start is None:
            return
        config_toml, argv, facts = self._start
        (self.path / "config.toml").write_text(config_toml)
        (self.path / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
        command = shlex.join([Path(sys.executable).name, "-m", "hpcnn.train", *argv])
        with open(self.path / "command.txt", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  ranks={facts.get('ranks')}  {command}\n")

    def add_facts(self, values: dict) -> None:
        """Add ``values`` to ``facts.json`` (what is known only at the end: measured memory)."""
        path = self.path / "facts.json"
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):  # not written (a refused start) or damaged: these facts alone
            facts = {}
        path.write_text(json.dumps({**facts, **values}, indent=2) + "\n")

    def record(self, kind: str, values: dict) -> None:
        # One line per record, flushed: a run killed at any moment leaves whole lines (but the last).
        self._metrics.write(json.dumps({"kind": kind, **values}, allow_nan=True) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()

    def discard_if_unused(self) -> None:
        """Remove the directory if the run ended before writing anything into it."""
        self.close()
        if all(p.name == "metrics.jsonl" and p.stat().st_size == 0 for p in self.path.iterdir()):
            (self.path / "metrics.jsonl").unlink()
            self.path.rmdir()


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rank 0's output during training: ``log`` for lines, ``step`` after every step.

    ``mode``: ``bar`` (tqdm on a terminal), ``lines`` (a line every ``log_every`` steps) or
    ``quiet``. Other ranks get ``Progress.silent()``.
    """

    def __init__(self, mode: str, total_steps: int, steps_per_epoch: int, epochs: int, sink=print):
        self.mode, self.total, self.per_epoch, self.epochs = mode, total_steps, steps_per_epoch, epochs
        self.sink = sink  # where lines go (rank 0's print)
        self._bar, self._bar_epoch, self._started, self._done_at_start = None, None, None, 0
        if mode == "bar":
            from tqdm import tqdm

            self._tqdm = tqdm

    @classmethod
    def choose(
        cls, quiet: bool, total_steps: int, steps_per_epoch: int, epochs: int, sink=print, bar: bool = True
    ) -> "Progress":
        """The bar only where someone watches (``on_terminal``), ``bar`` allows it (``sink`` prints
        to stdout) and tqdm is installed."""
        if quiet:
            return cls("quiet", total_steps, steps_per_epoch, epochs, sink)
        mode = "lines"
        if bar and on_terminal():
            try:
                import tqdm  # noqa: F401

                mode = "bar"
            except ImportError:
                pass
        return cls(mode, total_steps, steps_per_epoch, epochs, sink)

    @classmethod
    def silent(cls) -> "Progress":
        return cls("quiet", 0, 1, 1)

    def log(self, text: str) -> None:
        """A line (start-up facts, epochs, checkpoints): above the bar, or as it is; none when quiet."""
        if self.mode == "bar":
            self._tqdm.write(text)
        elif self.mode == "lines":
            self.sink(text)

    def step(self, step: int, epoch: int, batch: int, record: dict | None) -> None:
        """After ``step`` steps (``batch`` of epoch ``epoch``, 0-based epoch); ``record``: the
        metrics of the interval that ended here, if one did."""
        if self.mode == "quiet":  # every rank but 0 calls this every step: nothing to do there
            return
        now = time.monotonic()
        if self._started is None:
            self._started, self._done_at_start = now, step - 1
        rate = (step - self._done_at_start) / max(now - self._started, 1e-9)
        eta = _eta((self.total - step) / rate) if rate > 0 else "?"
        if self.mode == "bar":
            if self._bar_epoch != epoch:
                self.close()
                desc = f"epoch {epoch + 1}/{self.epochs}"
                self._bar = self._tqdm(total=self.per_epoch, initial=batch - 1, desc=desc, unit="step",
                                       leave=False, dynamic_ncols=True)  # fmt: skip
                self._bar_epoch = epoch
            self._bar.update(1)
            if record is not None:
                self._bar.set_postfix_str(_summary(record) + f"  ETA {eta}")  # redraws: once per record
        elif self.mode == "lines" and record is not None:
            self.sink(
                f"step {step}/{self.total} (epoch {epoch + 1}/{self.epochs})  {_summary(record)}  ETA {eta}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_epoch = None, None


def _summary(r: dict) -> str:
    text = f"loss {r['loss']:.4f}"
    if r.get("accuracy") is not None:
        text += f"  acc {100 * r['accuracy']:6.2f}%"
    return text + f"  lr {r['lr']:.2e}  {r['samples_per_s']:,.0f} samples/s"
