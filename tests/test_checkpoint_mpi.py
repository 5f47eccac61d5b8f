"""Checkpoints over MPI, at every world size CTest launches (2, 4, 8).

- same layout: stopping at a checkpoint and resuming gives bitwise the per-step losses and
  parameters of the uninterrupted run, for data-parallel and data x pipeline layouts;
- another layout: a checkpoint written by one grid loads bitwise into every other grid that fits,
  and training continues on the same global batches (final parameters equal to rounding);
- a signal on one rank stops every rank after the same step;
- the parallel-HDF5 writer (where h5py has it) stores the same bytes as the gathering writer;
- a write error on a writing rank ends every rank with the same error and leaves no temporary file.

Rank 0 creates one directory for all ranks and reads the files; verdicts are broadcast so that
all ranks pass or fail together (no rank is left waiting in a collective of another test).
"""

import os

import h5py
import numpy as np
import pytest
from test_checkpoint import SignalAtStep, tensors

from hpcnn.config import Config
from hpcnn.errors import EXIT_IO, JobError
from hpcnn.io import checkpoints as checkpoint
from hpcnn.io.checkpoints import h5py_parallel, writing
from hpcnn.parallel import faults
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit
from hpcnn.training import engine

pytestmark = pytest.mark.mpi(min_size=2)

# digits: 1438 rows / 100 = 15 steps per epoch, 30 in all; 2 micro-batches per step.
BASE = dict(hidden=[32, 16], epochs=2, batch_size=100, eval_every=0, seed=5, micro_batches=2)
STEPS = 30


def stage_counts(size: int) -> list[int]:
    return [p for p in (1, 2, 4) if size % p == 0 and p <= 5]  # the model has 5 layers


def agreed(world, problems: list) -> None:
    """Fail on every rank if any rank found a problem."""
    everything = [p for rank_problems in world.allgather(problems) for p in rank_problems]
    assert not everything, everything


def on_root(world, check) -> None:
    problems = []
    if world.is_root:
        try:
            problems = check()
        except Exception as exc:  # noqa: BLE001  (reported on every rank)
            problems = [f"{type(exc).__name__}: {exc}"]
    agreed(world, world.bcast(problems))


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_resume_on_the_same_layout_is_bitwise_identical(world, shared, stages):
    if stages not in stage_counts(world.size):
        pytest.skip(f"{stages} stages do not fit {world.size} ranks and a 5-layer model")
    a, b = os.path.join(shared, "a"), os.path.join(shared, "b")
    layout = dict(BASE, pipeline_stages=stages)
    straight = fit(Config(**layout, checkpoint_dir=a, checkpoint_every=7), world)
    resumed = fit(Config(**layout, checkpoint_dir=b, resume=os.path.join(a, "ckpt-000000021.h5")), world)
    problems = []
    if resumed.step_losses != straight.step_losses[21:]:
        problems.append(f"rank {world.rank}: per-step losses differ after the resume")
    if not np.array_equal(resumed.model.params.data, straight.model.params.data):
        problems.append(f"rank {world.rank}: parameters differ")
    agreed(world, problems)

    def same_files():
        x, y = tensors(os.path.join(a, "ckpt-000000030.h5")), tensors(os.path.join(b, "ckpt-000000030.h5"))
        return [k for k in x if not np.array_equal(x[k], y[k])]

    on_root(world, same_files)


def test_a_checkpoint_loads_exactly_into_every_layout_and_continues(world, shared):
    """Written by (size/2 replicas x 2 stages); resumed by every grid that fits this world size."""
    src = os.path.join(shared, "src")
    straight = fit(Config(**BASE, pipeline_stages=2, checkpoint_dir=src, checkpoint_every=7, keep=0), world)
    first = os.path.join(src, "ckpt-000000007.h5")
    for stages in stage_counts(world.size):
        for micro in (1, 3):
            # max_steps = 7: load, train nothing, write the loaded state to a new directory.
            d = os.path.join(shared, f"load-{stages}-{micro}")
            layout = dict(BASE, pipeline_stages=stages, micro_batches=micro)
            loaded = fit(Config(**{**layout, "max_steps": 7}, checkpoint_dir=d, resume=first), world)
            assert loaded.steps == 7

            def exact(d=d, stages=stages):
                x, y = tensors(first), tensors(os.path.join(d, "ckpt-000000007.h5"))
                return [f"{stages} stages: {k} differs" for k in x if not np.array_equal(x[k], y[k])]

            on_root(world, exact)
            d = os.path.join(shared, f"continue-{stages}-{micro}")
            cont = fit(Config(**layout, checkpoint_dir=d, resume=first), world)
            assert cont.steps == STEPS
            # Epoch losses are sums over the same global batches (same data order).
            for r, s in zip(cont.history, straight.history, strict=True):
                assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)

            def close(d=d, stages=stages, micro=micro):
                x = tensors(os.path.join(src, "ckpt-000000030.h5"))
                y = tensors(os.path.join(d, "ckpt-000000030.h5"))
                return [
                    f"{stages} stages, {micro} micro-batches: {k} differs beyond rounding"
                    for k in x
                    if k.startswith("model/") and not np.allclose(x[k], y[k], rtol=1e-4, atol=1e-6)
                ]

            on_root(world, close)


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(world, shared, monkeypatch):
    layout = dict(BASE, pipeline_stages=2)
    straight = fit(Config(**layout), world)
    make = engine.make_optimizer
    monkeypatch.setattr(
        engine,
        "make_optimizer",
        lambda cfg: SignalAtStep(make(cfg), 10) if Comm.world().rank == 1 else make(cfg),
    )
    d = os.path.join(shared, "run")
    stopped = fit(Config(**layout, checkpoint_dir=d), world)
    monkeypatch.setattr(engine, "make_optimizer", make)
    agreed(
        world,
        [] if (stopped.stopped, stopped.steps) == ("SIGUSR1", 11) else [f"rank {world.rank}: {stopped}"],
    )
    on_root(world, lambda: [] if os.listdir(d) == ["ckpt-000000011.h5"] else [os.listdir(d)])
    resumed = fit(Config(**layout, checkpoint_dir=d, resume="auto"), world)
    problems = []
    if stopped.step_losses + resumed.step_losses != straight.step_losses:
        problems.append(f"rank {world.rank}: losses differ")
    if not np.array_equal(resumed.model.params.data, straight.model.params.data):
        problems.append(f"rank {world.rank}: parameters differ")
    agreed(world, problems)


@pytest.mark.skipif(not h5py_parallel(), reason="h5py was built without parallel HDF5 (no mpio driver)")
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("zero", [0, 2])
def test_the_parallel_writer_stores_the_same_bytes_as_the_gathering_one(world, shared, stages, zero):
    """... also when the optimizer state is sharded over the replicas (``--zero 2``: each writer
    gathers the parts to replica 0 of the stage)."""
    runs = {}
    for io in ("mpio", "gather"):
        runs[io] = os.path.join(shared, io)
        cfg = Config(**BASE, pipeline_stages=stages, max_steps=9, checkpoint_dir=runs[io], checkpoint_io=io,
                     zero=zero, optimizer="adam")  # fmt: skip
        fit(cfg, world)

    def same_bytes():
        problems = []
        f = h5py.File(os.path.join(runs["mpio"], "ckpt-000000009.h5"), "r")
        g = h5py.File(os.path.join(runs["gather"], "ckpt-000000009.h5"), "r")
        with f, g:
            assert f["layout"].attrs["io"] == b"mpio" and g["layout"].attrs["io"] == b"gather"
            # Digests are computed from the values before writing, the same way by both writers.
            if f.attrs["tensor_digests"] != g.attrs["tensor_digests"]:
                problems.append("tensor_digests differ")
            names = []
            f.visititems(lambda n, o: names.append(n) if hasattr(o, "shape") else None)
            for n in names:
                a, b = f[n], g[n]
                props = lambda d: (d.shape, d.dtype, d.chunks, d.fletcher32)  # noqa: E731
                if props(a) != props(b):
                    problems.append(f"{n}: dataset properties differ")
                    continue
                for i in range(a.id.get_num_chunks()):
                    where = a.id.get_chunk_info(i).chunk_offset
                    if a.id.read_direct_chunk(where) != b.id.read_direct_chunk(where):
                        problems.append(f"{n}: chunk {where} differs")
        checkpoint.verify(os.path.join(runs["mpio"], "ckpt-000000009.h5"))
        return problems

    on_root(world, same_bytes)


@pytest.mark.parametrize("io", ["gather", "mpio"])
def test_a_write_error_on_a_writing_rank_is_agreed_by_every_rank(world, shared, io, monkeypatch):
    """``HPCNN_FAULT=enospc@checkpoint``: the gathering writer's rank 0, or the last rank of the
    parallel writer, fails part-way; every rank raises the same ``JobError`` (exit 74), no
    temporary file is left and the earlier checkpoints stay."""
    if io == "mpio" and not h5py_parallel():
        pytest.skip("h5py was built without parallel HDF5 (no mpio driver)")
    writer = 0 if io == "gather" else world.size - 1
    monkeypatch.setenv(faults.VARIABLE, f"enospc@checkpoint:rank={writer},step=8")  # the write after step 9
    cfg = Config(**BASE, pipeline_stages=2, max_steps=9, checkpoint_every=3, checkpoint_dir=shared,
                 checkpoint_io=io)  # fmt: skip
    with pytest.raises(JobError) as exc:
        fit(cfg, world)
    message = exc.value.message
    problems = [] if exc.value.exit_code == EXIT_IO else [f"exit code {exc.value.exit_code}"]
    if "ckpt-000000009.h5 failed: [Errno 28] No space left on device; a checkpoint needs" not in message:
        problems.append(message)
    agreed(world, problems)
    on_root(world, lambda: [] if sorted(os.listdir(shared)) == ["ckpt-000000003.h5", "ckpt-000000006.h5"]
            else [f"left behind: {sorted(os.listdir(shared))}"])  # fmt: skip


@pytest.mark.skipif(not h5py_parallel(), reason="h5py was built without parallel HDF5 (no mpio driver)")
@pytest.mark.parametrize("spare", [1.5, 3.0])
def test_with_little_room_to_spare_auto_writes_with_the_gathering_writer(world, shared, spare, monkeypatch):
    """Parallel HDF5 cannot survive a disk filling part-way through a write; below
    ``MPIO_MARGIN`` x the estimate ``auto`` leaves the write to the gathering writer."""
    estimate = {}

    def free(directory):  # as much free space as ``spare`` x the checkpoint's estimate
        return int(spare * estimate["bytes"]) if estimate else 1 << 40

    real = checkpoint.estimate_bytes

    def remember(*args, **kwargs):
        estimate["bytes"] = real(*args, **kwargs)
        return estimate["bytes"]

    monkeypatch.setattr(writing, "estimate_bytes", remember)
    monkeypatch.setattr(writing, "free_bytes", free)
    cfg = Config(**BASE, max_steps=3, checkpoint_dir=shared, checkpoint_io="auto")
    fit(cfg, world)
    expected = b"gather" if spare < checkpoint.MPIO_MARGIN else b"mpio"

    def written_by():
        path = os.path.join(shared, "ckpt-000000003.h5")
        checkpoint.verify(path)  # the layout attribute changed with the writer: the digest still holds
        with h5py.File(path, "r") as f:
            io = f["layout"].attrs["io"]
        return [] if io == expected else [f"written by {io}, expected {expected}"]

    on_root(world, written_by)
