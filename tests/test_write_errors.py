"""A checkpoint write that fails: a full disk, an I/O error, a directory removed during the write.

Each ends the run with exit code 74 (``EXIT_IO``) and one message from rank 0 that names the
directory, the bytes a checkpoint needs and the bytes free; no temporary file is left, earlier
checkpoints keep their bytes, nothing crashes (a full disk used to end in a segfault inside HDF5's
close with 200+ lines of tracebacks), and every process is gone within seconds.

A real full disk is a 300 KiB tmpfs (mounting one needs root: skipped otherwise); write errors in
the middle of a write are also injected (``HPCNN_FAULT=enospc@checkpoint``, ``eio``), at 1, 2 and 4
ranks.
"""

import errno
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from launch import run

from hpcnn.io import checkpoints as checkpoint
from hpcnn.io.checkpoints import checkpoints, verify, writers

LIMIT = 30.0  # seconds until every process of a failed run is gone
FAST = ["--epochs", "1", "--eval-every", "0", "--run-dir", "", "--batch-size", "100"]  # 15 steps
BIG = ["--hidden", "200"]  # checkpoints of 180-230 KB: one fits into 300 KiB, two do not
AMOUNT = r"[\d,]+ bytes \(\d+\.\d\d MiB\)"


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hpcnn:") and "error" in line]


def digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def assert_one_clean_message(proc, seconds, pattern) -> None:
    assert proc.returncode == 74 and seconds < LIMIT, (proc.returncode, seconds, proc.stderr)
    assert len(errors(proc)) == 1 and re.fullmatch(pattern, errors(proc)[0]), proc.stderr
    # (a launcher may add its own lines: Open MPI's mpirun reports the non-zero exit)
    for noise in ("Traceback", "Exception ignored", "HDF5-DIAG", "Segmentation", "signal 11"):
        assert noise not in proc.stderr + proc.stdout, proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB file system (tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the injected write errors cover the same path)")
    d = tmp_path / "disk"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(d)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


# --- a real full disk ----------------------------------------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_a_full_disk_ends_the_run_with_one_message_and_keeps_the_earlier_checkpoint(small_disk, ranks):
    d = small_disk / "ckpt"
    args = [*FAST, *BIG, "--checkpoint-dir", str(d), "--keep", "0"]
    # The first checkpoint fits, the second does not: refused before writing it.
    proc = run("hpcnn.train", [*args, "--checkpoint-every", "5"], ranks=ranks, timeout=120)
    assert_one_clean_message(
        proc, proc.seconds,
        rf"hpcnn: error: writing checkpoint {d}/ckpt-000000010.h5 failed: not enough space in {d}: a "
        rf"checkpoint needs about {AMOUNT}, {AMOUNT} are free; nothing was written, earlier checkpoints "
        r"are intact",
    )  # fmt: skip
    assert sorted(os.listdir(d)) == ["ckpt-000000005.h5"]  # no temporary file, no lock left
    verify(d / "ckpt-000000005.h5")
    # Resuming into the full directory: refused before training, not after it.
    before = digest(d)
    proc = run("hpcnn.train", [*args, "--resume", "auto"], ranks=ranks, timeout=120)
    assert_one_clean_message(
        proc, proc.seconds,
        rf"hpcnn: error: checkpoint_dir: not enough space in {d}: a checkpoint needs about {AMOUNT}, "
        rf"{AMOUNT} are free; free some space or choose another --checkpoint-dir",
    )  # fmt: skip
    assert "resumed from" in proc.stdout and "epoch 1/1" not in proc.stdout
    assert digest(d) == before


SCRIPT = """
import sys
from hpcnn import train
from hpcnn.io.checkpoints import writers, writing
from hpcnn.training import setup
from hpcnn.parallel.comm import Comm
from hpcnn.config import Config
from hpcnn.errors import JobError

directory, how = sys.argv[1], sys.argv[2]
if how == "full":  # skip the free-space checks: the disk fills during the write itself
    writing.too_little_space = setup.too_little_space = lambda directory, needed: None
else:  # the directory is removed while the second checkpoint is written
    create, calls = writers._create, []

    def removing(f, key, shape, dtype):
        calls.append(key)
        if len(calls) == 13:  # 12 datasets per checkpoint (2 layers x W, b x parameters, m, v)
            import shutil
            shutil.rmtree(directory)
        return create(f, key, shape, dtype)

    writers._create = removing
cfg = Config(hidden=[200], epochs=1, batch_size=100, eval_every=0, checkpoint_dir=directory, keep=0,
             checkpoint_every=5, quiet=True, resume=sys.argv[3] if len(sys.argv) > 3 else "")
try:
    train.fit(cfg, Comm.serial())
except JobError as exc:
    print(exc.exit_code, exc.message)
"""


def run_script(*args):
    return run(SCRIPT, args, timeout=60)


def test_a_disk_that_fills_during_the_write_is_reported_without_a_crash(small_disk):
    """HDF5 never sees the failed write: the process ends normally (a segfault at exit before)."""
    d = small_disk / "ckpt"
    first = run_script(d, "full")  # the first write fits, the second runs out of space
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert re.fullmatch(
        rf"74 writing checkpoint {d}/ckpt-000000010.h5 failed: \[Errno 28\] No space left on device; a "
        rf"checkpoint needs about {AMOUNT}, {AMOUNT} are free in {d}; the temporary file was removed, "
        r"earlier checkpoints are intact\n",
        first.stdout,
    ), first.stdout
    assert sorted(os.listdir(d)) == ["ckpt-000000005.h5"]
    verify(d / "ckpt-000000005.h5")


def test_a_disk_that_fills_during_a_later_write_keeps_the_earlier_bytes(small_disk, tmp_path):
    d = small_disk / "ckpt"
    # one checkpoint at step 5, on a disk with room for it
    made = run("hpcnn.train", [*FAST, *BIG, "--max-steps", "5", "--checkpoint-dir", d], timeout=60)
    assert made.returncode == 0, made.stderr
    before = digest(d)
    again = run_script(d, "full", "auto")  # continues from step 5; the write after step 10 fails
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout.startswith(f"74 writing checkpoint {d}/ckpt-000000010.h5 failed: [Errno 28] No space")
    assert digest(d) == before


def test_a_directory_removed_during_the_write_is_named(tmp_path):
    d = tmp_path / "ckpt"
    proc = run_script(d, "remove")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert re.fullmatch(
        rf"74 writing checkpoint {d}/ckpt-000000010.h5 failed: the directory {d} vanished during the "
        rf"write; a checkpoint needs about {AMOUNT}, {d}'s free space is unknown; the temporary file was "
        r"removed, earlier checkpoints are intact\n",
        proc.stdout,
    ), proc.stdout
    assert not d.exists()


# --- injected write errors, at every rank count ------------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("kind, text", [("enospc", r"\[Errno 28\] No space left on device"),
                                        ("eio", r"\[Errno 5\] Input/output error")])  # fmt: skip
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_a_write_error_ends_every_rank_with_one_message(tmp_path, ranks, kind, text):
    d = tmp_path / "ckpt"
    args = [*FAST, "--hidden", "16", "--checkpoint-dir", str(d), "--checkpoint-every", "5", "--keep", "0"]
    made = run("hpcnn.train", [*args, "--max-steps", "10"], ranks=ranks, timeout=120)  # checkpoints at 5, 10
    assert made.returncode == 0, made.stderr
    before = digest(d)
    # The write after step 15 (the fault's step counts from 0) fails part-way on rank 0, which writes.
    fault = {"HPCNN_FAULT": f"{kind}@checkpoint:rank=0,step=14"}
    proc = run("hpcnn.train", [*args, "--resume", "auto"], ranks=ranks, env=fault, timeout=120)
    assert_one_clean_message(
        proc, proc.seconds,
        rf"hpcnn: error: writing checkpoint {d}/ckpt-000000015.h5 failed: {text}; a checkpoint needs "
        rf"about {AMOUNT}, {AMOUNT} are free in {d}; the temporary file was removed, earlier checkpoints "
        r"are intact",
    )  # fmt: skip
    assert digest(d) == before  # no temporary file, no lock file, earlier checkpoints' bytes unchanged


# --- the pieces ----------------------------------------------------------------------------------


def test_the_spool_hides_a_failed_write_from_hdf5_and_reads_back_what_it_held(tmp_path):
    spool = writers._Spool(tmp_path / "f")
    spool.write(b"abcdef")
    spool.fail_next = errno.ENOSPC
    spool.seek(2)
    assert spool.write(b"XYZ") == 3  # HDF5 is told it worked
    spool.seek(10)
    spool.write(b"q")
    spool.seek(0)
    assert spool.read(11) == b"abXYZf\0\0\0\0q" and spool.error.errno == errno.ENOSPC
    spool.close()
    assert (tmp_path / "f").read_bytes() == b"abcdef"  # nothing after the failure reached the file


def test_the_estimate_is_a_little_more_than_the_file(tmp_path):
    from hpcnn.config import Config
    from hpcnn.parallel.comm import Comm
    from hpcnn.train import fit

    # (optimizer state buffers: Adam keeps m and v, SGD with momentum its velocity)
    for hidden, optimizer, states in [([16], "adam", 2), ([256, 256], "sgd", 1), ([8] * 20, "adam", 2)]:
        d = tmp_path / f"{len(hidden)}-{hidden[0]}"
        result = fit(Config(hidden=hidden, optimizer=optimizer, momentum=0.9, epochs=1, max_steps=1,
                            eval_every=0, checkpoint_dir=str(d), quiet=True), Comm.serial())  # fmt: skip
        size = checkpoints(d)[0].stat().st_size
        estimate = checkpoint.estimate_bytes(result.model.layers, 1 + states, 4)
        assert size < estimate < 1.5 * size + 32768, (hidden, size, estimate)
