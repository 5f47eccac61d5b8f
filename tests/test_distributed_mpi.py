"""The invariants of data parallelism, asserted at whatever world size the suite runs at.

Run with ``mpiexec -n N python -m pytest --with-mpi -m mpi tests`` (CTest does N = 2, 4, 8).
Every test compares the distributed result with a serial run of the same settings on
``COMM_SELF``, trained by rank 0 and broadcast.
"""

import dataclasses
import hashlib
import os
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from hpcnn.config import Config
from hpcnn.errors import JobError, UserError
from hpcnn.io.datasets import EpochSampler, open_dataset, write_h5
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.data_parallel import DataParallel
from hpcnn.train import fit

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def serial(world):
    """``serial(cfg)``: rank 0 trains ``cfg`` alone on COMM_SELF; every rank gets its result."""
    alone = Comm.serial()

    def run(cfg):
        ref = None
        if world.is_root:
            r = fit(cfg, alone)
            ref = SimpleNamespace(
                params=r.model.params.data, steps=r.steps, history=r.history, final=r.final,
                fan_out=r.model.layers[-1].fan_out,
            )  # fmt: skip
        return world.bcast(ref)

    return run


def assert_replicas_identical(world, params):
    digest = hashlib.sha256(params.data.tobytes()).hexdigest()
    assert len(set(world.allgather(digest))) == 1, "ranks hold different parameters"


CASES = [
    # 45 steps cross the epoch boundary and include the last partial batch (1438 = 38 * 37 + 32).
    ("float64", 1e-10, dict(batch_size=37, optimizer="sgd", momentum=0.9, nesterov=True)),
    ("float32", 1e-5, dict(batch_size=37, optimizer="sgd", momentum=0.9)),
    ("float64", 1e-10, dict(batch_size=64, optimizer="adam", weight_decay=1e-4)),
    ("float32", 1e-5, dict(batch_size=37, optimizer="adamw", weight_decay=1e-2)),
    ("float64", 1e-10, dict(batch_size=37, optimizer="sgd", momentum=0.9, lr=0.5, clip_norm=0.5)),
    (
        "float64",
        1e-10,
        dict(batch_size=53, loss="mse", activation="tanh", optimizer="sgd", momentum=0.9, lr=0.1),
    ),
]


@pytest.mark.parametrize("dtype,tol,settings", CASES)
def test_distributed_equals_serial(world, serial, dtype, tol, settings):
    cfg = Config(hidden=[32, 16], dtype=dtype, epochs=2, max_steps=45, eval_every=0, seed=5, **settings)
    dist = fit(cfg, world)
    ref = serial(cfg)
    assert dist.steps == ref.steps == 45
    diff = np.abs(dist.model.params.data.astype(np.float64) - ref.params).max()
    assert diff < tol, f"max |distributed - serial| = {diff:.3e} at {world.size} ranks"
    assert_replicas_identical(world, dist.model.params)
    for a, b in zip(dist.history, ref.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=tol, abs=tol)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-12)
    assert dist.final["rows"] == ref.final["rows"] == 359
    assert dist.final["loss"] == pytest.approx(ref.final["loss"], rel=tol, abs=tol)


def test_full_default_run_matches_serial(world, serial):
    dist, ref = fit(Config(), world), serial(Config())
    assert dist.final["accuracy"] >= 0.97
    assert dist.final["accuracy"] == pytest.approx(ref.final["accuracy"], abs=1e-12)
    assert np.abs(dist.model.params.data - ref.params).max() < 1e-4
    assert_replicas_identical(world, dist.model.params)


def test_ranks_with_empty_slices_still_match_serial(world, serial, shared):
    """Fewer rows than ranks in a batch (xor: 4 rows), and regression with a 1-row last batch."""
    xor = Config(data="xor", batch_size=max(4, world.size), hidden=[8], activation="tanh", lr=0.05,
                 epochs=30, lr_schedule="constant", dtype="float64")  # fmt: skip
    dist, ref = fit(xor, world), serial(xor)
    assert np.abs(dist.model.params.data - ref.params).max() < 1e-10
    path = os.path.join(shared, "reg.h5")
    if world.is_root:
        rng = np.random.default_rng(1)
        x = rng.normal(size=(257, 3)).astype(np.float32)
        with h5py.File(path, "w") as f:
            f["x"], f["y"] = x, (x[:, 0] - 2 * x[:, 1]).astype(np.float32)  # 1-D float targets
    world.Barrier()
    reg = Config(
        data=path, loss="mse", hidden=[8], epochs=2, batch_size=64, dtype="float64", test_fraction=0.1
    )
    dist, ref = fit(reg, world), serial(reg)
    assert dist.steps == ref.steps == 2 * 4  # 231 training rows: 3 full batches and one of 39
    assert np.abs(dist.model.params.data - ref.params).max() < 1e-10
    assert dist.final["loss"] == pytest.approx(ref.final["loss"], rel=1e-10)


def test_sampler_covers_every_row_once_across_real_ranks(world):
    ids = np.arange(1000)
    sampler = EpochSampler(ids, 96, world.rank, world.size, seed=11)
    mine = [i for i, _ in sampler.epoch(3)]
    everyone = world.allgather(mine)
    used = np.concatenate([b for rank_batches in everyone for b in rank_batches])
    assert np.array_equal(np.sort(used), ids)
    for b in range(len(sampler)):  # batch b is the same rows however many ranks there are
        whole = np.concatenate([everyone[r][b] for r in range(world.size)])
        serial_batch = list(EpochSampler(ids, 96, 0, 1, seed=11).epoch(3))[b][0]
        assert np.array_equal(whole, serial_batch)


def test_each_rank_reads_its_own_rows_from_hdf5(world, shared):
    path = os.path.join(shared, "rows.h5")
    x = np.arange(333 * 2, dtype=np.float32).reshape(333, 2)
    if world.is_root:
        write_h5(path, x, np.arange(333) % 3, num_classes=3)
    world.Barrier()
    ds, _ = open_dataset(Config(data=path), world.rank, world.size)
    sampler = EpochSampler(ds.train.ids, 50, world.rank, world.size, seed=2)
    share = 0
    for ids, _ in sampler.epoch(0):
        xr, yr = ds.train.source.read(ids)
        assert np.array_equal(xr, x[ids]) and np.array_equal(yr, ids % 3)
        share += len(ids)
    assert ds.train.source.rows_read == share  # never more than its slices
    assert world.sum(share) == 333
    ds.close()


def test_class_count_found_by_all_ranks_together(world, serial, shared):
    path = os.path.join(shared, "noattr.h5")
    if world.is_root:
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            f["x"] = rng.normal(size=(200, 4)).astype(np.float32)
            f["y"] = np.r_[np.zeros(199, np.int64), 6]  # the largest label is in the last rank's block
    world.Barrier()
    cfg = Config(data=path, hidden=[4], epochs=1, batch_size=32)
    assert fit(cfg, world).model.layers[-1].fan_out == serial(cfg).fan_out == 7


def test_an_error_on_one_rank_is_agreed_by_all(world):
    with pytest.raises(JobError) as exc, world.agreed():
        if world.rank == world.size - 1:
            raise UserError("only the last rank saw this")
    assert exc.value.exit_code == 2
    assert exc.value.message == f"rank {world.size - 1}: only the last rank saw this"
    with pytest.raises(JobError) as exc, world.agreed():
        raise UserError("everyone saw this")
    assert exc.value.message == "everyone saw this"


def test_batch_smaller_than_world_is_rejected(world):
    with pytest.raises(JobError, match=f"batch_size = 1 is smaller than the {world.size} data-parallel"):
        fit(Config(batch_size=1), world)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_overlapped_bucket_reduction_equals_one_allreduce(world, stages, dtype):
    """Per-layer buckets reduced during backward give the blocking Allreduce's parameters: bitwise
    with two replicas (one addition per element), to rounding with more (MPI may associate sums
    differently for different message sizes). Replicas stay bitwise identical either way."""
    replicas = world.size // stages
    if world.size % stages or replicas < 2:
        pytest.skip(f"{stages} stage(s) need a multiple of {2 * stages} ranks; world: {world.size}")
    base = Config(
        hidden=[32, 16], dtype=dtype, epochs=1, max_steps=20, eval_every=0, batch_size=37, seed=3,
        optimizer="adam", pipeline_stages=stages, micro_batches=2, bucket_mb=1e-4,
    )  # fmt: skip
    on = fit(dataclasses.replace(base, overlap="on"), world)
    buckets = len(DataParallel(on.grid.dp, on.model.params, bucket_mb=1e-4).buckets)
    assert world.max(buckets) > 1, "every stage reduced one bucket only"
    off = fit(dataclasses.replace(base, overlap="off"), world)
    assert_replicas_identical(on.grid.dp, on.model.params)  # the replicas of each stage
    if replicas == 2:
        assert np.array_equal(on.model.params.data, off.model.params.data)
    else:
        tol = 1e-5 if dtype == "float32" else 1e-12
        assert np.allclose(on.model.params.data, off.model.params.data, rtol=tol, atol=tol)
