"""``--deterministic``: the canonical summation tree, the shard threads, and real launches.

- ``tree_nodes`` cuts any replica's shard range into whole nodes of the one canonical tree, so that
  completing the tree from every replica's subtrees adds in exactly the order of one rank;
- shard threads run every piece once and pass errors on;
- one rank: bitwise the same training with 1 or 2 shard threads and 1 or 4 micro-batches;
- real ``mpiexec`` launches: 3 ranks (CTest's MPI legs run 2, 4, 8: ``test_deterministic_mpi.py``),
  and a checkpoint written at 8 ranks mid-epoch, resumed at 2, ending with bitwise the parameters
  and optimizer state of an uninterrupted one-rank run.
"""

import numpy as np
import pytest
from launch import run
from test_checkpoint import tensors
from threadpoolctl import threadpool_limits

from hpcnn.config import Config
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.deterministic import Workers, _complete, exact_sum, shard_range, tree_nodes, tree_split
from hpcnn.train import fit


def canonical_nodes(a: int, b: int) -> set:
    nodes = {(a, b)}
    if b - a > 1:
        mid = tree_split(a, b)
        nodes |= canonical_nodes(a, mid) | canonical_nodes(mid, b)
    return nodes


def tree_sum(values, a, b):
    if b - a == 1:
        return values[a].copy()
    mid = tree_split(a, b)
    return tree_sum(values, a, mid) + tree_sum(values, mid, b)


def test_tree_split_keeps_aligned_power_of_two_blocks_whole():
    assert tree_split(0, 8) == 4 and tree_split(0, 5) == 4 and tree_split(0, 3) == 2
    assert tree_split(4, 8) == 6 and tree_split(8, 16) == 12 and tree_split(0, 2) == 1


@pytest.mark.parametrize("total", [1, 2, 3, 5, 8, 13, 16, 23])
def test_tree_nodes_cover_a_range_with_nodes_of_the_canonical_tree(total):
    tree = canonical_nodes(0, total)
    for lo in range(total):
        for hi in range(lo + 1, total + 1):
            nodes = tree_nodes(lo, hi, total)
            assert all(node in tree for node in nodes)
            assert [i for a, b in nodes for i in range(a, b)] == list(range(lo, hi))
    assert tree_nodes(3, 3, total) == []


@pytest.mark.parametrize("total", [1, 3, 7, 16, 23])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_completing_the_tree_from_replica_subtrees_adds_in_the_canonical_order(total, replicas):
    """Float32 values of very different sizes: any other order of the additions rounds differently."""
    rng = np.random.default_rng(total * 10 + replicas)
    values = (rng.standard_normal((total, 257)) * 10.0 ** rng.integers(-6, 6, (total, 1))).astype(np.float32)
    expected = tree_sum(values, 0, total)
    parts = {}
    for r in range(replicas):
        first, count = shard_range(total, replicas, r)
        for a, b in tree_nodes(first, first + count, total):
            parts[a, b] = tree_sum(values, a, b)  # what replica r adds up on its own
    assert _complete(parts, 0, total).tobytes() == expected.tobytes()
    in_order = values[0].copy()
    for v in values[1:]:
        in_order += v
    if total > 3:  # the check has teeth: a left-to-right sum differs in some bits (3: the same tree)
        assert in_order.tobytes() != expected.tobytes()


def test_workers_run_every_piece_once_and_pass_errors_on():
    workers = Workers(3)
    try:
        seen = []
        workers.run(seen.append, 10)
        assert sorted(seen) == list(range(10))
        workers.run(seen.append, 0)

        def fail(i):
            if i == 7:
                raise ValueError("piece 7")

        with pytest.raises(ValueError, match="piece 7"):
            workers.run(fail, 10)
    finally:
        workers.close()


def test_exact_sums_are_order_free_and_overflow_like_floats():
    values = [1e16, 1.0, -1e16, 1.0]
    assert exact_sum(values) == exact_sum(values[::-1]) == 2.0  # a float loop gives 0.0 or 1.0
    assert exact_sum([1e308, 1e308]) == float("inf")  # the non-finite checks must see it
    assert np.isnan(exact_sum([float("inf"), -float("inf")]))


def digest(result) -> bytes:
    return result.model.params.data.tobytes()


DET = dict(deterministic=True, shard_rows=4, max_steps=25, epochs=2, clip_norm=0.5, run_dir="")


def test_one_rank_is_the_same_with_any_thread_and_micro_batch_count():
    comm = Comm.serial()
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):  # becomes the shard thread count
            for micro in (1, 4):
                result = fit(Config(**DET, micro_batches=micro), comm)
                runs.append((digest(result), result.step_losses, result.final))
    assert all(run == runs[0] for run in runs[1:])
    # the trained model stays usable after training (its shard threads are gone)
    with threadpool_limits(2, user_api="blas"):
        result = fit(Config(**DET), comm)
    x = np.ones((9, 64), dtype=np.float32)
    assert result.model.forward(x, train=False).shape == (9, 10)


def test_the_shard_size_is_part_of_the_recipe():
    """Other shards sum in another order: other bits (the docs tell users to keep shard_rows)."""
    comm = Comm.serial()
    a = fit(Config(**DET), comm)
    b = fit(Config(**{**DET, "shard_rows": 8}), comm)
    assert digest(a) != digest(b)
    # 25 Adam steps (updates of ~lr whatever the gradient's size) grow last-bit differences: close, not equal
    np.testing.assert_allclose(a.model.params.data, b.model.params.data, rtol=1e-2, atol=1e-4)


def launch(ranks: int, args) -> None:
    proc = run("hpcnn.train", ["--quiet", *args], ranks=ranks, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def state(path) -> dict:
    return {k: v for k, v in tensors(path).items() if k.startswith(("model/", "optimizer/"))}


def assert_same_state(path, reference) -> None:
    mine, theirs = state(path), state(reference)
    assert sorted(mine) == sorted(theirs)
    different = [k for k in mine if mine[k].tobytes() != theirs[k].tobytes()]
    assert not different, different


def flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


@pytest.mark.launches
def test_three_ranks_and_a_restart_from_eight_ranks_onto_two_match_one_rank(tmp_path):
    reference = tmp_path / "one"
    fit(Config(**DET, checkpoint_dir=str(reference)), Comm.serial())
    final = "ckpt-000000025.h5"
    common = flags({k: v for k, v in DET.items() if k != "run_dir"}) + ["--run-dir", ""]
    launch(3, [*common, "--micro-batches", "4", "--checkpoint-dir", str(tmp_path / "three")])
    assert_same_state(tmp_path / "three" / final, reference / final)
    # step 10 of the first epoch's 23, written by 8 ranks; resumed by 2
    every = ["--checkpoint-every", "10", "--keep", "0"]
    launch(8, [*common, "--checkpoint-dir", str(tmp_path / "eight"), *every])
    middle = tmp_path / "eight" / "ckpt-000000010.h5"
    launch(2, [*common, "--checkpoint-dir", str(tmp_path / "two"), "--resume", str(middle)])
    assert_same_state(tmp_path / "two" / final, reference / final)
