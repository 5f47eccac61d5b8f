"""``--zero 1|2`` (optimizer state and gradients sharded over the replicas) computes what ``--zero 0``
computes, at every world size, in a data-parallel x pipeline grid, with clipping and an uneven
shard; bitwise with ``--deterministic``; and its checkpoints resume across zero levels and layouts
(zero 2 at N ranks -> zero 0 on one rank -> zero 1 in a 2 x 2 grid) to the uninterrupted result,
optimizer state included.
"""

import os

import numpy as np
import pytest
from test_cnn_mpi import agreed, compare  # (atol 0: bitwise)

import hpcnn
from hpcnn import Dense, ReLU, Tanh, Trainer
from hpcnn.io.checkpoints.writers import Part
from hpcnn.parallel.comm import Comm

SETTINGS = dict(
    dtype="float64", batch_size=24, epochs=2, lr=0.02, seed=7, eval_every=0, lr_schedule="constant",
    log=None, clip_norm=0.3, bucket_mb=0.002,
)  # fmt: skip
OPTIMIZERS = {
    "sgd-momentum": dict(optimizer="sgd", momentum=0.9),
    "adam": dict(optimizer="adam"),
    "adamw": dict(optimizer="adamw", weight_decay=0.01),
}


def mlp():
    # 323 parameters (17 x 19): no even replica count divides them, the shards are uneven
    return [Dense(11, 13), ReLU(), Dense(13, 7), Tanh(), Dense(7, 6), ReLU(), Dense(6, 3)]


PARAMETERS = 11 * 13 + 13 + 13 * 7 + 7 + 7 * 6 + 6 + 6 * 3 + 3


def data(rows=96, test_rows=24, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows + test_rows, 11))
    y = (x[:, :3] @ rng.normal(size=(3, 3))).argmax(axis=1)
    return hpcnn.arrays(x[:rows], y[:rows], x[rows:], y[rows:])


def state_of(t) -> dict:
    """This rank's stage's parameters and whole optimizer state (gathered from the replicas where
    it is sharded: collective over the stage's replicas), by global layer index and name."""
    result = t.result
    grid, opt, params = result.grid, t.optimizer, result.model.params
    first = result.bounds[grid.stage]
    out = {}
    for slot in params.slots:
        out[f"{first + slot.layer}/{slot.name}"] = params.view(params.data, slot).copy()
    for name in sorted(opt.state):
        lo = getattr(opt.params, "lo", None)
        buf = opt.state[name]
        whole = buf if lo is None else Part(buf, lo, params.size).gather(grid.dp, 0, params.size, 0)
        if whole is None:  # (not replica 0: the gathered state is compared there)
            continue
        for slot in params.slots:
            out[f"{first + slot.layer}/{name}/{slot.name}"] = params.view(whole, slot).copy()
    out["t"] = np.array([opt.t])
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("stages", [1, 2])
def test_zero_1_and_2_equal_zero_0(world, optimizer, stages):
    if world.size % stages:
        pytest.skip(f"{stages} stages need a rank count divisible by {stages}")
    assert stages > 1 or PARAMETERS % world.size, "the shards should be uneven"
    settings = dict(SETTINGS, **OPTIMIZERS[optimizer], pipeline_stages=stages)
    if stages > 1:
        settings["micro_batches"] = 3  # (deferred weight gradients: what ZeRO 2 elsewhere refuses)
    arrays = data()
    t = Trainer(mlp(), arrays, comm=world, zero=0, **settings)
    t.fit()
    reference = state_of(t)
    problems = []
    for level in (1, 2):
        t = Trainer(mlp(), arrays, comm=world, zero=level, **settings)
        t.fit()
        problems += compare(world, state_of(t), reference, 1e-10, f"zero {level}, {stages} stage(s)")
    # and with gradient accumulation over micro-batches on one stage (ZeRO 2 defers weight gradients)
    if stages == 1:
        one = dict(settings, micro_batches=4)
        t = Trainer(mlp(), arrays, comm=world, zero=0, **one)
        t.fit()
        reference = state_of(t)
        t = Trainer(mlp(), arrays, comm=world, zero=2, **one)
        t.fit()
        problems += compare(world, state_of(t), reference, 1e-10, "zero 2, 4 micro-batches")
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stages", [1, 2])
def test_zero_is_bitwise_zero_0_in_deterministic_mode(world, stages):
    if world.size % stages:
        pytest.skip(f"{stages} stages need a rank count divisible by {stages}")
    settings = dict(SETTINGS, dtype="float32", deterministic=True, shard_rows=3, optimizer="adam")
    arrays = data()
    serial = Trainer(mlp(), arrays, comm=Comm.serial(), zero=0, **settings)
    serial.fit()
    reference = state_of(serial)
    problems = []
    for level in (1, 2):
        t = Trainer(mlp(), arrays, comm=world, zero=level, pipeline_stages=stages, **settings)
        t.fit()
        problems += compare(
            world, state_of(t), reference, 0, f"deterministic zero {level}, {stages} stage(s)"
        )
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
def test_zero_checkpoints_resume_across_levels_and_layouts(world, shared):
    """zero 2 at N ranks -> zero 0 on one rank -> zero 1 at 4 ranks as 2 x 2 (at 2 ranks: 2 x 1),
    each part stopped by max_steps, equals the uninterrupted run: parameters, optimizer state, t."""
    settings = dict(SETTINGS, optimizer="adam", epochs=3)  # 12 steps
    arrays = data()
    straight = Trainer(mlp(), arrays, comm=Comm.serial(), **settings)
    straight.fit()
    reference = state_of(straight)
    a, b = os.path.join(shared, "a"), os.path.join(shared, "b")
    first = Trainer(mlp(), arrays, comm=world, zero=2, max_steps=4, checkpoint_dir=a, **settings).fit()
    assert first.steps == 4
    problems = []
    if world.rank == 0:
        second = Trainer(
            mlp(), arrays, comm=Comm.serial(), zero=0, resume=first.checkpoint, checkpoint_dir=b, max_steps=9,
            **settings,
        )  # fmt: skip
        if second.fit().steps != 9:
            problems.append("the zero 0 part did not stop at step 9")
    world.Barrier()
    ranks = 4 if world.size >= 4 else 2
    sub = world.Split(0 if world.rank < ranks else 1, world.rank)
    try:
        if world.rank < ranks:
            stages = 2 if ranks == 4 else 1
            third = Trainer(
                mlp(), arrays, comm=sub, zero=1, pipeline_stages=stages, resume="auto", checkpoint_dir=b,
                **settings,
            )  # fmt: skip
            if third.fit().steps != 12:
                problems.append(f"rank {world.rank}: the zero 1 part did not end at step 12")
            problems += compare(world, state_of(third), reference, 1e-12, f"zero 1 at {ranks} ranks")
    finally:
        sub.Free()
    agreed(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", ["on", "off"])
@pytest.mark.parametrize("level", [1, 2])
def test_large_buckets_are_reduced_right(world, overlap, level):
    """Buckets of ~90,000 values (sent with MPI's rendezvous protocol, read as the transfer
    progresses): a zero 2 staging arena reused before its bucket's reduce-scatter finished would
    send the next bucket's gradients (measured: a 0.03 difference when consecutive buckets shared
    it); at zero 1, an in-place reduce-scatter of a bucket inside one replica's part made MPICH
    abort."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 200)), rng.integers(0, 4, 64)

    def wide():
        return [Dense(200, 300), ReLU(), Dense(300, 300), ReLU(), Dense(300, 300), ReLU(), Dense(300, 4)]

    settings = dict(SETTINGS, epochs=1, batch_size=32, optimizer="adam", bucket_mb=0.1, overlap=overlap)
    states = []
    for zero in (0, level):
        t = Trainer(wide(), hpcnn.arrays(x, y), comm=world, zero=zero, **settings)
        t.fit()
        states.append(state_of(t))
    agreed(world, compare(world, states[1], states[0], 1e-10, f"zero {level}, overlap {overlap}"))


# --- memory: what a rank allocates against the formula ------------------------------------------

WIDTH, DEPTH = 384, 12  # 12 equal Dense layers: 1.77 M float32 parameters, one bucket each


def measured_bytes(comm, level: int) -> tuple[int, int, int]:
    """``(bytes, parameters, part)``: what building a stage's flat buffers, its ``zero`` level's
    gradient synchronisation and a bound Adam allocate on this rank and still hold (tracemalloc:
    numpy reports its buffers), the parameter count, and this rank's part of it."""
    import tracemalloc

    from hpcnn.core.optim import Adam
    from hpcnn.core.params import FlatParams
    from hpcnn.parallel.data_parallel import DataParallel
    from hpcnn.parallel.zero import ZeroSync, plan, shard_bounds

    layers = [Dense(WIDTH, WIDTH) for _ in range(DEPTH)]
    bucket_mb = (WIDTH * WIDTH + WIDTH) * 4 / 2**20  # one layer per bucket
    tracemalloc.start()
    try:
        params = FlatParams(layers, np.float32)
        if level:
            sync = ZeroSync(comm, params, level, layers, bucket_mb=bucket_mb)
        else:
            sync = DataParallel(comm, params, bucket_mb=bucket_mb)
        opt = Adam().bind(sync.optimizer_params())
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # what --dry-run reports is what was allocated
    planned = plan(params, layers, level, comm.size, comm.rank, 1, bucket_mb)
    assert planned == (sync.grad_bytes() // 4, len(opt.state["m"])), (planned, sync.grad_bytes())
    lo, hi = shard_bounds(params.size, comm.size)[comm.rank]
    return held, params.size, hi - lo


def formula_bytes(level: int, size: int, part: int, replicas: int) -> int:
    """Adam in float32: parameters 4 P; gradients 4 P (zero 0), 4 P + 4 P / d (zero 1: the whole
    gradient and the reduced part) or 4 P / d plus the two largest consecutive buckets (zero 2: two
    layers here); two moments 8 P (zero 0) or 8 P / d; and the optimizer's one block of scratch
    (256 KiB, or the part if smaller)."""
    layer = WIDTH * WIDTH + WIDTH
    scratch = 4 * min(part if level else size, 2**16)
    if level == 0:
        return 16 * size + scratch
    if level == 1:
        return 8 * size + (12 * part if replicas > 1 else 8 * part) + scratch
    staging = 2 * layer if replicas > 1 else 0
    grads = 4 * part + 4 * staging if replicas > 1 else 4 * size
    return 4 * size + grads + 8 * part + scratch


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_bytes_per_rank_match_the_formula(world, level):
    held, size, part = measured_bytes(world, level)
    expected = formula_bytes(level, size, part, world.size)
    problems = []
    what = f"rank {world.rank}, zero {level} at d = {world.size}"
    if abs(held - expected) > 0.05 * expected:
        problems.append(f"{what}: {held:,} bytes, formula {expected:,}")
    agreed(world, problems)
    if world.rank == 0:  # (-s shows the table of docs/performance.md)
        print(f"{what}: {held / size:.2f} bytes per parameter (formula {expected / size:.2f})")
