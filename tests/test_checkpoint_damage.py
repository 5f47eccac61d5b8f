"""Damaged checkpoints: verification covers every byte of content and always ends.

- a fuzz with a fixed seed: single-bit flips anywhere, in the metadata, in attribute values and in
  the superblock, and truncations; every check ends (one still running after ``LIMIT`` seconds
  would be stopped and counted corrupt, as ``verify_bounded`` does: none is, with HDF5 2.0), raises
  nothing but a ``UserError``, and calls a damaged file good only if everything it decodes to
  (every attribute, every tensor) is unchanged;
- a change made through HDF5 itself (which recomputes its own checksums) is caught by the digests;
- format 1 files (hpcnn before the digests) still verify and resume; one whose global heap is
  damaged makes HDF5 loop, and the verification in a child process is stopped;
- ``--resume auto`` skips a newest checkpoint damaged in its metadata, with one note, at 2 ranks;
  ``--resume FILE`` and ``evaluate`` of it end with exit code 2 and one message;
- ``python -m hpcnn.checkpoint list`` / ``info`` report each file's state within a bound.
"""

import os
import pickle
import random
import select
import signal
import time
from collections import Counter
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from launch import run

from hpcnn.config import Config
from hpcnn.core.layers import layer_from_spec
from hpcnn.errors import UserError
from hpcnn.io.checkpoints import inspect, read_stage, stage_tensors, verify, verify_bounded
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit

LIMIT = 10.0  # seconds a check of a damaged file may take (each takes ~25 ms here)
# 1438 digits rows / 100 = 15 steps per epoch: at step 18 one epoch is in the history.
SETTINGS = dict(hidden=[16], epochs=2, max_steps=18, batch_size=100, eval_every=1, seed=5)
DIGEST_WORDS = ("content_digest", "tensor_digests", "checksums list")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    fit(Config(**SETTINGS, checkpoint_dir=str(d), run_dir=""), Comm.serial())
    return d / "ckpt-000000018.h5"


def names_in(f) -> list[str]:
    found = []
    f.visit(found.append)
    return ["/", *found]


def decoded(path) -> dict:
    """Everything a file decodes to: each object's attributes (type and value) and each dataset's
    dtype, shape and bytes."""

    def value(v):
        return (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else (type(v).__name__, v)

    out = {}
    with h5py.File(path, "r", locking=False) as f:
        for name in names_in(f):
            obj = f[name]
            out[name] = {k: value(obj.attrs[k]) for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out[f"{name} values"] = (obj.dtype.str, obj.shape, obj[...].tobytes())
    return out


def outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except UserError as exc:
        return f"user: {exc}"
    except BaseException as exc:  # noqa: BLE001  (what the test is looking for)
        return f"ERROR {type(exc).__name__}: {exc}"


def checked(path, layers) -> dict:
    """What ``verify``, ``inspect`` and ``read_stage`` make of ``path``, and its decoded content when
    verification passed."""
    tensors = stage_tensors(layers, 0, len(layers))
    size = sum(int(np.prod(shape)) for _, _, shape in tensors)
    params = SimpleNamespace(data=np.empty(size, np.float32), state=np.empty(0, np.float32))  # no layer state
    state = {n: np.empty(size, np.float32) for n in ("m", "v")}
    result = {
        "verify": outcome(lambda: verify(path)),
        "inspect": outcome(lambda: inspect(path)),
        "read": outcome(lambda: read_stage(path, layers, 0, len(layers), params, state)),
    }
    if result["verify"] == "ok":
        try:
            result["content"] = decoded(path)
        except Exception as exc:  # noqa: BLE001
            result["content"] = f"undecodable: {type(exc).__name__}: {exc}"
    return result


def in_child(fn, limit: float = LIMIT):
    """``(fn(), seconds)`` computed in a forked child; ``("stopped", seconds)`` if it ran ``limit``
    seconds (HDF5 may loop in C code, which only killing the process ends), ``("crashed", ...)``
    if it died. ``verify_bounded`` reports both as a corrupt file."""
    start = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            data = pickle.dumps(fn())
        except BaseException as exc:  # noqa: BLE001
            data = pickle.dumps({"verify": f"ERROR in the harness: {exc!r}"})
        with os.fdopen(w, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, start + limit - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "stopped", time.monotonic() - start
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    os.waitpid(pid, 0)
    return (pickle.loads(b"".join(chunks)) if chunks else "crashed"), time.monotonic() - start


def damage_cases(path, seed: int = 18) -> list[tuple[str, bytes]]:
    """``(description, damaged bytes)``: single-bit flips anywhere, in the metadata (outside the
    tensor chunks), in attribute values, in the superblock; and truncations."""
    data = path.read_bytes()
    rng = random.Random(seed)
    chunks, values = [], []
    with h5py.File(path, "r") as f:
        for name in names_in(f):
            obj = f[name]
            if isinstance(obj, h5py.Dataset):
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    chunks.append(range(info.byte_offset, info.byte_offset + info.size))
            for key in obj.attrs:
                raw = obj.attrs[key]
                raw = raw if isinstance(raw, bytes) else np.asarray(raw).tobytes()
                if len(raw) >= 8 and (at := data.find(raw)) >= 0:
                    values.append(range(at, at + len(raw)))
    metadata = sorted(set(range(len(data))).difference(*chunks))
    attribute_bytes = sorted(set().union(*values))
    assert len(metadata) > 1000 and len(attribute_bytes) > 1000  # the pools are what they claim

    def flipped(where: str, offset: int) -> tuple[str, bytes]:
        bit = rng.randrange(8)
        out = bytearray(data)
        out[offset] ^= 1 << bit
        return f"{where}: byte {offset} bit {bit}", bytes(out)

    cases = [flipped("anywhere", rng.randrange(len(data))) for _ in range(200)]
    cases += [flipped("metadata", rng.choice(metadata)) for _ in range(120)]
    cases += [flipped("attribute value", rng.choice(attribute_bytes)) for _ in range(80)]
    cases += [flipped("superblock", offset) for offset in range(48)]  # version 3: 48 bytes
    cuts = [0, 1, 8, len(data) - 1] + [rng.randrange(len(data)) for _ in range(50)]
    cases += [(f"truncated to {cut} bytes", data[:cut]) for cut in cuts]
    return cases


def test_fuzz_every_damage_is_caught_or_harmless_and_every_check_ends(good, tmp_path):
    layers = [layer_from_spec(spec) for spec in inspect(good).architecture["layers"]]
    original = decoded(good)
    cases = damage_cases(good)
    path = tmp_path / "ckpt-000000018.h5"
    verdicts, problems, slowest = Counter(), [], (0.0, "")
    for description, data in cases:
        path.write_bytes(data)
        result, seconds = in_child(lambda: checked(path, layers))
        slowest = max(slowest, (seconds, description))
        if isinstance(result, str):
            verdicts[f"corrupt: the check {result}"] += 1
            continue
        errors = [f"{k}: {v}" for k, v in result.items() if isinstance(v, str) and v.startswith("ERROR")]
        problems += [f"{description}: {e}" for e in errors]
        if result["verify"] == "ok":
            if result["content"] != original:
                problems.append(f"{description}: reported good, but its content changed")
            verdicts["good, content unchanged"] += 1
        elif any(word in result["verify"] for word in DIGEST_WORDS):
            verdicts["corrupt: caught by a digest"] += 1
        else:
            verdicts["corrupt: caught by HDF5 (checksum or structure)"] += 1
    print(f"\n{len(cases)} damaged files: {dict(verdicts)}; slowest check {slowest[0]:.3f} s ({slowest[1]})")
    assert not problems, "\n".join(problems[:20])
    assert sum(verdicts.values()) == len(cases) and verdicts["good, content unchanged"] < len(cases) // 10


def rewrite(src, dst, change) -> None:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        change(f)


def test_a_change_made_through_hdf5_is_caught_by_the_digests(good, tmp_path):
    """HDF5 recomputes its own checksums when it writes: only the digests see these changes."""
    with h5py.File(good, "r") as f:
        attributes = [(name, key) for name in names_in(f) for key in f[name].attrs]
    assert len(attributes) > 25
    path = tmp_path / "changed.h5"
    expected = {("/", "kind"): "is not an hpcnn checkpoint", ("/", "format_version"): "format_version 3;"}
    for name, key in attributes:

        def change(f, name=name, key=key):
            value = f[name].attrs[key]
            if isinstance(value, bytes):  # fixed-length string: keep its type, change a character
                new = np.bytes_(value[:-1] + bytes([value[-1] ^ 1]))
            else:
                new = value + 1
            f[name].attrs[key] = new

        rewrite(good, path, change)
        with pytest.raises(UserError, match=expected.get((name, key), "do not match their content_digest")):
            verify(path)
    rewrite(good, path, lambda f: f["model/000_dense/b"].__setitem__(0, f["model/000_dense/b"][0] + 1))
    with pytest.raises(UserError, match="dataset model/000_dense/b does not match its tensor_digests entry"):
        verify(path)
    rewrite(good, path, lambda f: f.create_dataset("model/extra", data=np.zeros(3), fletcher32=True))
    with pytest.raises(UserError, match="its datasets are not those its checksums list"):
        verify(path)
    rewrite(good, path, lambda f: f["position"].attrs.__delitem__("history"))
    with pytest.raises(UserError, match="do not match their content_digest"):
        verify(path)
    assert verify(good) == sum(a.nbytes for a in checkpoint_tensors(good).values())


def checkpoint_tensors(path) -> dict:
    with h5py.File(path, "r") as f:
        return {n: f[n][...] for n in names_in(f) if isinstance(f[n], h5py.Dataset)}


def as_format_1(src, dst) -> None:
    """What hpcnn wrote before the digests: HDF5's default (1.8) format, variable-length strings."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for name in names_in(f):
            obj = f[name]
            if isinstance(obj, h5py.Dataset):
                g.create_dataset(name, data=obj[...], chunks=obj.chunks, fletcher32=True)
            target = g.require_group(name) if isinstance(obj, h5py.Group) and name != "/" else g[name]
            for key, value in obj.attrs.items():
                if key not in ("content_digest", "tensor_digests"):
                    target.attrs[key] = value.decode() if isinstance(value, bytes) else value
        g.attrs["format_version"] = 1


def spinning(src, dst) -> None:
    """A format 1 file whose global heap (where variable-length strings live, with no checksum)
    claims 32 KiB more than it holds: HDF5 2.0 loops forever reading the strings."""
    data = bytearray(src.read_bytes())
    heap = data.find(b"GCOL")
    assert heap > 0 and int.from_bytes(data[heap + 8 : heap + 16], "little") == 4096
    assert len(data) > heap + 4096 + 32768  # the claimed heap lies inside the file
    data[heap + 9] ^= 0x80  # collection size 4096 -> 36864
    dst.write_bytes(bytes(data))


def test_format_1_files_verify_and_resume(good, tmp_path):
    old = tmp_path / "old" / "ckpt-000000018.h5"
    old.parent.mkdir()
    as_format_1(good, old)
    assert verify(old) == verify(good) and inspect(old).format_version == 1
    assert inspect(old).position == inspect(good).position and inspect(old).config == inspect(good).config
    resumed = fit(Config(**{**SETTINGS, "max_steps": 20}, resume=str(old), run_dir=""), Comm.serial())
    assert resumed.steps == 20 and len(resumed.step_losses) == 2


def test_the_bounded_verification_stops_a_file_that_never_answers(good, tmp_path):
    fifo = tmp_path / "ckpt-000000001.h5"
    os.mkfifo(fifo)  # opening it blocks in C until a writer comes: as a hung file system would
    old = tmp_path / "old.h5"
    as_format_1(good, old)
    spinning(old, tmp_path / "spinning.h5")
    for path, message in ((fifo, "is corrupt: its verification made no progress for 2 s and was stopped"),
                          (tmp_path / "spinning.h5", "is corrupt")):  # fmt: skip
        # In a child of the test too: should the bound fail, the test fails instead of hanging.
        result, seconds = in_child(lambda path=path: outcome(lambda: verify_bounded(path, stall=2)))
        assert result.startswith(f"user: checkpoint {path} {message}") and seconds < 2 + LIMIT, result
    assert verify_bounded(good) == verify(good)
    # The child runs beside MPI ranks: importing mpi4py.MPI there would initialise MPI.
    code = "import sys, hpcnn.checkpoint; print(sorted(m for m in sys.modules if m.startswith('mpi4py')))"
    child = run(code, timeout=60)
    assert child.stdout == "[]\n", child


def flip_object_header(src, dst) -> None:
    """Damage the root group's object header (HDF5's metadata, checksummed in format 2)."""
    data = bytearray(src.read_bytes())
    header = data.find(b"OHDR")
    assert header > 0
    data[header + 20] ^= 0x10
    dst.write_bytes(bytes(data))


def tool(module, args, ranks=None):
    """``python -m MODULE ARGS``, under mpiexec with ``ranks``; (process, seconds)."""
    proc = run(module, args, ranks=ranks, timeout=120)
    return proc, proc.seconds


def test_checkpoint_list_and_info_report_every_state_within_a_bound(good, tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    (d / "ckpt-000000010.h5").write_bytes(good.read_bytes())
    as_format_1(good, d / "ckpt-000000009.h5")
    flip_object_header(good, d / "ckpt-000000011.h5")
    (d / "ckpt-000000012.h5").write_bytes(good.read_bytes()[:5000])
    (d / "ckpt-000000013.h5").write_text("not HDF5 at all\n")
    spinning(d / "ckpt-000000009.h5", d / "ckpt-000000014.h5")
    os.mkfifo(d / "ckpt-000000015.h5")
    proc, seconds = tool("hpcnn.checkpoint", ["list", str(d), "--timeout", "2"])
    lines = proc.stdout.splitlines()
    assert proc.returncode == 2 and len(lines) == 7 and "Traceback" not in proc.stderr, proc
    state = {int(line.split(": step ")[1].split(",")[0]): line.split(", ", 1)[1] for line in lines}
    assert state[10] == "good" and state[9] == "good (format 1: attributes unchecked)"
    assert "UNREADABLE: checkpoint" in state[11] and "incorrect metadata checksum" in state[11]
    assert "UNREADABLE" in state[12] and "truncated file" in state[12]
    assert "UNREADABLE" in state[13] and "is not a readable HDF5 file" in state[13]
    assert state[14].startswith(f"UNREADABLE: checkpoint {d / 'ckpt-000000014.h5'}")
    assert state[15].endswith("its verification made no progress for 2 s and was stopped (HDF5 can loop "
                              "forever on damaged metadata)")  # fmt: skip
    assert seconds < 2 * 2 + 30, seconds  # two stopped verifications, five quick ones
    for step in (11, 14, 15):
        proc, seconds = tool("hpcnn.checkpoint", ["info", str(d / f"ckpt-{step:09d}.h5"), "--timeout", "2"])
        assert proc.returncode == 2 and proc.stdout == "" and seconds < 2 + 20, proc
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hpcnn: error: checkpoint "), proc
    proc, _ = tool("hpcnn.checkpoint", ["info", str(d / "ckpt-000000009.h5")])
    assert proc.returncode == 0 and "format_version 1" in proc.stdout, proc
    assert "checksums: every dataset verified (0.01 MiB of tensors), attributes carry none" in proc.stdout


@pytest.mark.launches
def test_resume_auto_skips_a_newest_checkpoint_damaged_in_its_metadata(tmp_path):
    d = tmp_path / "run"
    common = ["--hidden", "16", "--epochs", "1", "--checkpoint-every", "2", "--keep", "0",
              "--eval-every", "0", "--checkpoint-dir", str(d), "--run-dir", ""]  # fmt: skip
    proc, _ = tool("hpcnn.train", [*common, "--max-steps", "4"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    damaged = tmp_path / "damaged.h5"
    flip_object_header(d / "ckpt-000000004.h5", damaged)
    (d / "ckpt-000000004.h5").write_bytes(damaged.read_bytes())
    proc, _ = tool("hpcnn.train", [*common, "--max-steps", "6", "--resume", "auto"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if "resume: skipping" in line]
    assert len(notes) == 1 and f"checkpoint {d / 'ckpt-000000004.h5'} is corrupt" in notes[0], proc.stdout
    assert f"resumed from {d / 'ckpt-000000002.h5'}: step 2" in proc.stdout
    assert verify(d / "ckpt-000000004.h5") and verify(d / "ckpt-000000006.h5")  # rewritten whole
    # the skipped file is kept, not overwritten: its check may only have stalled
    assert (d / "ckpt-000000004.h5.unreadable").read_bytes() == damaged.read_bytes()
    assert "resume: kept ckpt-000000004.h5 as ckpt-000000004.h5.unreadable" in proc.stdout
    for module, args in (("hpcnn.train", ["--hidden", "16", "--run-dir", "", "--resume", str(damaged)]),
                         ("hpcnn.evaluate", ["--checkpoint", str(damaged)])):  # fmt: skip
        proc, _ = tool(module, args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
        assert proc.stderr.count("hpcnn: error:") == 1 and f"checkpoint {damaged} is corrupt" in proc.stderr
