"""What a run shows and leaves behind: run directory, metrics, progress, timeline, --dry-run.

Real ``python -m hpcnn.train`` runs (1 rank, and 4 ranks as 2 replicas x 2 stages under mpiexec),
each checked on values: metrics records against the epoch lines and across layouts, the timeline's
tracks and nesting, output only from rank 0.
"""

import fcntl
import json
import os
import pty
import re
import struct
import termios

import pytest
from launch import run, start

from hpcnn.config import from_dict, parse_toml
from hpcnn.io.runlog import STEP_TIMES, RunDir

# digits: 1438 training rows / 64 = 23 steps per epoch; log_every 23 makes a step record per epoch.
ARGS = ["--hidden", "32,16", "--epochs", "2", "--seed", "3", "--log-every", "23"]


def train(args, ranks=None, timeout=120, **kw):
    return run("hpcnn.train", args, ranks=ranks, env=kw.get("env"), timeout=timeout)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_command_facts_metrics_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = train([*ARGS, "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "command.txt", "config.toml", "facts.json", "metrics.jsonl"]  # fmt: skip
    cfg = from_dict(parse_toml((run / "config.toml").read_text()), "config.toml")
    # As given, with the run directory resolved: --config run/config.toml --resume auto continues it.
    assert cfg.hidden == [32, 16] and cfg.seed == 3 and cfg.checkpoint_dir == "" and cfg.run_dir == str(run)
    assert "-m hpcnn.train --hidden 32,16 --epochs 2" in (run / "command.txt").read_text()
    facts = json.loads((run / "facts.json").read_text())
    assert facts["ranks"] == 1 and facts["pipeline_stages"] == 1 and facts["versions"]["numpy"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-000000046.h5"]
    rows = records(run)
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [23, 46] and [r["epoch"] for r in epochs] == [1, 2]
    assert rows[-1]["kind"] == "final" and rows[-1]["step"] == 46
    for s, e in zip(steps, epochs, strict=True):  # the same 23 steps summed two ways
        assert s["loss"] == pytest.approx(e["loss"], rel=1e-12)
        assert s["accuracy"] == pytest.approx(e["accuracy"], rel=1e-12)
        assert s["lr"] == e["lr"] and s["grad_norm"] > 0 and s["samples_per_s"] > 0
        assert set(s["time"]) == set(STEP_TIMES) and all(v >= 0 for v in s["time"].values())
        # The epoch's clock runs through its 23 steps (and more: stop checks, evaluation).
        assert e["seconds"] >= 0.999 * 23 * sum(s["time"].values())
    assert epochs[-1]["test"]["rows"] == 359
    assert rows[-1]["loss"] == pytest.approx(epochs[-1]["test"]["loss"])
    assert f"final held-out loss {rows[-1]['loss']:.4f}" in proc.stdout


def test_auto_run_directories_never_collide_and_an_empty_one_writes_nothing(tmp_path):
    for _ in range(2):
        proc = run("hpcnn.train", [*ARGS, "--epochs", "1"], cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 2 and all((d / "metrics.jsonl").stat().st_size > 0 for d in made)
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", made[0].name)
    empty = tmp_path / "none"
    empty.mkdir()
    proc = run("hpcnn.train", [*ARGS, "--epochs", "1", "--run-dir", ""], cwd=empty, timeout=120)
    assert proc.returncode == 0 and list(empty.iterdir()) == []


def test_a_refused_run_changes_nothing_and_an_unwritable_timeline_is_found_before_training(tmp_path):
    run = tmp_path / "run"
    assert train([*ARGS, "--run-dir", str(run)]).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = train([*ARGS, "--run-dir", str(run), "--lr", "0.5"])  # a fresh run into a used directory
    assert again.returncode == 2 and "holds checkpoints" in again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    resumed = train(["--config", str(run / "config.toml"), "--resume", "auto"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    proc = train([*ARGS, "--run-dir", str(tmp_path / "other"), "--timeline", "/proc/none/t.json"])
    assert proc.returncode == 2 and "timeline /proc/none/t.json: cannot write there" in proc.stderr
    assert "epoch" not in proc.stdout and not (tmp_path / "other").exists()


def test_a_resumed_run_appends_and_drops_a_torn_last_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    run = RunDir.create(str(tmp_path))
    run.record("step", {"step": 2})
    run.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


def test_progress_lines_off_a_terminal_and_quiet(tmp_path):
    proc = train([*ARGS, "--run-dir", "", "--log-every", "10"])
    line = (
        r"^step (\d+)/46 \(epoch (\d)/2\)  loss [\d.]+  acc +[\d.]+%  lr \S+  [\d,]+ samples/s  ETA [\d:]+$"
    )
    steps = re.findall(line, proc.stdout, re.M)
    assert [int(s) for s, _ in steps] == [10, 20, 30, 40, 46] and "\r" not in proc.stdout
    assert len(re.findall(r"^epoch [12]/2 ", proc.stdout, re.M)) == 2
    quiet = train([*ARGS, "--run-dir", "", "--quiet"])
    assert quiet.returncode == 0 and not re.search(
        r"^(step|epoch|data|model|checkpoint) ", quiet.stdout, re.M
    )
    assert "final held-out loss" in quiet.stdout


def on_a_terminal(args, ranks) -> str:
    """Run ``python -m hpcnn.train ARGS`` with a pseudo-terminal of 120 columns as its stdout and
    stderr; its output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm needs a width
    proc = start("hpcnn.train", args, ranks=ranks, stdout=follower, stderr=follower, text=False)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.launches)])
def test_a_progress_bar_on_a_terminal_also_through_mpirun_and_no_plain_step_lines(ranks):
    pytest.importorskip("tqdm", reason="the bar needs tqdm (a dependency of hpcnn)")
    text = on_a_terminal([*ARGS, "--run-dir", "", "--log-every", "5"], ranks)
    assert re.search(r"epoch 1/2: +\d+%\|", text) and ("step/s" in text or "s/step" in text)
    assert "loss" in text and "ETA" in text and "final held-out loss" in text
    assert not re.search(r"^step \d+/46 ", text, re.M)
    assert text.count("final held-out loss") == 1


@pytest.mark.launches
def test_four_ranks_two_stages_metrics_match_one_rank_and_only_rank_0_speaks(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    assert train([*ARGS, "--run-dir", str(one)]).returncode == 0
    layout = ["--pipeline-stages", "2", "--micro-batches", "2"]
    proc = train([*ARGS, *layout, "--run-dir", str(four), "--log-every", "23"], ranks=4)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hpcnn 0.1.0: 4 rank(s)") == 1 and proc.stdout.count("epoch 2/2 ") == 1
    assert proc.stdout.count("final held-out loss") == 1 and proc.stderr == ""
    assert json.loads((four / "facts.json").read_text())["replicas"] == 2
    a, b = ([r for r in records(d) if r["kind"] == "step"] for d in (one, four))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [23, 46]
    for x, y in zip(a, b, strict=True):  # distributed == serial (float32): loss, accuracy, global norm
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def spans_nest(events) -> bool:
    """Within one track, any two spans are disjoint or one contains the other."""
    stack = []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        end = e["ts"] + e["dur"]
        while stack and stack[-1] <= e["ts"] + 1e-3:
            stack.pop()
        if stack and end > stack[-1] + 1e-3:
            return False
        stack.append(end)
    return True


@pytest.mark.launches
def test_timeline_has_a_track_per_rank_with_nested_spans(tmp_path):
    path = tmp_path / "timeline.json"
    layout = ["--pipeline-stages", "2", "--micro-batches", "2", "--checkpoint-every", "20"]
    proc = train([*ARGS, *layout, "--run-dir", str(tmp_path / "run"), "--timeline", str(path)], ranks=4)
    assert proc.returncode == 0, proc.stderr
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(4)}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    for rank in range(4):
        mine = [e for e in spans if e["pid"] == rank]
        compute = [e for e in mine if e["tid"] == 0]
        steps = [e for e in compute if e["name"].startswith("step ")]
        assert [e["name"] for e in steps] == [f"step {i}" for i in range(1, 47)]
        assert sum(e["name"] == "forward mb 0" for e in compute) == 46  # every step, both micro-batches
        assert sum(e["name"] == "backward mb 1" for e in compute) == 46
        assert sum(e["name"] == "checkpoint write" for e in compute) == 3  # steps 20, 40, end
        assert sum(e["name"].startswith("recv wait") for e in compute) == 2 * 46  # one per micro-batch
        reductions = [e for e in mine if e["tid"] == 1]
        assert reductions and all(e["name"].startswith("allreduce bucket") for e in reductions)
        assert spans_nest(compute) and spans_nest(reductions)
        inside = [e for e in compute if e["name"] in ("data", "optimizer", "reduce wait")]
        assert all(any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1e-3 for s in steps)
                   for e in inside)  # fmt: skip


@pytest.mark.launches
def test_dry_run_prints_the_layout_and_trains_nothing(tmp_path):
    layout = ["--pipeline-stages", "2", "--hidden", "64,32", "--optimizer", "adam"]
    proc = train(["--dry-run", *layout, "--run-dir", str(tmp_path / "run")], ranks=4)
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"^  rank (\d): \S+, stage (\d), replica (\d), layers (\d)-(\d), ([\d,]+) parameters, "
                       r"~([\d.]+) MiB \(.*\), ~(\d+) rows of each global batch$",
                       proc.stdout, re.M)  # fmt: skip
    assert [(int(r), int(s), int(p)) for r, s, p, *_ in lines] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    params = {int(s): int(n.replace(",", "")) for _, s, _, _, _, n, *_ in lines}
    assert sum(params.values()) == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert all(int(rows) == 32 for *_, rows in lines)  # 64 rows per step over 2 replicas
    assert "parameters: 6,570 in all; 690 steps" in proc.stdout and 'optimizer = "adam"' in proc.stdout
    assert not (tmp_path / "run").exists() and not re.search(r"^epoch ", proc.stdout, re.M)


@pytest.mark.launches
def test_dry_run_splits_each_ranks_memory_at_the_zero_level():
    """Parameters + gradients + optimizer state + activations, MiB: Adam's two moments are twice
    the parameters at zero 0, a quarter of that at zero 1 over 4 replicas (which also receives a
    quarter of the reduced gradient beside the whole one); zero 2 also shards
    the gradient (plus its staging: the two largest consecutive buckets, of one 1 MiB layer each
    here, 2 of 7.2 MiB)."""
    split = {}
    for level in (0, 1, 2):
        args = ["--dry-run", "--hidden", ",".join(["512"] * 8), "--optimizer", "adam", "--bucket-mb", "1"]
        args += ["--zero", str(level)]
        proc = train(args, ranks=4)
        assert proc.returncode == 0, proc.stderr
        found = re.findall(
            r"^  rank \d: .* MiB \(([\d.]+) \+ ([\d.]+) \+ ([\d.]+) \+ ([\d.]+)\)", proc.stdout, re.M
        )
        assert len(found) == 4 and len(set(found)) == 1, proc.stdout  # every replica alike
        split[level] = [float(x) for x in found[0]]
    params = split[0][0]  # 1,877,002 float32 parameters: 7.2 MiB
    assert split[0][1:3] == [params, pytest.approx(2 * params, abs=0.1)]
    assert split[1][1:3] == [pytest.approx(1.25 * params, abs=0.1), pytest.approx(params / 2, abs=0.1)]
    assert split[2][2] == split[1][2] and split[2][1] < 0.55 * params  # 1/4 + about 2/9
    assert sum(split[2][:3]) < sum(split[1][:3]) < sum(split[0][:3])


@pytest.mark.launches
def test_facts_record_each_ranks_measured_memory_at_the_end(tmp_path):
    """``memory_per_rank``: what each rank allocated for parameters, gradients and optimizer state
    (here --zero 2 over 2 replicas: half of Adam's state each) and its peak resident set size."""
    run = tmp_path / "run"
    proc = train([*ARGS, "--run-dir", str(run), "--optimizer", "adam", "--zero", "2"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    memory = json.loads((run / "facts.json").read_text())["memory_per_rank"]
    assert [m["rank"] for m in memory] == [0, 1]
    parameters = 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    for m, part in zip(memory, (parameters - parameters // 2, parameters // 2), strict=True):
        assert m["parameters"] == 4 * parameters and m["optimizer_state"] == 2 * 4 * part
        assert 4 * part < m["gradients"] <= 4 * (part + parameters)  # the part and the staging
        assert m["peak_rss"] > 20 * 2**20  # (an interpreter with numpy: tens of MiB at least)
