"""Verifying a checkpoint: every digest and checksum against the file, in a process that cannot hang.

``verify`` checks a file in this process: for format 2, every attribute against ``content_digest``;
every dataset through HDF5's Fletcher32 checks (per chunk, as it is read) and, for format 2,
against its ``tensor_digests`` entry; every attribute decodes.

A damaged file can still make HDF5 loop inside C code, which Python cannot interrupt, so
``--resume``, ``evaluate`` and ``python -m hpcnn.checkpoint`` verify a file in a child process
(``verify_bounded``, running ``verify_child``) that is stopped when it makes no progress for
``VERIFY_STALL_S`` seconds: the file then counts as corrupt, as it does when the child dies of
one of the signals in ``CRASHES``. The child imports no MPI, so an MPI rank can start it.
"""

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpcnn.errors import UserError
from hpcnn.io.checkpoints.fileformat import content_digest, tensor_hash
from hpcnn.io.checkpoints.reading import DAMAGE, attr_text, checked_version, info_of, open_checkpoint

# A verification that shows no progress (file opened, an attribute or a chunk of rows read) for
# this long is stopped and its file counted as corrupt: HDF5 can loop forever on damaged metadata.
VERIFY_STALL_S = 30.0
STARTUP_S = 60.0  # the verifying child's start-up allowance, before its stall clock runs
CHILD = "--verify-child"  # argv[1] of the process verify_bounded starts
# What a child reading a damaged file can die of (the rest are someone else's signals).
CRASHES = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL)


def verify(path, tensors: bool = True, progress=None) -> int:
    """Check a checkpoint in this process: for format 2, every attribute matches ``content_digest``;
    with ``tensors``, every dataset passes HDF5's Fletcher32 checks (per chunk, as it is read) and,
    for format 2, matches its ``tensor_digests`` entry; every attribute decodes (``inspect``).
    ``progress()`` is called after each step (an object's attributes, a chunk of rows). Returns
    the tensor bytes read (0 without ``tensors``).

    Raises ``UserError`` naming the file and what is damaged. HDF5 can loop forever on damaged
    metadata: whoever must not hang calls ``verify_bounded``."""
    tick = progress or (lambda: None)
    size = os.path.getsize(path)
    total = 0
    with open_checkpoint(path) as f:
        version = checked_version(path, f)
        attributes, datasets = _contents(f, tick)
        expected = None
        if version >= 2:  # the attributes are whole before anything is decoded from them
            if attr_text(attributes["/"].get("content_digest", "")) != content_digest(attributes):
                raise UserError(f"checkpoint {path}: its attributes do not match their content_digest")
            expected = json.loads(attr_text(attributes["/"]["tensor_digests"]))
            if sorted(expected) != datasets:
                raise UserError(f"checkpoint {path}: its datasets are not those its checksums list")
        for name in datasets if tensors else ():
            dset = f[name]
            if dset.fletcher32 is not True:
                raise UserError(f"checkpoint {path}: dataset {name} has no checksum")
            nbytes = dset.size * dset.dtype.itemsize
            if nbytes > size:  # a damaged shape; reading it could exhaust memory
                raise UserError(
                    f"checkpoint {path}: dataset {name} claims {nbytes} bytes; the file has {size}"
                )
            try:
                digest = _read_digest(dset, tick)
            except DAMAGE as exc:
                raise UserError(f"checkpoint {path}: dataset {name} is corrupt ({exc})") from None
            if expected is not None and digest != expected[name]:
                raise UserError(f"checkpoint {path}: dataset {name} does not match its tensor_digests entry")
            total += nbytes
        info_of(path, f, version)  # every attribute decodes (for format 1, the only check its attributes get)
    return total


def _contents(f, tick) -> tuple[dict, list]:
    """Every object's attributes (``{path: {name: value}}``, objects that have any, the root as
    ``/``) and the dataset names, sorted."""
    names = []
    f.visit(names.append)
    attributes, datasets = {}, []
    for name in ["/", *names]:
        obj = f[name]
        if hasattr(obj, "shape"):
            datasets.append(name)
        attrs = {key: obj.attrs[key] for key in obj.attrs}
        if attrs:
            attributes[name] = attrs
        tick()
    return attributes, sorted(datasets)


def _read_digest(dset, tick) -> str:
    """``tensor_digest`` of a dataset, read a chunk of rows at a time."""
    h = tensor_hash(dset.dtype, dset.shape)
    rows = dset.chunks[0]
    for start in range(0, dset.shape[0], rows):
        h.update(np.ascontiguousarray(dset[start : start + rows]).data)
        tick()
    return h.hexdigest()


def verify_bounded(path, tensors: bool = True, stall: float = VERIFY_STALL_S) -> int:
    """``verify`` in a child process, stopped when it shows no progress for ``stall`` seconds.

    The child imports no MPI, so an MPI rank can call this. Returns the tensor bytes verified;
    raises ``UserError`` naming the file if it is missing or damaged, or its verification hung
    or crashed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    # The child does no BLAS work: one thread, not one per core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # This very hpcnn, whatever the working directory holds (``-m`` would look there first).
    here = str(Path(__file__).resolve().parents[3])
    code = (
        f"import sys; sys.path.insert(0, {here!r}); "
        "from hpcnn.io.checkpoints.verification import verify_child; sys.exit(verify_child(sys.argv[2:]))"
    )
    cmd = [sys.executable, "-c", code, CHILD, str(path), f"{stall:g}"]
    proc = subprocess.Popen(
        cmd + ([] if tensors else ["--no-tensors"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # Out of the terminal's process group: a Ctrl-C is the training's to handle (it stops
        # after a step), not a reason to call this file corrupt. Orphaned, it ends by its alarm.
        start_new_session=True,
    )
    out, err = _collect(proc, stall)
    if out is None or proc.returncode == -signal.SIGALRM:  # stopped by us, or by its own alarm
        raise UserError(
            f"checkpoint {path} is corrupt: its verification made no progress for {stall:g} s and was "
            "stopped (HDF5 can loop forever on damaged metadata)"
        )
    last = (err.strip().splitlines() or [""])[-1].removeprefix("hpcnn: error: ")
    words = out.split()  # dots, then the bytes read
    if proc.returncode == 0 and words and words[-1].isdigit():
        return int(words[-1])
    if proc.returncode == 2 and last:
        raise UserError(last)
    if -proc.returncode in CRASHES:
        crash = signal.Signals(-proc.returncode).name
        raise UserError(f"checkpoint {path} is corrupt: its verification crashed ({crash})")
    code = proc.returncode
    ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
    raise UserError(
        f"checkpoint {path} could not be verified: its verification {ended}" + (f": {last}" * bool(last))
    )


def _collect(proc, stall: float) -> tuple[str | None, str]:
    """``proc``'s stdout and stderr once it has ended; stdout is ``None`` if it was killed because
    its stdout stayed silent for ``stall`` seconds."""
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    data, stalled = {out: b"", err: b""}, False
    poller = select.poll()  # not select(): it fails on descriptors >= 1024 (a large job's rank 0)
    for fd in data:
        poller.register(fd, select.POLLIN)
    live = set(data)
    # The clock starts once the child speaks: its interpreter's start-up (numpy, h5py) on a loaded
    # node is not a verification making no progress.
    heard = time.monotonic() + STARTUP_S
    try:
        while live and not stalled:
            ready = poller.poll(1000 * max(0.0, heard + stall - time.monotonic()))
            stalled = not ready
            for fd, _ in ready:
                chunk = os.read(fd, 1 << 16)
                data[fd] += chunk
                if not chunk:
                    live.discard(fd)
                    poller.unregister(fd)
                elif fd == out:
                    heard = time.monotonic()
        if not stalled:
            try:
                proc.wait(timeout=stall)  # its output is closed: it is exiting
            except subprocess.TimeoutExpired:
                stalled = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    text = {fd: chunk.decode(errors="replace") for fd, chunk in data.items()}
    return (None if stalled else text[out]), text[err]


def verify_child(argv) -> int:
    """The child ``verify_bounded`` starts (argv ``--verify-child FILE STALL [--no-tensors]``):
    ``verify`` with a dot on stdout for each step, then the tensor bytes read; exit code 2 and
    the message if damaged.

    Each step also re-arms an alarm a little beyond ``STALL``: SIGALRM's default action ends this
    process even inside HDF5's C code, so it ends by itself should its parent be gone."""
    alarm = math.ceil(float(argv[1])) + 5
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # an ignored signal would stay ignored across exec

    def beat():
        signal.alarm(alarm)
        sys.stdout.write(".")
        sys.stdout.flush()

    beat()
    try:
        total = verify(argv[0], "--no-tensors" not in argv, beat)
    except UserError as exc:
        print(f"hpcnn: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{total}")
    return 0
