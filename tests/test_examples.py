"""The scripts in examples/ run, at one rank and under mpiexec, and compute what they say.

- ``xor.py`` learns XOR (the four predictions round to 0, 1, 1, 0) and prints the same text, every
  float64 digit, at one rank and at four;
- ``custom_layer.py``'s ``RMSNorm`` passes the gradient check, forms the same weight gradients in
  each of the ways hpcnn asks a layer to (written, added for micro-batches, deferred by a pipeline
  stage, per shard in deterministic mode), trains in a 2-stage pipeline, resumes bitwise, and trains
  deterministically to the same bits at one rank and in the 2-stage pipeline;
- ``digits.py`` reaches the held-out accuracy it reaches (0.98 at 1 and 4 ranks, where its callback
  stops it early) with a margin, its callback logging each epoch once;
- ``cnn.py`` trains a convolutional network on digits given as (rows, 1, 8, 8) images to the
  held-out accuracy it reaches (0.986 at 1 and 2 ranks, where it stops early) with a margin, and
  ``predict`` on the same images agrees with the final evaluation.

Each run takes a few seconds; the scripts start through ``runpy`` (``launch.run`` takes a module name
or Python source).
"""

import importlib.util
import re

import numpy as np
import pytest
from launch import ROOT, run

from hpcnn.core.model import Sequential
from hpcnn.parallel.deterministic import Sharding, Workers

EXAMPLES = ROOT / "examples"


def example(name: str, ranks=None, args=()):
    """Run ``examples/NAME.py`` as ``python examples/NAME.py ARGS`` would (under mpiexec with
    ``ranks``); the completed process, checked to have succeeded."""
    source = (
        f"import runpy, sys; sys.argv = ['examples/{name}.py', *sys.argv[1:]]; "
        f"runpy.run_path('examples/{name}.py', run_name='__main__')"
    )
    proc = run(source, args, ranks=ranks)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.launches
def test_xor_learns_xor_and_prints_the_same_digits_at_one_rank_and_four():
    one, four = example("xor"), example("xor", ranks=4)
    predictions = [float(v) for v in re.findall(r"predicted (\S+)", one.stdout)]
    assert np.round(predictions).tolist() == [0, 1, 1, 0], one.stdout
    assert "learned 4/4 (100%)" in one.stdout
    assert four.stdout == one.stdout  # rank 0 alone prints, and deterministic mode gives the same bits


def _load_custom_layer():
    spec = importlib.util.spec_from_file_location("hpcnn_example_custom_layer", EXAMPLES / "custom_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_rms_norm_forms_the_same_gradients_in_every_mode():
    """Written at once == added over micro-batches == deferred to weight_grads == summed per shard
    (float64, to rounding), with the same input gradient each way."""
    RMSNorm = _load_custom_layer().RMSNorm
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(10, 6)) * 3 + 1, rng.normal(size=(10, 6))
    model = Sequential([RMSNorm(6)], np.float64)
    model.params.data[:] = rng.normal(size=model.params.size)
    layer, parts = model.layers[0], [slice(0, 4), slice(4, 10)]

    def step(tapes):
        """Forward and backward the two micro-batches as a pipeline stage does; the input gradients."""
        dx = []
        for m, (rows, tape) in enumerate(zip(parts, tapes, strict=True)):
            model.forward(x[rows], tape=tape, slot=m)
            dx.append(model.backward(dy[rows], True, tape, accumulate=m > 0, slot=m).copy())
        return np.concatenate(dx)

    model.forward(x)
    dx_whole = model.backward(dy.copy(), need_input_grad=True).copy()
    whole = model.params.grad.copy()

    model.params.grad[:] = np.nan
    dx = step([[{}], [{}]])
    np.testing.assert_allclose(model.params.grad, whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-12, atol=1e-12)

    model.params.grad[:] = np.nan
    dx = step([[{"defer": (0, 10, model.stack(0))}], [{"defer": (4, 10, model.stack(0))}]])
    assert np.isnan(model.params.grad).all()  # nothing written before weight_grads
    model.weight_grads(10)
    np.testing.assert_allclose(model.params.grad, whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-12, atol=1e-12)
    assert layer.deferred_width(6) == 12

    # deterministic mode: shards of 2 rows; micro-batch 0 holds shards 0-1, micro-batch 1 shards 2-4
    per_shard = np.full((5, model.params.size), np.nan)
    model.shard(Sharding(2, Workers(1)), per_shard)
    dx = step([[{"shard": 0}], [{"shard": 2}]])
    np.testing.assert_allclose(per_shard.sum(axis=0), whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-12, atol=1e-12)
    for k in range(5):  # each shard's row holds that shard's own sums
        rows = slice(2 * k, 2 * k + 2)
        xhat = x[rows] / np.sqrt((x[rows] ** 2).mean(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(layer.shard_grads["g"][k], (dy[rows] * xhat).sum(0), rtol=1e-10)


@pytest.mark.launches
def test_custom_layer_checks_trains_in_a_pipeline_resumes_bitwise_and_is_deterministic():
    one, two = example("custom_layer"), example("custom_layer", ranks=2)
    for proc in (one, two):
        assert re.search(r"^gradient check: .*: passed$", proc.stdout, re.M), proc.stdout
        assert "data parallel on" in proc.stdout
        assert re.search(r"stopped at step 9, resumed to step 24: parameters bitwise equal", proc.stdout)
    assert "pipeline of 2 stage(s) x 1 replica(s)" in two.stdout
    fingerprints = [
        re.search(r"^deterministic: held-out outputs sha256 (\w+)", p.stdout, re.M) for p in (one, two)
    ]
    assert fingerprints[0] and fingerprints[1], one.stdout + two.stdout
    assert fingerprints[0].group(1) == fingerprints[1].group(1)  # one rank == a 2-stage pipeline, bitwise


# Measured: 0.9805 held-out at 1 and at 4 ranks (stopped early at the example's target of 0.98).
DIGITS_ACCURACY = 0.95


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.launches)])
def test_digits_reaches_its_accuracy_and_logs_each_epoch_once(ranks):
    proc = example("digits", ranks=ranks)
    found = re.search(r"^held-out accuracy (\S+) after (\d+) steps on (\d+) rank", proc.stdout, re.M)
    assert found, proc.stdout
    assert float(found.group(1)) > DIGITS_ACCURACY
    assert int(found.group(3)) == (ranks or 1)
    epochs = [int(n) for n in re.findall(r"^epoch +(\d+) ", proc.stdout, re.M)]
    assert epochs == list(range(1, len(epochs) + 1)) and epochs, proc.stdout  # rank 0 alone logs


# Measured: 0.9861 held-out at 1 and at 2 ranks (stopped early at the example's target of 0.985).
CNN_ACCURACY = 0.97


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.launches)])
def test_cnn_trains_a_conv_net_on_digit_images(ranks):
    proc = example("cnn", ranks=ranks)
    line = r"^held-out accuracy (\S+) after \d+ steps on (\d+) rank\(s\); predict agrees on (\S+)$"
    found = re.search(line, proc.stdout, re.M)
    assert found, proc.stdout
    assert float(found.group(1)) > CNN_ACCURACY and int(found.group(2)) == (ranks or 1)
    assert abs(float(found.group(3)) - float(found.group(1))) < 1e-9  # predict == the final evaluation
