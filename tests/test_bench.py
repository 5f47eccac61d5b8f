"""The benchmark's numbers hang together, and the scaling report combines launches (serial part)."""

import json
import math

import numpy as np
import pytest

from hpcnn import bench
from hpcnn.core.model import mlp_layers
from hpcnn.errors import UserError
from hpcnn.parallel.comm import Comm

SMALL = ["--hidden", "32,16", "--synthetic-features", "24", "--batch-size", "40"]
QUICK = ["--steps", "3", "--warmup", "1", "--repeats", "3"]  # odd: the medians are one run


def test_defaults_are_the_reference_network_and_flags_override_them():
    cfg, opts = bench.bench_config([])
    assert (cfg.synthetic_features, cfg.hidden, cfg.synthetic_classes) == (784, [1024, 1024], 10)
    assert (cfg.batch_size, cfg.optimizer, cfg.momentum, cfg.dtype) == (256, "sgd", 0.9, "float32")
    assert (opts.steps, opts.warmup, opts.repeats, opts.json) == (20, 5, 3, None)
    cfg, opts = bench.bench_config(["--hidden", "64", "--overlap", "off", "--steps", "7"])
    assert (cfg.hidden, cfg.overlap, opts.steps) == ([64], "off", 7)
    with pytest.raises(UserError, match="--steps = 0"):
        bench.bench_config(["--steps", "0"])


def test_partial_batches_count_their_real_rows():
    """100 rows in batches of 40: steps of 40, 40, 20 rows; samples/s counts 100 per 3 steps."""
    cfg, opts = bench.bench_config(SMALL + ["--synthetic-rows", "100", "--steps", "3", "--warmup", "0"])
    opts.repeats = 1
    r = bench.run(cfg, opts, Comm.serial())
    assert r["samples_per_s"] == pytest.approx(100 / (3 * r["step_ms"] / 1e3), rel=1e-6)


def test_step_flops_count_the_products_a_step_performs():
    layers = mlp_layers([784, 1024, 1024, 10], "relu")
    # the first layer needs no input gradient: 2 products; the others 3; 2 flops per multiply-add
    expected = 2 * 256 * (2 * 784 * 1024 + 3 * 1024 * 1024 + 3 * 1024 * 10)
    assert bench.step_flops(layers, 256) == expected


def test_result_is_consistent_json(tmp_path):
    cfg, opts = bench.bench_config(SMALL + QUICK + ["--json", str(tmp_path / "b.json")])
    comm = Comm.serial()
    r = json.loads(json.dumps(bench.run(cfg, opts, comm)))
    assert r["network"] == "24-32-16-10" and r["parameters"] == 24 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert (r["ranks"], r["replicas"], r["stages"], r["batch"]) == (1, 1, 1, 40)
    assert len(r["samples_per_s_repeats"]) == 3
    # every batch is full here (160 rows, batch 40): rates follow from the step time
    assert r["samples_per_s"] == pytest.approx(40 / (r["step_ms"] / 1e3), rel=1e-6)
    flops = bench.step_flops(mlp_layers([24, 32, 16, 10], "relu"), 40)
    assert r["gflops"] == pytest.approx(flops / (r["step_ms"] / 1e3) / 1e9, rel=1e-6)
    assert r["efficiency"] == pytest.approx(r["ceiling"]["step_ms"] / r["step_ms"], rel=1e-6)
    parts = r["breakdown_ms"]
    assert set(parts) == set(bench.PARTS) and all(v >= 0 for v in parts.values())
    assert sum(v for k, v in parts.items() if k != "other") <= r["step_ms"] * 1.0001 + 0.05
    assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
    assert r["allreduce"]["raw_ms"] == 0 and r["allreduce"]["exposed_ms"] < 0.05  # one rank: nothing
    comm.Free()


def _fake_run(ranks, samples_per_s):
    return {
        "ranks": ranks,
        "replicas": ranks,
        "stages": 1,
        "samples_per_s": samples_per_s,
        "efficiency": 0.8,
        "network": "784-1024-1024-10",
        "batch": 256,
        "allreduce": {"exposed_fraction_of_step": 0.05},
    }


def test_scaling_report_from_several_launches(tmp_path):
    for ranks, rate in ((4, 3000.0), (1, 1000.0), (2, 1900.0)):
        (tmp_path / f"bench-{ranks}.json").write_text(json.dumps(_fake_run(ranks, rate)))
    pytest.importorskip("matplotlib", reason="the PNG needs the plots extra (pip install '.[plots]')")
    out = bench.scaling(str(tmp_path))
    rows = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    assert rows == out["runs"] and [r["ranks"] for r in rows] == [1, 2, 4]
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.9, 3.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.95, 0.75])
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_scaling_report_needs_results(tmp_path):
    with pytest.raises(UserError, match="no bench-"):
        bench.scaling(str(tmp_path), plot=False)
    (tmp_path / "bench-1.json").write_text("{not json")
    with pytest.raises(UserError, match="not a benchmark result"):
        bench.scaling(str(tmp_path), plot=False)


def test_ceiling_counts_only_the_products_of_this_stage():
    from hpcnn.core.model import Sequential

    model = Sequential(mlp_layers([8, 8, 4], "relu"), np.float64)
    seconds = bench.gemm_seconds(model, 16, first_stage=True, repeats=3)
    assert 0 < seconds < 1 and math.isfinite(seconds)


def test_scaling_command_needs_no_mpi_and_fails_clearly(tmp_path, capsys):
    assert bench.main(["scaling", str(tmp_path), "--no-plot"]) == 2
    assert "no bench-*.json files" in capsys.readouterr().err
    (tmp_path / "bench-1.json").write_text(json.dumps(_fake_run(1, 100.0)))
    assert bench.main(["scaling", str(tmp_path), "--no-plot"]) == 0
    assert json.loads((tmp_path / "scaling.json").read_text())["runs"][0]["speedup"] == 1.0


def test_a_conv_net_is_benchmarked_on_images_with_its_convolutions_counted():
    from hpcnn.core.conv import Conv2D
    from hpcnn.models import cnn_digits, layers_from_specs, model_layers

    cfg, opts = bench.bench_config(["--model", "cnn-digits", "--batch-size", "16", *QUICK])
    assert (cfg.data, cfg.synthetic_image) == ("synthetic", "1x8x8")
    r = bench.run(cfg, opts, Comm.serial())
    assert r["network"] == "cnn-digits (1x8x8)"
    layers = layers_from_specs(cnn_digits((8, 8, 1), 10), "cnn-digits")
    assert r["parameters"] == sum(bench.layer_params(layer) for layer in layers)
    # conv 3x3 1->16 on 8x8 (pad 1): 64 output pixels x 9 x 1 x 16 per row, forward and weight
    # gradient only (the first layer); conv 16->32 (64 x 144 x 32) and the Dense layers: 3 products
    assert isinstance(layers[0], Conv2D)
    expected = 2 * 16 * (2 * 64 * 9 * 16 + 3 * 64 * 144 * 32 + 3 * 512 * 64 + 3 * 64 * 10)
    assert bench.step_flops(layers, 16, (8, 8, 1)) == expected
    assert r["gflops"] == pytest.approx(expected / (r["step_ms"] / 1e3) / 1e9, rel=1e-6)
    cfg, _ = bench.bench_config(["--model", "cnn-cifar"])
    assert cfg.synthetic_image == "3x32x32"
    cifar = model_layers("cnn-cifar", (32, 32, 3), 10, "CIFAR-10")
    # the same network as the PyTorch peer's "cifar": 1,116,970 parameters
    assert sum(bench.layer_params(layer) for layer in cifar) == 1_116_970
