"""Hostile data files, config files and flags: every run exits 0 or 2, with one message and no noise.

A seeded generator writes a few dozen HDF5 files, each a random valid layout (dtypes, shapes, held-out
pair or not, num_classes or not, chunked and compressed or not, datasets behind links or in groups)
with at most one defect (NaN/Inf in a split, a value beyond float32, a wrong shape, dtype or
attribute, a group or a dangling link, a corrupt chunk, a truncated file). Each is trained on with
the command's own entry point, in-process for most (``hpcnn.train.main``, ~0.1 s each) and as real
processes for a subset, some at 4 ranks under mpiexec: the exit code must be 0 for a valid file and
2 for a defect, with exactly one ``hpcnn: error:`` line naming the defect, no traceback and no numpy
warning, within a bounded time.
"""

import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import run

from hpcnn import evaluate as evaluate_command
from hpcnn import train
from hpcnn.parallel import comm as comm_module

SEED = 18
CASES = 64
SMALL = ["--hidden", "4", "--epochs", "1", "--batch-size", "16", "--eval-batch-size", "8", "--run-dir", ""]
LIMIT = 30.0  # seconds for one run, launch included
FLOAT = [np.float16, np.float32, np.float64]
INT = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64]


@dataclass
class Case:
    name: str
    path: Path
    args: list = field(default_factory=list)
    expect: str | None = None  # a regular expression the error line must match; None: exit 0


class Aborted(Exception):
    """Comm.abort in-process: the run would have ended the job as a rank failing alone."""


def _corrupt_chunk(path: Path, key: str, chunk: int) -> None:
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(chunk)
    data = bytearray(path.read_bytes())
    for i in range(info.byte_offset, info.byte_offset + info.size):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _write(path: Path, datasets: dict, attrs: dict, compress: bool) -> None:
    with h5py.File(path, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for key, value in datasets.items():
            if isinstance(value, (h5py.SoftLink, h5py.ExternalLink, h5py.Empty)):
                f[key] = value
            elif value is None:
                f.create_group(key)
            elif compress and np.ndim(value) >= 1 and np.size(value) and value.dtype.kind in "iuf":
                chunks = (min(8, len(value)),) + np.shape(value)[1:]
                f.create_dataset(key, data=value, chunks=chunks, compression="gzip")
            else:
                f[key] = value


DEFECTS = [
    None, None, None, None,  # valid files, a quarter of the cases
    "nan_x", "inf_x", "nan_x_test", "nan_y_target", "nan_y_test_target", "overflow_x", "x_1d", "x_5d",
    "x_0_features", "x_null", "y_rows", "x_bool", "x_complex", "x_strings", "x_records", "y_strings",
    "labels_negative", "labels_float", "labels_huge", "attr_float", "attr_string", "attr_one",
    "attr_small", "attr_huge", "x_group", "x_soft_dangling", "x_external_dangling", "corrupt_x",
    "corrupt_y", "truncated", "no_rows", "test_half", "test_features",
]  # fmt: skip


def make_case(rng, i: int, d: Path) -> Case:
    """A random valid layout with at most one defect, and what the run must say about it."""
    # each defect once, then half valid files, half defects drawn again (in other layouts)
    if i < len(DEFECTS):
        defect = DEFECTS[i]
    else:
        defect = None if rng.random() < 0.5 else DEFECTS[rng.integers(len(DEFECTS))]
    rows, features, classes = int(rng.integers(20, 60)), int(rng.integers(1, 6)), int(rng.integers(2, 5))
    regression = defect in ("nan_y_target", "nan_y_test_target") or (defect is None and rng.random() < 0.25)
    xdtype = np.float64 if defect == "overflow_x" else [*FLOAT, *INT][rng.integers(len(FLOAT) + len(INT))]
    x = rng.normal(size=(rows, features)) * 3
    if np.dtype(xdtype).kind == "u":  # small values: a negative one would wrap to ~1.8e19
        x = np.abs(x)
    x = x.astype(xdtype)
    if regression:
        y = rng.normal(size=(rows, int(rng.integers(1, 3)))).astype(FLOAT[rng.integers(1, 3)])
        y = y[:, 0] if y.shape[1] == 1 and rng.random() < 0.5 else y
    else:
        y = rng.integers(0, classes, rows).astype(INT[rng.integers(len(INT))])
    test_rows = int(rng.integers(5, 15))
    needs_test = ("nan_x_test", "nan_y_test_target", "test_half", "test_features")
    with_test = defect in needs_test or rng.random() < 0.5
    xt, yt = x[:test_rows].copy(), y[:test_rows].copy()
    attrs = {}
    if not regression and rng.random() < 0.4:
        attrs["num_classes"] = classes + int(rng.integers(0, 3))
    args = ["--loss", "mse"] if regression else []
    datasets = {"x": x, "y": y}
    path = d / f"case-{i:02d}-{defect or 'valid'}.h5"
    name = path.name
    row = int(rng.integers(0, rows))
    expect = None
    if defect in ("nan_x", "inf_x"):
        x = x.astype(np.float32) if x.dtype.kind != "f" else x
        x[row, rng.integers(features)] = np.nan if defect == "nan_x" else -np.inf
        datasets["x"] = x
        expect = rf"{name}: training row {row} has a non-finite input value \(NaN or Inf\), read for step"
    elif defect == "nan_x_test":
        xt = xt.astype(np.float32) if xt.dtype.kind != "f" else xt
        row = int(rng.integers(0, test_rows))
        xt[row, 0] = np.nan
        expect = rf"{name}: held-out row {row} has a non-finite input value \(NaN or Inf\): "
        expect += rf"'x_test'\[{row}, 0\]"
    elif defect == "nan_y_target":
        y.reshape(rows, -1)[row, 0] = np.inf
        expect = rf"{name}: training row {row} has a non-finite target value \(NaN or Inf\)"
    elif defect == "nan_y_test_target":
        row = int(rng.integers(0, test_rows))
        yt.reshape(test_rows, -1)[row, 0] = np.nan
        expect = rf"{name}: held-out row {row} has a non-finite target value"
    elif defect == "overflow_x":
        x[row, 0] = 1e39
        expect = rf"{name}: training row {row} has an input value beyond the range of float32, "
        expect += rf".*'x'\[{row}, 0\] = 1e\+39"
    elif defect == "x_1d":
        datasets["x"] = x[:, 0]
        expect = r"'x' must be \(rows, features\)"
    elif defect == "x_5d":  # 3-D and 4-D x are images
        datasets["x"] = x.reshape(rows, features, 1, 1, 1)
        expect = r"'x' must be \(rows, features\)"
    elif defect == "x_0_features":
        datasets["x"] = np.zeros((rows, 0), np.float32)
        expect = r"'x' has 0 features"
    elif defect == "x_null":
        datasets["x"] = h5py.Empty("f")
        expect = r"'x' must be \(rows, features\)"
    elif defect == "y_rows":
        datasets["y"] = np.zeros((rows + 3, 2), np.float32)
        args, expect = ["--loss", "mse"], r"with the same rows; got"
    elif defect == "x_bool":
        datasets["x"] = x > 0
        expect = r"'x' holds booleans"
    elif defect == "x_complex":
        datasets["x"] = x.astype(np.complex64)
        expect = r"'x' holds complex numbers"
    elif defect == "x_strings":
        datasets["x"] = x.astype("S8") if rng.random() < 0.5 else x.astype(str).astype(object)
        if datasets["x"].dtype == object:
            datasets["x"] = np.array(datasets["x"], dtype=h5py.string_dtype())
        expect = r"'x' holds strings"
    elif defect == "x_records":
        rec = np.zeros(rows, [("a", "f4"), ("b", "i4")])
        datasets["x"] = np.stack([rec] * 2, axis=1)
        expect = r"'x' holds records with fields \['a', 'b'\]"
    elif defect == "y_strings":
        datasets["y"] = np.array([str(v) for v in y], dtype=h5py.string_dtype())
        expect = r"'y' holds strings"
    elif defect == "labels_negative":
        y = y.astype(np.int64)
        y[row] = -3
        datasets["y"], attrs = y, {}
        expect = r"labels must be class indices >= 0, found -3"
    elif defect == "labels_float":
        datasets["y"], yt = y.astype(np.float32), yt.astype(np.float32)
        args, expect = [], r"'y' holds float32 targets; class labels for cross_entropy are 1-D integers"
    elif defect == "labels_huge":
        y = y.astype(np.int64)
        y[row] = 2**40
        datasets["y"], attrs = y, {}
        expect = r"1,099,511,627,777 classes \(the largest label \+ 1\) is more than hpcnn's limit of 65,536"
    elif defect == "attr_float":
        attrs["num_classes"] = classes + 0.5
        expect = rf"attribute num_classes = {classes + 0.5}: expected an integer"
    elif defect == "attr_string":
        attrs["num_classes"] = "ten"
        expect = r"attribute num_classes = 'ten': expected an integer"
    elif defect == "attr_one":
        attrs["num_classes"] = int(rng.choice([1, 0, -5]))
        expect = r"labels must be 0..C-1 with C >= 2 classes"
    elif defect == "attr_small":
        y = y.astype(np.int64)
        y[row] = 7
        datasets["y"], attrs = y, {"num_classes": 3}
        expect = r"label 7 is out of range for num_classes = 3"
    elif defect == "attr_huge":
        attrs["num_classes"] = 2**33
        expect = r"8,589,934,592 classes \(attribute num_classes\) is more than hpcnn's limit"
    elif defect == "x_group":
        datasets["x"] = None
        expect = r"'x' is a group, not a dataset"
    elif defect == "x_soft_dangling":
        datasets["x"] = h5py.SoftLink("/inputs")
        expect = r"'x' is a soft link to '/inputs', which does not exist"
    elif defect == "x_external_dangling":
        datasets["x"] = h5py.ExternalLink("elsewhere.h5", "/x")
        expect = r"'x' is an external link to '/x' in elsewhere.h5, which cannot be opened"
    elif defect == "no_rows":
        datasets["x"], datasets["y"] = x[:0], y[:0]
        expect = r"'x' has no rows"
    elif defect == "test_half":
        datasets["x_test"] = xt
        with_test = False
        expect = r"no dataset 'y_test'"
    elif defect == "test_features":
        xt = np.zeros((test_rows, features + 1), np.float32)
        expect = r"held-out rows have shape"
    elif defect in ("corrupt_x", "corrupt_y"):
        expect = rf"rows \d+-\d+ of dataset '/{defect[-1]}' cannot be read .*the file is damaged"
    elif defect == "truncated":
        expect = r"is not a readable HDF5 file|cannot be read"
    if defect is None and not regression and rng.random() < 0.3:  # a valid indirection
        datasets["inputs/x"] = datasets.pop("x")
        if rng.random() < 0.5:
            datasets["x"] = h5py.SoftLink("/inputs/x")
        else:
            args += ["--x-key", "inputs/x"]
    if with_test:
        datasets["x_test"], datasets["y_test"] = xt, yt
    compress = defect in ("corrupt_x", "corrupt_y") or rng.random() < 0.5
    _write(path, datasets, attrs, compress)
    if defect in ("corrupt_x", "corrupt_y"):
        _corrupt_chunk(path, defect[-1], int(rng.integers(0, rows // 8)))
    if defect == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])
    return Case(name, path, ["--data", str(path), *args], expect)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(SEED)
    return [make_case(rng, i, d) for i in range(CASES)]


def run_in_process(argv, capsys, command=train):
    """``command.main(argv)`` here: (exit code, stdout, stderr, numpy warnings, seconds)."""
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = command.main(argv)
    seconds = time.monotonic() - t0
    out, err = capsys.readouterr()
    return code, out, err, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], seconds


@pytest.fixture
def no_abort(monkeypatch):
    """In-process, a rank failing alone would MPI_Abort pytest itself: raise instead."""

    def abort(self, exc, debug=False):
        raise Aborted(f"{type(exc).__name__}: {exc}")

    monkeypatch.setattr(comm_module.Comm, "abort", abort)


def check(case: Case, code, out, err, noise, seconds) -> None:
    errors = [line for line in err.splitlines() if line.startswith("hpcnn:") and "error" in line]
    assert "Traceback" not in err and "Warning" not in err and not noise, (case.name, err, noise)
    assert seconds < LIMIT, (case.name, seconds)
    if case.expect is None:
        assert code == 0 and errors == [] and "final " in out, (case.name, code, err)
    else:
        assert code == 2 and len(errors) == 1, (case.name, code, err)
        assert errors[0].startswith("hpcnn: error: ") and re.search(case.expect, errors[0]), (case.name, err)
        assert "final " not in out


def test_fuzzed_files_in_process(cases, capsys, no_abort):
    """Every case at one rank, through ``hpcnn.train.main``."""
    failures = []
    for case in cases:
        try:
            check(case, *run_in_process([*SMALL, *case.args], capsys))
        except (AssertionError, Aborted) as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, "\n".join(failures)
    assert sum(c.expect is None for c in cases) >= 12 and sum(c.expect is not None for c in cases) >= 40


def launch(args, ranks=1, as_nobody=False):
    """``python -m hpcnn.train``: one process, or under mpiexec; return (process, seconds)."""
    prefix = AS_NOBODY if as_nobody else []
    proc = run(
        "hpcnn.train", args, ranks=ranks if ranks > 1 else None, threads=1, prefix=prefix, timeout=LIMIT
    )
    return proc, proc.seconds


AT_4 = ("nan_x_test", "overflow_x", "corrupt_x", "corrupt_y", "labels_huge", "nan_y_target", "valid")
REAL = [("nan_x_test", 1), ("corrupt_x", 1), ("valid", 1)] + [(kind, 4) for kind in AT_4]


@pytest.mark.launches
@pytest.mark.parametrize("kind,ranks", REAL)
def test_fuzzed_files_as_real_jobs(cases, kind, ranks):
    """A subset as real processes: the output a user sees, from every rank."""
    case = next(c for c in cases if c.name.endswith(f"-{kind}.h5"))
    proc, seconds = launch([*SMALL, *case.args], ranks)
    check(case, proc.returncode, proc.stdout, proc.stderr, [], seconds)


# --- each reported case, explicitly --------------------------------------------------------------


def _nan_held_out(tmp_path) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, 64)
    xt = x[:20].copy()
    xt[13, 4] = np.nan
    path = tmp_path / "nan-held-out.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x, y, xt, y[:20]
    return str(path)


PIPE, DET = ["--pipeline-stages", "2", "--hidden", "4,4"], ["--deterministic"]


@pytest.mark.launches
@pytest.mark.parametrize("ranks,extra", [(1, []), (4, []), (4, PIPE), (1, DET), (4, DET)])
def test_nan_in_held_out_rows_names_split_row_and_file(tmp_path, ranks, extra):
    path = _nan_held_out(tmp_path)
    proc, seconds = launch([*SMALL, "--data", path, *extra], ranks)
    assert proc.returncode == 2 and seconds < LIMIT, proc.stderr
    # hpcnn's lines only: Open MPI's mpirun adds a report of its own when a rank exits non-zero
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:")]
    assert ours == [
        f"hpcnn: error: {path}: held-out row 13 has a non-finite input value (NaN or Inf): "
        "'x_test'[13, 4] = nan; evaluation stopped"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert "held-out loss" not in proc.stdout and "final " not in proc.stdout


def test_a_held_out_nan_also_stops_the_scoring_of_a_checkpoint(tmp_path, capsys, no_abort):
    """``python -m hpcnn.evaluate`` reads held-out rows through the same check; ``--predict``
    refuses to write predictions for rows with NaN."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
    good, scored, inputs = tmp_path / "good.h5", tmp_path / "scored.h5", tmp_path / "inputs.h5"
    with h5py.File(good, "w") as f:
        f["x"], f["y"] = x, y
    ckpt = tmp_path / "ckpt"
    code, *_ = run_in_process([*SMALL, "--data", str(good), "--checkpoint-dir", str(ckpt)], capsys)
    assert code == 0
    (checkpoint,) = ckpt.glob("ckpt-*.h5")
    x_test = x[:20].copy()
    x_test[13, 0] = np.nan
    with h5py.File(scored, "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x, y, x_test, y[:20]
    score = ["--checkpoint", str(checkpoint), "--data", str(scored)]
    code, out, err, noise, _ = run_in_process(score, capsys, evaluate_command)
    assert code == 2 and not noise and out == "", err
    assert err == (
        f"hpcnn: error: {scored}: held-out row 13 has a non-finite input value (NaN or Inf): "
        "'x_test'[13, 0] = nan; evaluation stopped\n"
    )
    x[7, 1] = np.inf
    with h5py.File(inputs, "w") as f:
        f["x"] = x
    out_file = tmp_path / "pred.h5"
    predict = ["--checkpoint", str(checkpoint), "--data", str(inputs), "--predict", str(out_file)]
    code, out, err, noise, _ = run_in_process(predict, capsys, evaluate_command)
    assert code == 2 and not noise and not out_file.exists(), err
    assert err == (
        f"hpcnn: error: {inputs}: row 7 has a non-finite input value (NaN or Inf): 'x'[7, 1] = inf; "
        "no predictions written\n"
    )


def test_a_value_beyond_float32_is_a_data_problem_not_an_lr_hint(tmp_path, capsys, no_abort):
    x = np.random.default_rng(2).normal(size=(32, 4))
    x[21, 3] = -3e40  # finite in the float64 file, -inf once cast to float32
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, np.arange(32) % 2
    code, out, err, noise, _ = run_in_process([*SMALL, "--data", str(path)], capsys)
    assert code == 2 and not noise
    assert err.startswith(
        f"hpcnn: error: {path}: training row 21 has an input value beyond the range of float32, read for step"
    ), err
    assert "'x'[21, 3] = -3e+40 (float32 reaches 3.403e+38); rescale the inputs or train with --dtype" in err
    assert "--lr" not in err
    code, out, err, noise, _ = run_in_process([*SMALL, "--data", str(path), "--dtype", "float64"], capsys)
    assert code == 0 and not noise, err  # float64 holds it


def test_enormous_class_counts_are_refused_before_any_allocation(tmp_path, capsys, no_abort):
    path = tmp_path / "classes.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = np.zeros((10, 2), np.float32), np.arange(10) % 2
        f.attrs["num_classes"] = 2**34
    code, out, err, noise, seconds = run_in_process([*SMALL, "--data", str(path)], capsys)
    assert code == 2 and seconds < 5
    assert err == (
        f"hpcnn: error: {path}: 17,179,869,184 classes (attribute num_classes) is more than hpcnn's limit of "
        "65,536; labels must be class indices 0..C-1\n"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "inf"], "lr = inf: must be a finite number"),
        (["--stall-timeout", "nan"], "stall_timeout = nan: must be a finite number"),
        (["--clip-norm", "nan"], "clip_norm = nan: must be a finite number"),
        (["--hidden", "100000000000"], "the model does not fit in memory"),
    ],
)
def test_bad_flags_are_exit_2_in_one_line(argv, message, capsys, no_abort):
    code, out, err, noise, _ = run_in_process([*SMALL, *argv], capsys)
    assert code == 2 and err.startswith(f"hpcnn: error: {message}") and err.count("\n") == 1, err
    assert "epoch" not in out


def test_config_file_that_is_a_directory_or_not_utf8(tmp_path, capsys, no_abort):
    (tmp_path / "latin1.toml").write_bytes('activation = "tanh" # café\n'.encode("latin-1"))
    for path, message in [
        (tmp_path, f"config file {tmp_path} is a directory; name a TOML file"),
        (tmp_path / "latin1.toml", f"config file {tmp_path / 'latin1.toml'} is not UTF-8 text (byte 25)"),
    ]:
        code, out, err, _, _ = run_in_process([*SMALL, "--config", str(path)], capsys)
        assert code == 2 and err.startswith(f"hpcnn: error: {message}") and err.count("\n") == 1, err


def test_timeline_naming_a_directory_is_refused_before_the_first_step(tmp_path, capsys, no_abort):
    code, out, err, _, _ = run_in_process([*SMALL, "--data", "xor", "--timeline", str(tmp_path)], capsys)
    assert code == 2 and err == f"hpcnn: error: timeline {tmp_path} is a directory; name a file\n"
    assert "step " not in out and "epoch " not in out


def _world_readable_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="hpcnn-perm-"))
    d.chmod(0o755)
    return d


SETPRIV = shutil.which("setpriv")
AS_NOBODY = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_can_run_hpcnn() -> bool:
    """Whether nobody can import this Python's hpcnn and its dependencies (not where they live in a
    private directory, such as a virtual environment under a 700 home or mktemp directory)."""
    return run("import numpy, h5py, mpi4py, hpcnn", prefix=AS_NOBODY, timeout=LIMIT).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to run as nobody")
def test_unreadable_files_and_unwritable_outputs_as_another_user(tmp_path):
    """Root reads and writes anywhere, so the run is started as nobody (uid 65534, with setpriv) on
    root-owned files and directories."""
    if not _nobody_can_run_hpcnn():
        pytest.skip(f"nobody cannot import hpcnn's dependencies from {sys.prefix} (a private directory)")
    d = _world_readable_dir()
    try:
        path = Path(_nan_held_out(tmp_path))
        (d / "locked.h5").write_bytes(path.read_bytes())
        (d / "locked.h5").chmod(0)
        (d / "locked.toml").write_text("epochs = 1\n")
        (d / "locked.toml").chmod(0)
        data, config, timeline = d / "locked.h5", d / "locked.toml", d / "t.json"
        for args, message in [
            (["--data", str(data)], f"data file {data} cannot be read: permission denied"),
            (["--config", str(config)], f"config file {config} cannot be read: Permission denied"),
            (["--data", "xor", "--timeline", str(timeline)], f"timeline {timeline}: cannot write there"),
            (["--data", "xor", "--run-dir", str(d)], f"run_dir {d}: cannot create it: [Errno 13] Permission"),
        ]:
            proc, seconds = launch([*SMALL, *args], as_nobody=True)
            assert proc.returncode == 2 and seconds < LIMIT, proc.stderr
            err = proc.stderr
            assert err.startswith(f"hpcnn: error: {message}") and err.count("\n") == 1, err
            assert "epoch " not in proc.stdout
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_a_held_out_loss_that_overflows_on_finite_rows_is_no_score(tmp_path, capsys, no_abort):
    """3e37 is a float32, but the model's squared error on it is not: exit 3, not a loss of inf."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 3)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    x_test = x[:8].copy()
    x_test[5, 1] = 3e37
    path = tmp_path / "large.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x, y, x_test, y[:8]
    code, out, err, noise, _ = run_in_process([*SMALL, "--data", str(path), "--loss", "mse"], capsys)
    assert code == 3 and not noise and "final " not in out
    assert err == (
        f"hpcnn: error: {path}: the held-out loss is inf although every held-out value is finite: the "
        "model's outputs or the loss overflow float32 (rescale the data, or train with a lower --lr or "
        "--clip-norm)\n"
    )
