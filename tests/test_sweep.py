"""Task parallelism: sweeps over groups of ranks (``hpcnn.sweep``).

The sweep file's checks and the summary, in-process at one rank; the command-line tests launch
``mpiexec -n 4`` and kill or stop the sweep part-way, then run it again. The in-process test at
every MPI world size CTest launches is in ``test_sweep_mpi.py``.
"""

import json
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import Job, run

from hpcnn.errors import UserError
from hpcnn.sweep import load_sweep

SWEEP = """
[sweep]
group_size = 2

[base]
hidden = [16]
epochs = {epochs}
eval_every = 0
batch_size = 100

[grid]
lr = [0.001, 0.01]
seed = [0, 1]

[[tasks]]
lr = -1.0
"""


def results(directory) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("tasks/task-*/result.json"))]


def test_the_sweep_file_is_checked_before_anything_runs(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(epochs=1))
    options, base, tasks = load_sweep(path)
    assert options == {"group_size": 2} and base["hidden"] == [16]
    assert tasks == [{"lr": 0.001, "seed": 0}, {"lr": 0.001, "seed": 1}, {"lr": 0.01, "seed": 0},
                     {"lr": 0.01, "seed": 1}, {"lr": -1.0}]  # fmt: skip
    for text, message in [
        ("[grid]\nlearning_rate = [0.1]\n", r"task 0: unknown key\(s\) \['learning_rate'\]"),
        ("[base]\nresume = 'auto'\n", r"\[base\]: \['resume'\] are set by the sweep"),
        ("[grid]\nelastic = [2]\n", r"task 0: elastic is for a job of one training"),
        ("[grid]\nlr = []\n", "grid.lr must be a non-empty list"),
        ("[grid]\nlr = ['fast']\n", "task 0: lr = 'fast': expected float"),
        ("[sweeep]\n", r"unknown table\(s\) \['sweeep'\]"),
        ("[sweep]\ngroup_sise = 2\n", r"\[sweep\] has no key 'group_sise'"),
        ("[sweep]\nensemble = 'false'\n", r"\[sweep\] ensemble = 'false': expected bool"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_sweep(path)


def _wait_for_a_result(out: Path, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("tasks/task-*/result.json")) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.launches
@pytest.mark.parametrize("how", ["SIGKILL", "SIGUSR1"])
def test_a_sweep_killed_or_stopped_part_way_completes_only_the_rest_when_rerun(tmp_path, how):
    path, out = tmp_path / "s.toml", tmp_path / "out"
    path.write_text(SWEEP.format(epochs=12))
    first = Job("hpcnn.sweep", [path, "--dir", out], 4)
    _wait_for_a_result(out)
    before = {p: p.read_bytes() for p in out.glob("tasks/task-*/result.json")}
    if not before:
        first.kill()
    assert before, first.stdout + first.stderr
    first.signal_ranks(getattr(signal, how))
    code, _ = first.finish(60)
    stdout, stderr = first.stdout, first.stderr
    if how == "SIGUSR1":
        assert code == 75 and "run the same command again to continue" in stdout, stderr
    else:
        assert code != 0
    second = run("hpcnn.sweep", [path, "--dir", out], ranks=4, timeout=120)
    stdout, stderr = second.stdout, second.stderr
    assert second.returncode == 0, stderr
    records = results(out)
    assert [r["task"] for r in records] == [0, 1, 2, 3, 4]
    for p, data in before.items():  # finished before the interruption: not run again
        assert p.read_bytes() == data
    again = [
        r["task"] for r in records if r["invocation"] != json.loads(next(iter(before.values())))["invocation"]
    ]
    assert again and all(f"task {i} (" in stdout for i in again)
    assert not any(f"task {r['task']} (" in stdout for r in records if r["task"] not in again)
    if how == "SIGUSR1":  # a task stopped with a checkpoint continued from it
        for i in again:
            log = (out / "tasks" / f"task-{i:03d}" / "log.txt").read_text()
            if "checkpoint (stop requested: SIGUSR1)" in log:
                assert "resumed from" in log, log


def test_a_mixed_sweep_is_summarised_and_an_ensemble_of_unlike_members_is_not_scored(tmp_path):
    """A classifier and a regression in one sweep (one rank, in-process): the summary ranks the
    classifier by accuracy and the regression after it, and the ensemble declines to average."""
    from hpcnn.parallel.comm import Comm
    from hpcnn.sweep import Sweep

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype(np.float32)
    with h5py.File(tmp_path / "reg.h5", "w") as f:
        f["x"], f["y"] = x, (x[:, 0] - x[:, 1]).astype(np.float32)
        f["x_test"], f["y_test"] = x[:32], (x[:32, 0] - x[:32, 1]).astype(np.float32)
    path = tmp_path / "s.toml"
    path.write_text(
        "[sweep]\nensemble = true\n[base]\nhidden = [8]\nepochs = 1\n"
        f'[[tasks]]\ndata = "xor"\n[[tasks]]\ndata = "{tmp_path / "reg.h5"}"\nloss = "mse"\n'
    )
    lines = []
    world = Comm.serial()
    assert Sweep(world, path, directory=tmp_path / "out").run(lines.append) == 0
    table = [line.split() for line in lines if line.startswith("  ") and line.split()[0].isdigit()]
    assert [row[0] for row in table] == ["0", "1"]  # the classifier first, then the regression
    assert any(line.startswith("ensemble: not scored: task") for line in lines), lines
    world.Free()
