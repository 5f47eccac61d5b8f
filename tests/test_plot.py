"""``python -m hpcnn.plot``: run directories' metrics.jsonl become PNGs; bad input fails clearly."""

import json
import sys

import launch
import pytest

from hpcnn import plot
from hpcnn.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"
ALL = {"loss.png", "accuracy.png", "lr.png", "throughput.png", "time_breakdown.png", "grad_norm.png"}
NEEDS_MPL = "the PNGs need the plots extra (pip install '.[plots]')"


def _records(accuracy=True, test=True, epochs=2, per_epoch=5):
    """``epochs`` x ``per_epoch`` logged steps (2 optimizer steps apart) and one epoch record each."""
    out = []
    for e in range(1, epochs + 1):
        for i in range(1, per_epoch + 1):
            step = 2 * ((e - 1) * per_epoch + i)
            out.append(
                {
                    "kind": "step",
                    "step": step,
                    "epoch": e,
                    "loss": 1.0 / step,
                    "accuracy": 1 - 0.5 / step if accuracy else None,
                    "lr": 0.01 * 0.9**e,
                    "grad_norm": 10.0 / step,
                    "samples_per_s": 1000.0 + step,
                    "time": {
                        "data": 1e-4,
                        "forward_backward": 4e-3,
                        "reduce": 2e-4,
                        "optimizer": 3e-4,
                        "other": 1e-4,
                    },
                    "wall": 0.01 * step,
                }
            )
        record = {
            "kind": "epoch",
            "epoch": e,
            "step": 2 * e * per_epoch,
            "loss": 0.5 / e,
            "accuracy": 0.8 if accuracy else None,
            "lr": 0.01 * 0.9**e,
            "seconds": 0.2,
            "samples_per_s": 9000.0,
        }
        if test:
            record["test"] = {"loss": 0.7 / e, "accuracy": 0.85 if accuracy else None, "rows": 359}
        out.append(record)
    return out


def _run_dir(path, records=None, ranks=None, tail="", **kw):
    path.mkdir(parents=True, exist_ok=True)
    records = _records(**kw) if records is None else records
    lines = [json.dumps({"kind": "start", "config": {"lr": 0.01}})] + [json.dumps(r) for r in records]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    if ranks is not None:
        (path / "facts.json").write_text(json.dumps({"ranks": ranks, "hostname": "n1"}))
    return path


def _pngs(directory):
    found = {p.name: p.read_bytes() for p in directory.glob("*.png")}
    for name, data in found.items():
        assert data[:8] == PNG and len(data) > 1000, name
    return set(found)


def test_records_parse_into_steps_and_epochs_other_kinds_skipped(tmp_path):
    run = _run_dir(tmp_path / "a")
    steps, epochs = plot.load_metrics(run)
    assert [s["step"] for s in steps] == list(range(2, 22, 2))
    assert [e["step"] for e in epochs] == [10, 20]
    assert steps[0]["time"]["forward_backward"] == 4e-3 and epochs[1]["test"]["loss"] == pytest.approx(0.35)


def test_a_resumed_run_replaces_the_steps_it_redid(tmp_path):
    """Killed after step 14 with a checkpoint at step 10 (mid epoch 2), then resumed: the appended
    records win from step 12 on, and epoch 2's record comes only from the resumed launch."""
    records = _records()
    first = [r for r in records if r["step"] <= 14]  # steps 2..14 and epoch 1 (step 10)
    redone = [dict(r, loss=r["loss"] / 2) for r in records if r["step"] > 10]
    run = _run_dir(tmp_path / "a", records=first + [{"kind": "stopped", "step": 14}] + redone)
    steps, epochs = plot.load_metrics(run)
    assert [s["step"] for s in steps] == list(range(2, 22, 2))
    assert [s["loss"] for s in steps[5:]] == [1.0 / s / 2 for s in range(12, 22, 2)]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 10), (2, 20)]
    # a partial epoch record (max_steps stop) is replaced by the same epoch's later one
    partial = {**records[-1], "step": 16}
    run = _run_dir(tmp_path / "b", records=records[:8] + [partial] + records[8:])
    assert [(e["epoch"], e["step"]) for e in plot.load_metrics(run)[1]] == [(1, 10), (2, 20)]


def test_non_finite_values_are_left_out_of_the_curves(tmp_path):
    records = _records(epochs=1)
    records[2]["loss"] = float("nan")
    records[3]["grad_norm"] = float("inf")
    steps, epochs = plot.load_metrics(_run_dir(tmp_path / "a", records=records))
    assert plot._xy(steps, "loss")[0] == [2, 4, 8, 10]
    assert plot._xy(steps, "grad_norm")[0] == [2, 4, 6, 10]
    assert plot._xy(epochs, "test", sub="loss") == ([10], [0.7])


def test_one_run_writes_every_figure_into_its_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    run = _run_dir(tmp_path / "a", ranks=4)
    assert plot.main([str(run)]) == 0
    assert _pngs(run) == ALL
    wrote = capsys.readouterr().out.splitlines()
    assert sorted(wrote) == sorted(f"wrote {run / name}" for name in ALL)


def test_no_accuracy_anywhere_means_no_accuracy_png(tmp_path):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    run = _run_dir(tmp_path / "regression", accuracy=False, test=False)
    assert plot.main([str(run)]) == 0
    assert _pngs(run) == ALL - {"accuracy.png"}


def test_overlaid_runs_go_to_out_with_labels(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    a = _run_dir(tmp_path / "a", ranks=8)
    b = _run_dir(tmp_path / "b", accuracy=False, test=False)
    out = tmp_path / "figs" / "cmp"
    assert plot.main([str(a), str(b), "--out", str(out), "--label", "eight", "one"]) == 0
    assert _pngs(out) == ALL  # accuracy.png: run a has it
    assert not list(a.glob("*.png")) and not list(b.glob("*.png"))
    assert len(capsys.readouterr().out.splitlines()) == len(ALL)


def test_several_runs_default_to_plots_in_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    a, b = _run_dir(tmp_path / "x" / "run"), _run_dir(tmp_path / "y" / "run")
    monkeypatch.chdir(tmp_path)
    assert plot.main(["x/run", "y/run"]) == 0
    assert _pngs(tmp_path / "plots") == ALL
    # same directory names: the legend tells them apart by path, with the ranks from facts.json
    (b / "facts.json").write_text(json.dumps({"ranks": 1}))
    assert plot._labels([a, b]) == [str(a), f"{b} (1 rank)"]


def test_figures_hold_the_records_values(tmp_path):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    import matplotlib.pyplot as plt

    steps, epochs = plot.load_metrics(_run_dir(tmp_path / "a"))
    runs = [plot.Run("a", steps, epochs), plot.Run("b", steps[:3], [])]
    figs = plot.figures(runs)
    try:
        ax = figs["loss.png"].axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"a train", "a train (epoch)", "a held-out", "b train"}
        train = lines["a train"]
        assert list(train.get_xdata()) == [s["step"] for s in steps]
        assert list(train.get_ydata()) == [s["loss"] for s in steps]
        assert list(lines["a held-out"].get_xdata()) == [10, 20]
        assert list(lines["a held-out"].get_ydata()) == pytest.approx([0.7, 0.35])
        # one colour per run across its series
        assert lines["a held-out"].get_color() == train.get_color() != lines["b train"].get_color()
        assert figs["grad_norm.png"].axes[0].get_yscale() == "log"
        assert [a.get_title() for a in figs["time_breakdown.png"].axes] == ["a", "b"]
        stacked = figs["time_breakdown.png"].axes[0].collections
        assert len(stacked) == len(plot.TIME_PARTS)
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_invalid_middle_line_names_file_and_line(tmp_path, capsys):
    run = _run_dir(tmp_path / "a")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:4: not valid JSON"):
        plot.load_metrics(run)
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    assert plot.main([str(run)]) == 2
    assert f"hpcnn: error: {path}:4: not valid JSON" in capsys.readouterr().err
    assert not list(run.glob("*.png"))


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    records = _records()
    run = _run_dir(tmp_path / "a", records=records, tail=json.dumps(records[0])[:25])
    steps, epochs = plot.load_metrics(run)
    assert len(steps) == 10 and len(epochs) == 2
    err = capsys.readouterr().err
    assert "hpcnn: warning:" in err and "metrics.jsonl:14: last line is cut short" in err
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    assert plot.main([str(run)]) == 0
    assert _pngs(run) == ALL


def test_missing_or_empty_metrics_fail_clearly(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no such file"):
        plot.load_metrics(empty)
    (empty / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="metrics.jsonl: empty"):
        plot.load_metrics(empty)
    (empty / "metrics.jsonl").write_text('{"kind": "start"}\n')
    with pytest.raises(UserError, match="no step or epoch records"):
        plot.load_metrics(empty)
    (empty / "metrics.jsonl").write_text('{"kind": "step", "loss": 1.0}\n{"kind": "step", "step": 1}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:1: a step record without a numeric 'step'"):
        plot.load_metrics(empty)
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err


def test_label_count_must_match_the_runs(tmp_path, capsys):
    a, b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b")
    assert plot.main([str(a), str(b), "--label", "only-one"]) == 2
    assert "1 --label for 2 run directories" in capsys.readouterr().err
    with pytest.raises(UserError, match="3 --label for 2"):
        plot.plot_runs([a, b], tmp_path / "out", labels=["x", "y", "z"])


def test_scaling_report_becomes_scaling_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    rows = [
        {"ranks": n, "samples_per_s": 1000.0 * n * e, "speedup": n * e, "efficiency": e}
        for n, e in ((2, 0.95), (1, 1.0), (4, 0.8))
    ]
    bench_dir = tmp_path / "scaling"
    bench_dir.mkdir()
    report = {"network": "784-64-10", "batch": 256, "baseline_ranks": 1, "runs": rows}
    (bench_dir / "scaling.json").write_text(json.dumps(report))
    assert plot.main([str(bench_dir)]) == 0
    assert _pngs(bench_dir) == {"scaling.png"}
    assert capsys.readouterr().out == f"wrote {bench_dir / 'scaling.png'}\n"
    # the file itself, next to a run: both into --out
    run = _run_dir(tmp_path / "run")
    out = tmp_path / "out"
    assert plot.main([str(run), str(bench_dir / "scaling.json"), "--out", str(out)]) == 0
    assert _pngs(out) == ALL | {"scaling.png"}
    (bench_dir / "scaling.json").write_text(json.dumps({"runs": [{"ranks": 1}]}))
    assert plot.main([str(bench_dir)]) == 2
    assert "not a scaling report" in capsys.readouterr().err


def test_without_matplotlib_one_message_and_exit_2(tmp_path, monkeypatch, capsys):
    run = _run_dir(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err == "hpcnn: error: python -m hpcnn.plot needs matplotlib: pip install 'hpcnn[plots]'\n"


def test_command_needs_no_mpi(tmp_path):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    run = _run_dir(tmp_path / "a", ranks=2)
    code = (
        "import sys; from hpcnn import plot; rc = plot.main([sys.argv[1]]); "
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(rc)"
    )
    done = launch.run(code, [run], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == len(ALL)


def test_a_private_run_gets_its_privacy_spent_per_epoch(tmp_path):
    pytest.importorskip("matplotlib", reason=NEEDS_MPL)
    import matplotlib.pyplot as plt

    records = _records()
    epochs = [r for r in records if r["kind"] == "epoch"]
    for r, eps in zip(epochs, (0.8, 1.3), strict=True):
        r["epsilon"] = eps
    run = _run_dir(tmp_path / "private", records=records)
    assert plot.main([str(run)]) == 0
    assert _pngs(run) == ALL | {"privacy.png"}
    figs = plot.figures([plot.Run("private", *plot.load_metrics(run))])
    try:
        (line,) = figs["privacy.png"].axes[0].get_lines()
        assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == [0.8, 1.3]
    finally:
        for fig in figs.values():
            plt.close(fig)
