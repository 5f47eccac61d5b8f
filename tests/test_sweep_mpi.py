"""Sweeps in-process at every MPI world size CTest launches (groups of 2); the sweep file, the
summary and real ``mpiexec`` launches are in ``test_sweep.py``."""

import csv
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import tensors
from test_sweep import SWEEP, results

from hpcnn.io.checkpoints import checkpoints

pytestmark = pytest.mark.mpi(min_size=2)


def test_every_task_runs_once_and_equals_the_same_training_alone():
    """5 tasks in groups of 2: each ran exactly once, the failing one is recorded and the others
    go on, and each finished task's final state is bitwise that of the task run alone on 2 ranks."""
    from hpcnn.parallel.comm import Comm
    from hpcnn.sweep import Sweep, task_config
    from hpcnn.train import fit

    world = Comm.world()
    if world.size % 2:
        pytest.skip("groups of 2 need an even number of ranks")
    d = Path(world.bcast(tempfile.mkdtemp(prefix="hpcnn-sweep-") if world.is_root else None))
    path = d / "s.toml"
    if world.is_root:
        path.write_text(SWEEP.format(epochs=2))
    world.Barrier()
    sweep = Sweep(world, path, directory=d / "out")
    assert sweep.run(lambda *a: None) == 0
    problems = []
    pair = world.Split(0 if world.rank < 2 else 1, world.rank)
    for i, settings in enumerate(sweep.tasks[:4]):
        if world.rank < 2:  # the same task alone on a group of 2, into its own directory
            cfg = task_config(sweep.base, settings, d / "alone" / str(i))
            fit(cfg, pair)
        world.Barrier()
        if world.is_root:
            a = tensors(checkpoints(sweep.task_dir(i) / "checkpoints")[0])
            b = tensors(checkpoints(d / "alone" / str(i) / "checkpoints")[0])
            problems += [f"task {i}: {k} differs" for k in a if not np.array_equal(a[k], b[k])]
    pair.Free()
    if world.is_root:
        records = results(d / "out")
        assert [r["task"] for r in records] == [0, 1, 2, 3, 4]
        assert len({r["invocation"] for r in records}) == 1  # one run, each task once
        assert [r["status"] for r in records] == ["done"] * 4 + ["failed"]
        assert records[4]["message"] == "lr = -1.0: must be > 0"
        with open(d / "out" / "summary.csv") as fh:
            assert len(list(csv.reader(fh))) == 6
    problems = world.bcast(problems)
    world.Barrier()
    if world.is_root:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    assert not problems, problems
