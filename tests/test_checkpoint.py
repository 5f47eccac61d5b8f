"""Checkpoints at one rank: the file layout, exact resume, corrupt files, refusals, crashes, tools.

Multi-rank resumes (same and different layouts, a signal on one rank) are in
``test_checkpoint_mpi.py`` and, through ``mpiexec``, at the end of this file.
"""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import Job, run, start

from hpcnn.config import Config, from_dict, parse_toml
from hpcnn.errors import EXIT_IO, JobError
from hpcnn.io import checkpoints as checkpoint
from hpcnn.io.checkpoints import checkpoints, inspect, verify, writers
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit
from hpcnn.training import engine

# digits: 1438 training rows / 100 = 15 steps per epoch (the last one 38 rows), 30 in all.
BASE = dict(hidden=[32, 16], epochs=2, batch_size=100, eval_every=0, seed=5)
STEPS = 30


@pytest.fixture(scope="module")
def comm():
    return Comm.serial()


def tensors(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if hasattr(obj, "shape") else None)
    return out


def digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def corrupt(path, dataset="model/000_dense/W") -> None:
    """Flip bytes inside the first stored chunk of ``dataset``."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    data = bytearray(Path(path).read_bytes())
    data[offset + 64 : offset + 72] = bytes(b ^ 0xFF for b in data[offset + 64 : offset + 72])
    Path(path).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(comm, tmp_path_factory):
    """Uninterrupted runs writing a checkpoint every 7 steps (mid-epoch: 7, 21; and 14, 28), per optimizer."""
    cache = {}

    def get(**opt):
        key = json.dumps(opt, sort_keys=True)
        if key not in cache:
            d = tmp_path_factory.mktemp("straight")
            cfg = Config(**BASE, **opt, checkpoint_dir=str(d), checkpoint_every=7, keep=0)
            cache[key] = (fit(cfg, comm), d)
        return cache[key]

    return get


def test_file_layout_is_the_documented_one(straight):
    result, d = straight()
    path = d / "ckpt-000000030.h5"
    assert [p.name for p in checkpoints(d)] == [f"ckpt-{s:09d}.h5" for s in (30, 28, 21, 14, 7)]
    with h5py.File(path, "r") as f:
        # Strings are fixed-length (kept in HDF5's checksummed object headers): h5py reads bytes.
        assert f.attrs["format_version"] == 2 and f.attrs["kind"] == b"hpcnn checkpoint"
        assert sorted(f) == ["layout", "model", "optimizer", "position", "rng"]
        assert sorted(f["model"]) == ["000_dense", "002_dense", "004_dense"]
        assert f["model/002_dense/W"].shape == (32, 16) and f["model/004_dense/b"].shape == (10,)
        assert sorted(f["optimizer"]) == ["m", "v"] and f["optimizer"].attrs["t"] == STEPS
        assert f["position"].attrs["step"] == STEPS and f["rng"].attrs["seed"] == 5
        assert f["layout"].attrs["ranks"] == 1 and list(f["layout"].attrs["stage_bounds"]) == [0, 5]
        names = []
        f.visititems(lambda n, o: names.append(n) if hasattr(o, "shape") else None)
        assert len(names) == 18 and all(f[n].fletcher32 and f[n].chunks for n in names)
        saved = from_dict(parse_toml(f.attrs["config"].decode()), "checkpoint")
    assert saved == Config(**BASE, checkpoint_dir=str(d), checkpoint_every=7, keep=0)
    np.testing.assert_array_equal(tensors(path)["model/000_dense/W"], result.model.layers[0].W)
    info = inspect(path)
    assert info.position.step == STEPS and len(info.position.history) == 2
    assert info.architecture["layers"][0] == {"type": "Dense", "fan_in": 64, "fan_out": 32, "init": "he"}


@pytest.mark.parametrize(
    "opt", [dict(optimizer="adam"), dict(optimizer="sgd", momentum=0.9, nesterov=True),
            dict(optimizer="adamw", weight_decay=0.01, lr_schedule="step", step_size=4, gamma=0.5)],
)  # fmt: skip
@pytest.mark.parametrize("stop", [7, 14, 21])  # mid-epoch 1, end of a batch run, mid-epoch 2
def test_resume_continues_bitwise_identically(comm, straight, tmp_path, opt, stop):
    result, d = straight(**opt)
    cfg = Config(**BASE, **opt, checkpoint_dir=str(tmp_path), resume=str(d / f"ckpt-{stop:09d}.h5"))
    resumed = fit(cfg, comm)
    assert resumed.steps == STEPS and resumed.step_losses == result.step_losses[stop:]
    np.testing.assert_array_equal(resumed.model.params.data, result.model.params.data)
    a, b = tensors(d / "ckpt-000000030.h5"), tensors(tmp_path / "ckpt-000000030.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # parameters and state
    assert [r["loss"] for r in resumed.history] == pytest.approx(
        [r["loss"] for r in result.history], rel=1e-12
    )
    assert resumed.final == pytest.approx(result.final)


class SignalAtStep:
    """An optimizer wrapper that sends this process ``sig`` during step ``at``."""

    def __init__(self, opt, at, sig=signal.SIGUSR1):
        self.opt, self.at, self.sig = opt, at, sig

    def __getattr__(self, name):
        return getattr(self.opt, name)

    def bind(self, params):
        self.opt.bind(params)
        return self

    def step(self, lr):
        self.opt.step(lr)
        if self.opt.t == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_resume_matches(
    comm, straight, tmp_path, monkeypatch, sig
):
    result, _ = straight()
    make = engine.make_optimizer
    monkeypatch.setattr(engine, "make_optimizer", lambda cfg: SignalAtStep(make(cfg), 10, sig))
    cfg = Config(**BASE, checkpoint_dir=str(tmp_path))
    stopped = fit(cfg, comm)
    # The flag raised during step 10 is reduced after step 10 and seen after step 11.
    assert stopped.stopped == sig.name and stopped.steps == 11 and stopped.final == {}
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt-000000011.h5"]
    assert signal.getsignal(sig) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(engine, "make_optimizer", make)
    resumed = fit(Config(**BASE, checkpoint_dir=str(tmp_path), resume="auto"), comm)
    assert stopped.step_losses + resumed.step_losses == result.step_losses
    np.testing.assert_array_equal(resumed.model.params.data, result.model.params.data)


def test_a_signal_during_a_checkpoint_write_stops_training_soon_after_and_both_files_are_good(
    comm, straight, tmp_path, monkeypatch
):
    result, _ = straight()
    create, calls = writers._create, []

    def signalling(f, key, shape, dtype):
        calls.append(key)
        if len(calls) == 9:  # halfway through the step-7 checkpoint's 18 datasets
            os.kill(os.getpid(), signal.SIGUSR1)
        return create(f, key, shape, dtype)

    monkeypatch.setattr(writers, "_create", signalling)
    stopped = fit(Config(**BASE, checkpoint_dir=str(tmp_path), checkpoint_every=7, keep=0), comm)
    # Noted during step 7's checkpoint, reduced after step 8 and seen after step 9 (as any signal).
    assert stopped.stopped == "SIGUSR1" and stopped.steps == 9
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt-000000009.h5", "ckpt-000000007.h5"]
    assert all(verify(p) for p in checkpoints(tmp_path))  # the interrupted write completed
    monkeypatch.setattr(writers, "_create", create)
    resumed = fit(Config(**BASE, checkpoint_dir=str(tmp_path), resume="auto"), comm)
    np.testing.assert_array_equal(resumed.model.params.data, result.model.params.data)


# A command whose start-up (config resolution, before MPI traffic, data or model) receives SIGUSR1.
SIGNAL_AT_START_UP = """
import os, signal, sys
from hpcnn import train
resolve = train.resolve
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR1)
    return resolve(*args, **kwargs)
train.resolve = signalled
sys.exit(train.main(sys.argv[1:]))
"""
CLI_BASE = ["--hidden", "32,16", "--epochs", "2", "--batch-size", "100", "--eval-every", "0", "--seed", "5"]


def test_a_signal_during_start_up_stops_after_the_first_steps_with_a_checkpoint(straight, tmp_path):
    _, d = straight()
    proc = run(SIGNAL_AT_START_UP, [*CLI_BASE, "--checkpoint-dir", tmp_path], timeout=120)
    assert proc.returncode == 75, proc.stderr
    # Caught before training, reduced after step 1 and seen after step 2 (as any signal).
    assert "hpcnn: stopped by SIGUSR1 after step 2;" in proc.stdout
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt-000000002.h5"]
    resumed = run("hpcnn.train", [*CLI_BASE, "--checkpoint-dir", str(tmp_path), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = tensors(d / f"ckpt-{STEPS:09d}.h5"), tensors(tmp_path / f"ckpt-{STEPS:09d}.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_without_checkpoints_a_signal_during_start_up_acts_as_it_would_without_hpcnn(tmp_path):
    """Nowhere to save a stop: SIGUSR1's default action (end the process) is not swallowed."""
    proc = run(SIGNAL_AT_START_UP, [*CLI_BASE, "--run-dir", ""], timeout=120)
    assert proc.returncode == -signal.SIGUSR1 and "final" not in proc.stdout, proc.stdout + proc.stderr


def copy_run(src, dst, steps):
    dst.mkdir()
    for s in steps:
        name = f"ckpt-{s:09d}.h5"
        (dst / name).write_bytes((src / name).read_bytes())


def test_auto_skips_a_corrupt_or_truncated_newest_checkpoint(comm, straight, tmp_path):
    result, d = straight()
    run = tmp_path / "run"
    copy_run(d, run, (7, 14, 21))
    corrupt(run / "ckpt-000000021.h5")
    (run / "ckpt-000000014.h5").write_bytes((d / "ckpt-000000014.h5").read_bytes()[:5000])  # truncated
    lines = []
    resumed = fit(Config(**BASE, checkpoint_dir=str(run), resume="auto"), comm, log=lines.append)
    text = "\n".join(lines)
    assert "skipping checkpoint" in text and "ckpt-000000021.h5: dataset model/000_dense/W is corrupt" in text
    assert "ckpt-000000014.h5 is not a readable HDF5 file" in text
    assert f"resumed from {run / 'ckpt-000000007.h5'}: step 7" in text
    np.testing.assert_array_equal(resumed.model.params.data, result.model.params.data)
    # the two skipped files are kept under other names, not overwritten by the resumed run
    assert sorted(p.name for p in run.glob("*.unreadable")) == [
        "ckpt-000000014.h5.unreadable",
        "ckpt-000000021.h5.unreadable",
    ]


def test_auto_with_nothing_readable_is_an_error_and_with_nothing_starts_fresh(comm, straight, tmp_path):
    _, d = straight()
    copy_run(d, tmp_path / "bad", (7,))
    corrupt(tmp_path / "bad" / "ckpt-000000007.h5")
    before = digest(tmp_path / "bad")
    with pytest.raises(JobError, match="no readable checkpoint in .*bad: resume: skipping") as exc:
        fit(Config(**BASE, checkpoint_dir=str(tmp_path / "bad"), resume="auto"), comm)
    assert exc.value.exit_code == 2 and digest(tmp_path / "bad") == before
    lines = []
    fresh = fit(Config(**BASE, checkpoint_dir=str(tmp_path / "new"), resume="auto"), comm, log=lines.append)
    assert fresh.steps == STEPS and any("no checkpoint in" in line for line in lines)


def make_variant(src, dst, **attrs):
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        for key, value in attrs.items():
            group, _, name = key.rpartition("/")
            (f[group] if group else f).attrs[name] = value


@pytest.mark.parametrize(
    "settings,attrs,message",
    [
        (
            dict(hidden=[32, 8]),
            {},
            r"layer 2 is Dense\(32, 16\) in the checkpoint, Dense\(32, 8\) in this run",
        ),
        (dict(hidden=[32]), {}, r"layer 2 is Dense\(32, 16\) in the checkpoint, Dense\(32, 10\) in this run"),
        (dict(activation="tanh"), {}, "layer 1 is ReLU in the checkpoint, Tanh in this run"),
        (dict(dtype="float64"), {}, "the checkpoint's dtype is float32, this run's is float64"),
        (
            dict(optimizer="sgd", momentum=0.9),
            {},
            r"it holds adam state \['m', 'v'\], this run's sgd keeps \['velocity'\]",
        ),
        (
            dict(optimizer="sgd"),
            {},
            r"adam state \['m', 'v'\], this run's sgd keeps \[\] \(match --optimizer and",
        ),
        ({}, {"format_version": 99}, "has format_version 99; this hpcnn .* reads format_version 1 and 2"),
        ({}, {"kind": "something else"}, "is not an hpcnn checkpoint"),
    ],
)
def test_an_incompatible_checkpoint_is_a_clear_error_and_nothing_is_written(
    comm, straight, tmp_path, settings, attrs, message
):
    _, d = straight()
    src = tmp_path / "src.h5"
    make_variant(d / "ckpt-000000014.h5", src, **attrs)
    out = tmp_path / "out"
    before = digest(tmp_path)
    cfg = Config(**{**BASE, **settings}, checkpoint_dir=str(out), resume=str(src))
    with pytest.raises(JobError, match=message) as exc:
        fit(cfg, comm)
    assert exc.value.exit_code == 2 and digest(tmp_path) == before and not out.exists()


def test_a_momentum_checkpoint_does_not_resume_as_plain_sgd(comm, straight, tmp_path):
    """The checkpoint holds a velocity that plain SGD (the default without --momentum) has no use for."""
    _, d = straight(optimizer="sgd", momentum=0.9, nesterov=True)
    cfg = Config(
        **BASE, optimizer="sgd", checkpoint_dir=str(tmp_path / "out"), resume=str(d / "ckpt-000000014.h5")
    )
    message = (
        r"it holds sgd state \['velocity'\], this run's sgd keeps \[\] \(match --optimizer and --momentum\)"
    )
    with pytest.raises(JobError, match=message) as exc:
        fit(cfg, comm)
    assert exc.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_resume_of_a_corrupt_file_names_the_dataset(comm, straight, tmp_path):
    _, d = straight()
    src = tmp_path / "c.h5"
    src.write_bytes((d / "ckpt-000000014.h5").read_bytes())
    corrupt(src, "optimizer/v/002_dense/W")
    with pytest.raises(JobError, match="dataset optimizer/v/002_dense/W is corrupt"):
        fit(Config(**BASE, resume=str(src)), comm)
    with pytest.raises(JobError, match="checkpoint .*missing.h5 does not exist"):
        fit(Config(**BASE, resume=str(tmp_path / "missing.h5")), comm)


def test_checkpoints_of_another_run_are_never_overwritten(comm, straight, tmp_path):
    _, d = straight()
    copy_run(d, tmp_path / "run", (7, 14))
    before = digest(tmp_path / "run")
    with pytest.raises(
        JobError, match="already holds checkpoints of another run .newest ckpt-000000014.h5.: continue"
    ):
        fit(Config(**BASE, checkpoint_dir=str(tmp_path / "run")), comm)
    resume_old = Config(
        **BASE, checkpoint_dir=str(tmp_path / "run"), resume=str(tmp_path / "run" / "ckpt-000000007.h5")
    )
    with pytest.raises(
        JobError, match="holds checkpoints newer than .*ckpt-000000007.h5 .newest ckpt-000000014.h5."
    ):
        fit(resume_old, comm)
    assert digest(tmp_path / "run") == before


def test_keep_prunes_the_oldest_and_epoch_checkpoints(comm, tmp_path):
    fit(Config(**{**BASE, "epochs": 3}, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4, keep=2), comm)
    assert [p.name for p in checkpoints(tmp_path / "a")] == ["ckpt-000000045.h5", "ckpt-000000044.h5"]
    fit(
        Config(
            **{**BASE, "epochs": 3}, checkpoint_dir=str(tmp_path / "b"), checkpoint_every_epochs=1, keep=0
        ),
        comm,
    )
    assert [checkpoint.step_of(p) for p in checkpoints(tmp_path / "b")] == [45, 30, 15]
    assert inspect(tmp_path / "b" / "ckpt-000000015.h5").position.batch == 0  # an epoch boundary
    assert sorted(os.listdir(tmp_path / "b")) == [p.name for p in reversed(checkpoints(tmp_path / "b"))]


def test_a_failed_write_leaves_earlier_checkpoints_intact(comm, tmp_path, monkeypatch):
    create, calls = writers._create, []

    def failing(f, key, shape, dtype):
        calls.append(key)
        if len(calls) == 18 + 5:  # in the second checkpoint
            raise OSError(28, "No space left on device")
        return create(f, key, shape, dtype)

    monkeypatch.setattr(writers, "_create", failing)
    with pytest.raises(
        JobError, match=r"writing checkpoint .*ckpt-000000014.h5 failed: .*No space left"
    ) as exc:
        fit(Config(**BASE, checkpoint_dir=str(tmp_path), checkpoint_every=7), comm)
    assert exc.value.exit_code == EXIT_IO and "earlier checkpoints are intact" in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000007.h5"]  # no temporary file left behind
    verify(tmp_path / "ckpt-000000007.h5")


def test_sigkill_at_any_moment_leaves_the_newest_checkpoint_loadable(tmp_path):
    """Kill a run that checkpoints a 4 MB state every step at several moments; each time the
    newest checkpoint by name reads back whole (a torn file only ever has the temporary name)."""
    d = tmp_path / "run"
    args = ["--hidden", "1024,1024", "--epochs", "50", "--checkpoint-dir", str(d), "--checkpoint-every", "1"]
    for delay in (0.05, 0.13, 0.29):
        proc = start("hpcnn.train", [*args, "--resume", "auto"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not checkpoints(d) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        found = checkpoints(d)
        assert found, proc.stderr.read()
        verify(found[0])
        # (and the lock the killed run held: the next run takes it over)
        assert all(p.name.startswith((".ckpt-", "ckpt-")) or p.name == ".hpcnn.lock" for p in d.iterdir())


def test_checkpoint_info_and_list(straight, tmp_path):
    _, d = straight()
    proc = run("hpcnn.checkpoint", ["info", str(d / "ckpt-000000021.h5")])
    assert proc.returncode == 0, proc.stderr
    assert "Dense(64, 32) -> ReLU -> Dense(32, 16) -> ReLU -> Dense(16, 10)" in proc.stdout
    assert "adam, 21 steps taken" in proc.stdout and "step 21: 1 epoch(s) and 6 batch(es) done" in proc.stdout
    assert "every dataset verified" in proc.stdout
    copy_run(d, tmp_path / "r", (7, 14))
    corrupt(tmp_path / "r" / "ckpt-000000014.h5")
    proc = run("hpcnn.checkpoint", ["list", str(tmp_path / "r")])
    assert proc.returncode == 2 and "ckpt-000000014.h5: step 14, UNREADABLE" in proc.stdout
    assert "ckpt-000000007.h5: step 7, good" in proc.stdout


@pytest.mark.launches
def test_evaluate_scores_and_predicts_at_any_layout(straight, tmp_path):
    result, d = straight()
    path = str(d / "ckpt-000000030.h5")
    expected = f"accuracy {100 * result.final['accuracy']:.2f}% (359 rows"
    for ranks, extra in ((None, []), (4, ["--pipeline-stages", "2", "--micro-batches", "3"])):
        proc = run("hpcnn.evaluate", ["--checkpoint", path, *extra], ranks=ranks)
        assert (
            proc.returncode == 0 and expected in proc.stdout and "held-out rows of digits" in proc.stdout
        ), proc
    from importlib import resources

    with h5py.File(str(resources.files("hpcnn") / "datasets" / "digits.h5"), "r", locking=False) as f:
        x, y = f["x_test"][...], f["y_test"][...]
    with h5py.File(tmp_path / "new.h5", "w") as f:
        f["inputs"] = x
    out = tmp_path / "pred.h5"
    args = [
        "--checkpoint",
        path,
        "--data",
        str(tmp_path / "new.h5"),
        "--x-key",
        "inputs",
        "--predict",
        str(out),
    ]
    proc = run("hpcnn.evaluate", [*args, "--pipeline-stages", "3"], ranks=3)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r") as f:
        assert (f["predictions"][...] == y).mean() == pytest.approx(result.final["accuracy"])
        np.testing.assert_allclose(f["probabilities"][...].sum(axis=1), 1, rtol=1e-5)
        assert f["outputs"].shape == (359, 10)
    proc = run("hpcnn.evaluate", ["--checkpoint", path, "--data", "xor"], ranks=2)
    assert proc.returncode == 2 and proc.stderr.count("hpcnn: error:") == 1
    assert "xor has 2 features; the checkpoint's model takes 64" in proc.stderr


@pytest.mark.launches
def test_sigusr1_to_one_rank_stops_all_with_exit_75_and_resume_matches(tmp_path):
    """A real 4-rank run (2 replicas x 2 stages): SIGUSR1 to one rank; all ranks stop after the
    same step, write one checkpoint and exit 75; --resume auto then ends exactly where an
    uninterrupted run does."""
    common = ["--epochs", "12", "--pipeline-stages", "2", "--micro-batches", "2", "--eval-every", "0"]
    straight = run("hpcnn.train", [*common, "--checkpoint-dir", str(tmp_path / "a")], ranks=4)
    assert straight.returncode == 0, straight.stderr
    d = tmp_path / "b"
    job = Job("hpcnn.train", [*common, "--checkpoint-dir", d, "--checkpoint-every-epochs", "1"], 4)
    deadline = time.monotonic() + 60
    while not checkpoints(d) and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = job.processes()
    assert len(ranks) == 4, ranks
    job.signal_rank(2, signal.SIGUSR1)
    code, _ = job.finish(60)
    out, err = job.stdout, job.stderr
    assert code == 75, err
    assert "hpcnn: stopped by SIGUSR1 after step" in out and "continue with --resume auto" in out
    step = checkpoint.step_of(checkpoints(d)[0])
    assert f"after step {step};" in out and 23 < step < 12 * 23
    resumed = run("hpcnn.train", [*common, "--checkpoint-dir", str(d), "--resume", "auto"], ranks=4)
    assert resumed.returncode == 0 and f"resumed from {d / checkpoint.file_name(step)}" in resumed.stdout
    a, b = tensors(tmp_path / "a" / "ckpt-000000276.h5"), tensors(d / "ckpt-000000276.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)
