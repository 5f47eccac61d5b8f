"""Training settings as data: one dataclass, fed by a TOML file and ``--flag`` overrides.

Every field is a key of the TOML file and a flag (``batch_size`` <-> ``--batch-size``); flags
override the file, the file overrides the defaults. An unknown key, a wrong type or an invalid
value is a ``UserError`` that names the key and what is expected. The resolved config is what a
run prints, and what later features (checkpoints, run directories) store.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields

from hpcnn.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default, help: str, choices=None, group: str = "training"):
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- model
    model: str = _f(
        "mlp",
        "the network: mlp (Dense layers of --hidden widths), lenet (1x28x28 images), cnn-digits (small "
        "images such as digits' 1x8x8), cnn-cifar (3x32x32, the benchmark's), or a model file FILE.toml "
        "(docs/data.md)",
        group="model",
    )
    hidden: list = _f(
        [256, 128],
        "hidden layer widths of --model mlp, comma-separated (empty: no hidden layer)",
        group="model",
    )
    activation: str = _f(
        "relu",
        "activation between layers (gelu: exact, with erf; gelu_tanh: its tanh approximation)",
        ["relu", "gelu", "gelu_tanh", "tanh", "sigmoid"],
        "model",
    )
    output_activation: str = _f(
        "identity", "activation after the last layer", ["identity", "sigmoid", "tanh"], "model"
    )
    loss: str = _f(
        "cross_entropy",
        "loss: fused softmax cross-entropy or mean squared error",
        ["cross_entropy", "mse"],
        "model",
    )
    dtype: str = _f(
        "float32", "floating-point type of parameters and activations", ["float32", "float64"], "model"
    )
    # --- data
    data: str = _f("digits", "built-in dataset (digits, xor, synthetic) or an HDF5 file", group="data")
    x_key: str = _f("x", "inputs dataset in the HDF5 file", group="data")
    y_key: str = _f("y", "labels dataset in the HDF5 file", group="data")
    test_x_key: str = _f("x_test", "held-out inputs dataset (used if present)", group="data")
    test_y_key: str = _f("y_test", "held-out labels dataset (used if present)", group="data")
    test_fraction: float = _f(
        0.0, "hold out this fraction of the rows when the file has no held-out datasets", group="data"
    )
    image_layout: str = _f(
        "nchw",
        "how a data file's 4-D inputs are stored: (rows, C, H, W) or (rows, H, W, C); 3-D inputs are "
        "(rows, H, W), one channel",
        ["nchw", "nhwc"],
        "data",
    )
    synthetic_rows: int = _f(10000, "rows of the synthetic dataset", group="data")
    synthetic_features: int = _f(32, "features of the synthetic dataset", group="data")
    synthetic_image: str = _f(
        "",
        "make the synthetic rows images of this shape, CxHxW such as 3x32x32 (replaces synthetic_features)",
        group="data",
    )
    synthetic_classes: int = _f(10, "classes of the synthetic dataset", group="data")
    synthetic_seed: int = _f(0, "seed of the synthetic dataset", group="data")
    # --- training
    epochs: int = _f(30, "passes over the training rows")
    batch_size: int = _f(64, "global batch size: rows per step summed over all ranks")
    drop_last: bool = _f(False, "drop the last partial batch of each epoch")
    seed: int = _f(0, "seed for initialisation and shuffling")
    eval_batch_size: int = _f(4096, "held-out rows read and evaluated at a time, per data-parallel replica")
    eval_every: int = _f(1, "evaluate the held-out rows every this many epochs (0: only at the end)")
    max_steps: int = _f(0, "stop after this many optimizer steps in all (0: run every epoch)")
    deterministic: bool = _f(
        False,
        "bitwise-identical training on any number of ranks and any data x pipeline layout (and across "
        "restarts on another layout), for the same shard_rows",
    )
    shard_rows: int = _f(
        0,
        "with --deterministic: rows per shard, the fixed unit of computation; a replica holds whole shards, "
        "so batch_size / shard_rows replicas can be busy (0: batch_size / 4, rounded up)",
    )
    # --- parallel layout
    pipeline_stages: int = _f(
        1, "pipeline stages P: ranks form (ranks / P) data-parallel replicas x P stages", group="parallel"
    )
    stage_layers: list = _f(
        [], "first layer index of stages 1..P-1, comma-separated (empty: balance by FLOPs)", group="parallel"
    )
    micro_batches: int = _f(
        1, "micro-batches M each replica's share of a global batch is cut into", group="parallel"
    )
    schedule: str = _f(
        "1f1b",
        "pipeline schedule: 1f1b (at most P micro-batches alive) or gpipe",
        ["1f1b", "gpipe"],
        "parallel",
    )
    overlap: str = _f(
        "on",
        "reduce gradient buckets during backward (on) or in one Allreduce after it (off)",
        ["on", "off"],
        "parallel",
    )
    bucket_mb: float = _f(2.0, "gradient bucket size in MiB for the overlapped reduction", group="parallel")
    zero: int = _f(
        0,
        "shard over the data-parallel replicas: 1 the optimizer state, 2 also the gradients (ZeRO); 0 none",
        [0, 1, 2],
        "parallel",
    )
    # --- optimizer
    optimizer: str = _f("adam", "optimizer", ["sgd", "adam", "adamw"], "optimizer")
    lr: float = _f(1e-3, "peak learning rate", group="optimizer")
    momentum: float = _f(0.0, "SGD momentum (0: plain SGD, keeping no velocity state)", group="optimizer")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)", group="optimizer")
    beta1: float = _f(0.9, "Adam/AdamW first-moment decay", group="optimizer")
    beta2: float = _f(0.999, "Adam/AdamW second-moment decay", group="optimizer")
    eps: float = _f(1e-8, "Adam/AdamW epsilon", group="optimizer")
    weight_decay: float = _f(
        0.0, "L2 weight decay (decoupled for AdamW), on all parameters", group="optimizer"
    )
    lr_schedule: str = _f("cosine", "learning-rate schedule", ["constant", "step", "cosine"], "optimizer")
    warmup_steps: int = _f(0, "linear warm-up steps before the schedule", group="optimizer")
    step_size: int = _f(1000, "steps between decays of the step schedule", group="optimizer")
    gamma: float = _f(0.1, "decay factor of the step schedule", group="optimizer")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule", group="optimizer")
    clip_norm: float = _f(0.0, "clip the global gradient norm to this (0: no clipping)", group="optimizer")
    # --- privacy
    dp_sgd: bool = _f(
        False,
        "differentially private training (DP-SGD): each example's gradient clipped to max_grad_norm, "
        "Gaussian noise added to the sum, the privacy spent accounted (docs/privacy.md)",
        group="privacy",
    )
    max_grad_norm: float = _f(1.0, "DP-SGD: each example's gradient norm is clipped to this", group="privacy")
    noise_multiplier: float = _f(
        0.0,
        "DP-SGD: noise standard deviation over max_grad_norm (0: the one that spends target_epsilon "
        "by the last step)",
        group="privacy",
    )
    target_epsilon: float = _f(
        0.0,
        "DP-SGD: the privacy budget; training stops before a step would spend more (0: no budget, "
        "then noise_multiplier is required)",
        group="privacy",
    )
    target_delta: float = _f(
        0.0,
        "DP-SGD: delta of (epsilon, delta) (0: 1 / training rows, rounded down to a power of 10)",
        group="privacy",
    )
    accountant: str = _f(
        "rdp", "DP-SGD: privacy accountant of dp-accounting (RDP or PLD)", ["rdp", "pld"], "privacy"
    )
    sampling: str = _f(
        "poisson",
        "DP-SGD batches: poisson (each row in with probability batch_size / rows, what the accountant "
        "assumes) or shuffle (fixed-size batches; the guarantee then does not hold as stated)",
        ["poisson", "shuffle"],
        "privacy",
    )
    # --- checkpoints
    checkpoint_dir: str = _f(
        "", "write checkpoints into this directory (empty: write none)", group="checkpoint"
    )
    checkpoint_every: int = _f(
        0, "also write a checkpoint every this many steps (0: at the end and on a signal)", group="checkpoint"
    )
    checkpoint_every_epochs: int = _f(0, "also write a checkpoint every this many epochs", group="checkpoint")
    keep: int = _f(3, "keep the newest this many checkpoints in checkpoint_dir (0: all)", group="checkpoint")
    resume: str = _f(
        "", "resume from this checkpoint file, or auto: newest good one in checkpoint_dir", group="checkpoint"
    )
    checkpoint_io: str = _f(
        "auto",
        "checkpoint writer: mpio (parallel HDF5), gather (rank 0 writes), auto (mpio where available)",
        ["auto", "mpio", "gather"],
        "checkpoint",
    )
    # --- failures
    stall_timeout: float = _f(
        0.0,
        "end the job when a rank makes no progress for this many seconds (0: 20 x the longest step, >= 60 s)",
        group="failures",
    )
    check_replicas: int = _f(
        0,
        "every this many steps, check that data-parallel replicas hold identical parameters (0: never)",
        group="failures",
    )
    elastic: int = _f(
        0,
        "survive dead ranks: go on with the survivors while at least this many ranks are left, else "
        "checkpoint and exit 75 (needs Open MPI's ULFM: mpiexec --with-ft ulfm; docs/elastic.md); 0: a "
        "dead rank ends the job",
        group="failures",
    )
    # --- run
    threads: int = _f(
        0, "BLAS threads per rank (0: cores // ranks per node, or OMP_NUM_THREADS)", group="run"
    )
    debug: bool = _f(False, "print tracebacks with errors", group="run")
    # --- output
    run_dir: str = _f(
        "auto",
        "directory for the run's config, facts, metrics.jsonl and (without checkpoint_dir) checkpoints; "
        "auto: runs/<date-time>; empty: none (python -m hpcnn.train only)",
        group="output",
    )
    log_every: int = _f(
        50,
        "a metrics record (and, off a terminal, a progress line) every this many steps (0: none)",
        group="output",
    )
    quiet: bool = _f(
        False,
        "print no progress, epoch or checkpoint lines (start-up facts, the final line and errors only)",
        group="output",
    )
    timeline: str = _f(
        "",
        "write a Chrome trace-event JSON of every rank's spans to this file (view in Perfetto)",
        group="output",
    )

    def validate(self) -> "Config":
        """Check values that types alone do not; raise ``UserError`` naming the key."""
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                expected = ", ".join(map(str, choices))
                raise UserError(f"{f.name} = {getattr(self, f.name)!r}: expected one of {expected}")
            # TOML's nan/inf and float("inf") from a flag pass every comparison below that NaN fails
            # silently or infinity passes (lr = inf, stall_timeout = nan)
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{f.name} = {getattr(self, f.name)}: must be a finite number")
            if f.type is str and "\0" in getattr(self, f.name):  # TOML's "\u0000": no path or name holds one
                raise UserError(f"{f.name} = {getattr(self, f.name)!r}: contains a NUL character")
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "synthetic_rows",
            "synthetic_features",
            "step_size",
            "pipeline_stages",
            "micro_batches",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be a positive integer")
        for key in (
            "eval_every",
            "max_steps",
            "warmup_steps",
            "threads",
            "checkpoint_every",
            "keep",
            "check_replicas",
            "elastic",
            "shard_rows",
            "stall_timeout",
            "log_every",
        ):
            if getattr(self, key) < 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be >= 0")
        for key in ("lr", "eps", "bucket_mb"):
            if not getattr(self, key) > 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be > 0")
        for key in ("weight_decay", "clip_norm", "min_lr"):
            if not getattr(self, key) >= 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be >= 0")
        for key in ("seed", "synthetic_seed"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be >= 0")
        if not self.gamma > 0:
            raise UserError(f"gamma = {self.gamma}: must be > 0")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr = {self.min_lr} is above lr = {self.lr}")
        for key in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"{key} = {getattr(self, key)}: must be in [0, 1)")
        if not 0 <= self.test_fraction < 1:
            raise UserError(f"test_fraction = {self.test_fraction}: must be in [0, 1)")
        if self.synthetic_classes < 2:
            raise UserError(f"synthetic_classes = {self.synthetic_classes}: must be >= 2")
        if not (self.model in MODELS or self.model.endswith(".toml")):
            raise UserError(f"model = {self.model!r}: expected one of {', '.join(MODELS)} or a FILE.toml")
        if self.synthetic_image:
            chw_shape(self.synthetic_image, "synthetic_image")
        if any(w <= 0 for w in self.hidden):
            raise UserError(f"hidden = {self.hidden}: widths must be positive integers")
        if self.nesterov and self.momentum == 0:
            raise UserError("nesterov needs momentum > 0")
        if self.checkpoint_every_epochs < 0:
            raise UserError(f"checkpoint_every_epochs = {self.checkpoint_every_epochs}: must be >= 0")
        self._validate_privacy()
        if self.resume == "auto" and not self.checkpoint_dir and self.run_dir in ("", "auto"):
            raise UserError(
                "resume = 'auto' looks in checkpoint_dir (or run_dir/checkpoints): name one with "
                "--checkpoint-dir or --run-dir"
            )
        return self

    def _validate_privacy(self) -> None:
        for key in ("noise_multiplier", "target_epsilon", "target_delta"):
            if not getattr(self, key) >= 0:
                raise UserError(f"{key} = {getattr(self, key)}: must be >= 0")
        if not self.max_grad_norm > 0:
            raise UserError(f"max_grad_norm = {self.max_grad_norm}: must be > 0")
        if not self.target_delta < 1:
            raise UserError(f"target_delta = {self.target_delta}: must be below 1")
        if not self.dp_sgd:
            return
        if not (self.noise_multiplier or self.target_epsilon):
            raise UserError(
                "dp_sgd needs the noise: --noise-multiplier SIGMA, or --target-epsilon E to solve for it"
            )
        refused = {
            "deterministic": "deterministic mode's per-shard gradients",
            "zero": "--zero's sharded gradients",
        }
        for key, what in refused.items():
            if getattr(self, key):
                raise UserError(f"dp_sgd with {key}: {what} are not clipped per example yet; drop one")
        if self.elastic:
            raise UserError(
                "dp_sgd with elastic: a recovery's state held in memory does not carry the privacy "
                "accountant yet; drop one (a private run resumes exactly from its checkpoints)"
            )

    def to_toml(self) -> str:
        """The resolved config as a TOML document (readable by ``--config``)."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                text = str(v).lower()
            elif isinstance(v, str):
                text = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(v)
            lines.append(f"{f.name} = {text}")
        return "\n".join(lines) + "\n"


# The built-in models (``hpcnn.models``, which builds them: config parsing imports no numpy).
MODELS = ("mlp", "lenet", "cnn-digits", "cnn-cifar")


def chw_shape(text: str, key: str) -> tuple[int, int, int]:
    """``CxHxW`` (such as ``3x32x32``) as hpcnn's row shape ``(H, W, C)``; ``UserError`` naming ``key``."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"{key} = {text!r}: expected CxHxW with positive integers, such as 3x32x32")
    c, h, w = map(int, parts)
    return (h, w, c)


def _coerce(key: str, value, kind, where: str):
    """``value`` as ``kind``, or a ``UserError`` naming the key and the expected type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:  # float() would raise OverflowError
            raise UserError(f"{where}: {key} = {value}: must be a finite number")
        return float(value)
    if kind is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise UserError(f"{where}: {key} = {value!r}: expected a list of integers, e.g. [256, 128]")
    if type(value) is not kind:
        raise UserError(f"{where}: {key} = {value!r}: expected {kind.__name__}")
    return value


def int_list(text: str) -> list:
    try:
        return [int(w) for w in text.replace(" ", "").split(",") if w]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 256,128; got {text!r}"
        ) from None


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` instead of exiting, and prints (help) on rank 0 only."""

    def __init__(self, *args, is_root: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_root = is_root

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def _print_message(self, message, file=None):
        if self.is_root:
            super()._print_message(message, file)


def build_parser(prog: str = "python -m hpcnn.train", is_root: bool = True) -> argparse.ArgumentParser:
    """The training command line: one flag per ``Config`` field, plus ``--config FILE.toml``."""
    p = Parser(
        prog=prog,
        is_root=is_root,
        description="Train a neural network with data-parallel SPMD over MPI "
        "(run under mpirun/srun; any number of ranks).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config", metavar="FILE.toml", help="TOML file whose keys are the flags' names with _ for -"
    )
    groups = {}
    defaults = Config()
    for f in fields(Config):
        group = groups.get(f.metadata["group"]) or p.add_argument_group(f.metadata["group"])
        groups[f.metadata["group"]] = group
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        kind = f.type
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is list:
            group.add_argument(flag, type=int_list, metavar="N,N,...", help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=f.metadata["choices"], help=help_text)
    return p


def load_toml(path: str, what: str = "config file") -> dict:
    """The TOML file ``path`` as a dict; ``UserError`` naming ``what`` if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory; name a TOML file") from None
    except OSError as exc:  # permissions, a file that fails to read
        raise UserError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (tomllib decodes before parsing)
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}), as TOML must be") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}") from None


def resolve(argv=None, is_root: bool = True) -> Config:
    """Defaults, then the ``--config`` file, then the flags; validated."""
    args = vars(build_parser(is_root=is_root).parse_args(argv))
    path = args.pop("config", None)
    cfg = from_dict(load_toml(path), path) if path is not None else Config()
    cfg = dataclasses.replace(cfg, **args)
    return cfg.validate()


def parse_toml(text: str) -> dict:
    return tomllib.loads(text)


def from_dict(values: dict, where: str) -> Config:
    """A ``Config`` from TOML keys (defaults for the keys not given); ``where`` names the source."""
    cfg = Config()
    kinds = {f.name: f.type for f in fields(Config)}
    for key, value in values.items():
        if key not in kinds:
            raise UserError(f"{where}: unknown key {key!r}; valid keys: {', '.join(kinds)}")
        setattr(cfg, key, _coerce(key, value, kinds[key], where))
    return cfg


# Keys whose change on resume alters the data order or the optimisation (layout, I/O and
# reporting keys may change freely: resuming on another layout is the point).
TRAINING_GROUPS = ("model", "data", "training", "optimizer")


def config_changes(saved_toml: str, cfg: Config) -> list[str]:
    """``key value (checkpoint: value)`` for each training setting that differs from a saved config."""
    saved = parse_toml(saved_toml)
    changes = []
    for f in fields(Config):
        now = getattr(cfg, f.name)
        if f.metadata["group"] in TRAINING_GROUPS and f.name in saved and saved[f.name] != now:
            changes.append(f"{f.name} {getattr(cfg, f.name)!r} (checkpoint: {saved[f.name]!r})")
    return changes
