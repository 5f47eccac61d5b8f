"""DP-SGD's parts, serially: the clipped gradient sum against per-example gradients formed one
example at a time, the keyed noise, the accountant against dp-accounting's own computation, Poisson
sampling, and the refusals."""

import math
import time

import numpy as np
import pytest

from hpcnn.config import Config
from hpcnn.core.conv import Conv2D, Flatten, MaxPool2D
from hpcnn.core.layers import Dense, ReLU, Tanh
from hpcnn.core.losses import LOSSES
from hpcnn.core.model import Sequential
from hpcnn.core.norm import BatchNorm, LayerNorm
from hpcnn.core.privacy import gaussian_noise, ghost_conv_cheaper, poisson_batch
from hpcnn.errors import UserError
from hpcnn.io.datasets import PoissonSampler
from hpcnn.parallel.pipeline import Pipeline
from hpcnn.training import privacy


def _stacks():
    """Layer stacks with every per-example rule: (name, layers, row shape)."""
    return [
        ("dense", lambda: [Dense(6, 9), Tanh(), Dense(9, 7), ReLU(), Dense(7, 4)], (6,)),
        ("layernorm", lambda: [Dense(5, 8), LayerNorm(8), ReLU(), Dense(8, 3)], (5,)),
        # 6x6x2 images: the first convolution's norms by per-example gradients (P (K + N) > K N),
        # the second's by Gram matrices of its 4 positions (ghost)
        (
            "conv",
            lambda: [
                Conv2D(2, 3, 3, padding=1),
                ReLU(),
                MaxPool2D(2),
                Conv2D(3, 16, 3, padding=1),
                LayerNorm(16),
                Flatten(),
                Dense(3 * 3 * 16, 4),
            ],  # fmt: skip
            (6, 6, 2),
        ),
    ]


def _model(layers, shape, seed=0):
    model = Sequential(layers, np.float64, in_shape=shape)
    model.params.initialize(np.random.default_rng(seed))
    return model


def _brute_force(model, x, y, max_norm, scale):
    """``scale * sum_i clip(g_i)``: each example's gradient by its own backward (batch of one)."""
    loss = LOSSES["cross_entropy"]()
    total = np.zeros(model.params.size)
    norms = []
    for i in range(len(x)):
        out = model.forward(x[i : i + 1])
        loss.forward(out, y[i : i + 1])
        model.backward(loss.backward(1.0))
        g = model.params.grad.copy()
        norms.append(np.linalg.norm(g))
        total += g * min(1.0, max_norm / norms[-1])
    return scale * total, np.array(norms)


def _private_step(model, x, y, max_norm, scale, micro):
    pipe = Pipeline(model, None, 0, 1, math.prod(model.in_shape), "1f1b", time.perf_counter)
    pipe.clipping = privacy.Clipping(model, None, max_norm, scale)
    pieces = np.array_split(np.arange(len(x)), micro)
    inputs = [x[p].reshape(len(p), -1) for p in pieces]
    pipe.train_step(
        inputs, [y[p] for p in pieces], [len(p) for p in pieces], scale, LOSSES["cross_entropy"]()
    )
    return model.params.grad.copy(), pipe.clipping.clipped


@pytest.mark.parametrize("name, layers, shape", _stacks(), ids=[s[0] for s in _stacks()])
@pytest.mark.parametrize("micro", [1, 3])
def test_clipped_sum_equals_per_example_gradients(name, layers, shape, micro):
    rng = np.random.default_rng(1)
    rows, classes = 11, math.prod(Sequential.shape_after(layers(), shape))
    x = rng.normal(size=(rows, *shape)) * rng.uniform(0.1, 3.0, size=(rows,) + (1,) * len(shape))
    y = rng.integers(0, classes, rows)
    reference_model = _model(layers(), shape)
    scale = 1 / 13.0  # an expected batch size that is not the batch's: Poisson batches vary
    _, norms = _brute_force(reference_model, x, y, 1.0, scale)
    middle = np.sort(norms)[rows // 2 - 1 : rows // 2 + 1]
    max_norm = float(middle.mean())  # half the examples above, half below (none at it)
    want, _ = _brute_force(reference_model, x, y, max_norm, scale)
    got, clipped = _private_step(_model(layers(), shape), x, y, max_norm, scale, micro)
    assert 0 < clipped < rows and clipped == np.count_nonzero(norms > max_norm)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_convolution_norm_rules_both_used():
    # the "conv" stack above exercises both ways of a convolution's per-example norms
    assert not ghost_conv_cheaper(6 * 6, 3 * 3 * 2, 3)
    assert ghost_conv_cheaper(3 * 3, 3 * 3 * 3, 16)


def test_noise_is_keyed_and_has_the_asked_deviation():
    a = gaussian_noise(7, 12, 3, 1000, 0.5, np.float64)
    assert np.array_equal(a, gaussian_noise(7, 12, 3, 1000, 0.5, np.float64))
    assert not np.array_equal(a, gaussian_noise(7, 13, 3, 1000, 0.5, np.float64))
    assert not np.array_equal(a, gaussian_noise(7, 12, 4, 1000, 0.5, np.float64))
    # 200 steps x 1000 values of a tensor: the sample standard deviation of n = 2e5 normal values
    # has a relative standard error of 1 / sqrt(2n) = 0.0016; 5 of them (0.8%) fail with
    # probability 6e-7 (seed fixed: the outcome is fixed too)
    values = np.concatenate([gaussian_noise(0, s, 0, 1000, 0.25, np.float64) for s in range(200)])
    assert abs(values.std() / 0.25 - 1) < 5 / math.sqrt(2 * values.size)
    assert abs(values.mean()) < 5 * 0.25 / math.sqrt(values.size)
    from scipy import stats  # (dp-accounting's dependency)

    # normal, not only of the right deviation: Kolmogorov-Smirnov at a 1e-4 false-alarm rate
    assert stats.kstest(values / 0.25, "norm").pvalue > 1e-4
    single = gaussian_noise(0, 0, 0, 200_000, 1.0, np.float32)  # float32 as trained: normal as well
    assert single.dtype == np.float32 and stats.kstest(single.astype(np.float64), "norm").pvalue > 1e-4


def test_accountant_equals_the_library():
    import dp_accounting
    from dp_accounting import pld, rdp

    q, sigma, k, delta = 0.01, 1.1, 700, 1e-5
    for kind, fresh in (("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)):
        accountant = privacy.Accountant(kind, delta)
        for _ in range(k):
            accountant.add(q, sigma)
        assert accountant.segments == [[q, sigma, k]]
        library = fresh()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        library.compose(dp_accounting.SelfComposedDpEvent(event, k))
        assert accountant.epsilon() == library.get_epsilon(delta)


def test_accountant_state_round_trips_and_segments_compose():
    accountant = privacy.Accountant("rdp", 1e-5)
    accountant.add(0.01, 1.0, 100)
    accountant.add(0.02, 1.5, 50)
    again = privacy.Accountant.from_state(accountant.state())
    assert again.segments == [[0.01, 1.0, 100], [0.02, 1.5, 50]] and again.steps == 150
    assert (
        again.epsilon()
        == accountant.epsilon()
        > privacy.Accountant("rdp", 1e-5, [[0.01, 1.0, 100]]).epsilon()
    )
    import dp_accounting
    from dp_accounting import rdp

    library = rdp.RdpAccountant()  # the segments composed by the library itself, in order
    for q, sigma, k in again.segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        library.compose(dp_accounting.SelfComposedDpEvent(event, k))
    assert again.epsilon() == library.get_epsilon(1e-5)


def test_solved_noise_spends_the_target_and_the_budget_stops_in_time():
    rate, steps, target, delta = 64 / 1438, 220, 3.0, 1e-4
    sigma = privacy.noise_for("rdp", rate, steps, target, delta)
    spent = privacy.Accountant("rdp", delta, [[rate, sigma, steps]]).epsilon()
    assert target - 0.01 < spent <= target
    fresh = privacy.Accountant("rdp", delta)
    allowed = privacy.affordable(fresh, rate, 1.0, 2.0)
    assert fresh.epsilon(allowed, rate, 1.0) <= 2.0 < fresh.epsilon(allowed + 1, rate, 1.0)


def test_poisson_sampling_frequency_and_disjoint_slices():
    ids = np.arange(3, 503)  # 500 rows (ids need not start at 0)
    rate, epochs, size = 0.05, 200, 3
    counts = np.zeros(503)
    for epoch in range(epochs):
        samplers = [PoissonSampler(ids, rate, r, size, seed=4) for r in range(size)]
        for parts in zip(*(s.epoch(epoch) for s in samplers), strict=True):
            local = [p[0] for p in parts]
            whole = np.concatenate(local)
            assert len(whole) == parts[0][1] == len(np.unique(whole))  # no row read by two ranks
            assert max(map(len, local)) - min(map(len, local)) <= 1
            counts[whole] += 1
    assert len(samplers[0]) == 20  # 1 / rate batches per epoch
    draws = epochs * len(samplers[0])  # each row: Binomial(4000, 0.05): mean 200, sd 13.8
    per_row = counts[3:] / draws
    assert abs(per_row.mean() - rate) < 0.002  # the mean of 500 rows: sd 0.00017
    # each row within 6 sd of its mean: all 500 hold with probability > 1 - 1e-6
    assert np.all(np.abs(per_row - rate) < 6 * math.sqrt(rate * (1 - rate) / draws))
    assert np.array_equal(poisson_batch(4, 0, 0, ids, rate), poisson_batch(4, 0, 0, ids, rate))


def test_refusals():
    with pytest.raises(UserError, match="mixes the examples"):
        privacy.check(Config(dp_sgd=True, noise_multiplier=1.0), [Dense(4, 4), BatchNorm(4)])

    class PrivacyTestDense(Dense):  # no rule of its own, but Dense's: allowed
        pass

    privacy.check(Config(dp_sgd=True, noise_multiplier=1.0), [PrivacyTestDense(3, 3)])

    from hpcnn.core.layers import Layer
    from hpcnn.core.params import ParamSpec

    class PrivacyTestGain(Layer):
        def param_specs(self):
            return [ParamSpec("g", (3,), "ones")]

    with pytest.raises(UserError, match="no per-example gradient norm"):
        privacy.check(Config(dp_sgd=True, noise_multiplier=1.0), [PrivacyTestGain()])
    for bad, match in (
        (dict(dp_sgd=True), "needs the noise"),
        (dict(dp_sgd=True, noise_multiplier=1.0, deterministic=True), "deterministic"),
        (dict(dp_sgd=True, noise_multiplier=1.0, zero=1), "zero"),
        (dict(dp_sgd=True, noise_multiplier=1.0, elastic=1), "elastic"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
    ):
        with pytest.raises(UserError, match=match):
            Config(**bad).validate()


def test_default_delta():
    assert privacy.default_delta(1438) == 1e-4
    assert privacy.default_delta(60000) == 1e-5
    assert privacy.default_delta(100) == 1e-2


def test_empty_poisson_batches_still_add_the_noise_and_count():
    from test_privacy_mpi import PRIVATE, layers, reference, stage_differences
    from test_trainer import data

    import hpcnn
    from hpcnn import Trainer
    from hpcnn.parallel.comm import Comm

    x, y, xt, yt = data(rows=200)
    steps = 30  # q = 1 / 200: about a third of the batches are empty
    rate = 1 / 200
    empty = sum(len(poisson_batch(4, 0, b, np.arange(200), rate)) == 0 for b in range(steps))
    assert empty >= 5
    result = Trainer(
        layers(), hpcnn.arrays(x, y, xt, yt), comm=Comm.serial(), epochs=1, max_steps=steps,
        **dict(PRIVATE, batch_size=1),
    ).fit()  # fmt: skip
    assert stage_differences(result, reference(x, y, steps, batch_size=1)) < 1e-12
    assert result.privacy["steps"] == steps


def test_shuffled_batches_train_with_a_warning_that_the_guarantee_does_not_hold():
    from test_privacy_mpi import PRIVATE, layers
    from test_trainer import data

    import hpcnn
    from hpcnn import Trainer
    from hpcnn.parallel.comm import Comm

    x, y, xt, yt = data(rows=200)
    lines = []
    settings = dict(PRIVATE, sampling="shuffle", log=lines.append, epochs=1)
    result = Trainer(layers(), hpcnn.arrays(x, y, xt, yt), comm=Comm.serial(), **settings).fit()
    warned = [line for line in lines if "warning: shuffled fixed-size batches" in line]
    assert len(warned) == 1 and "not a guarantee" in warned[0]
    assert result.steps == 5 and result.privacy["steps"] == 5  # 200 rows in fixed batches of 40


def test_a_run_that_was_not_private_cannot_be_resumed_privately(tmp_path):
    from test_privacy_mpi import PRIVATE, layers
    from test_trainer import data

    import hpcnn
    from hpcnn import Trainer
    from hpcnn.errors import JobError
    from hpcnn.parallel.comm import Comm

    x, y, xt, yt = data(rows=200)
    arrays, d = hpcnn.arrays(x, y, xt, yt), str(tmp_path / "ckpt")
    settings = dict(PRIVATE, comm=Comm.serial(), epochs=1, checkpoint_dir=d)
    Trainer(layers(), arrays, **dict(settings, dp_sgd=False), max_steps=3).fit()
    with pytest.raises((UserError, JobError), match="3 steps into a run that was not private"):
        Trainer(layers(), arrays, **settings, resume="auto").fit()


# --- the command ----------------------------------------------------------------------------------


@pytest.mark.launches
def test_the_command_trains_privately_at_four_ranks_and_the_checkpoint_says_what_was_spent(tmp_path):
    from launch import run

    ckpt = tmp_path / "ckpt"
    args = ["--dp-sgd", "--target-epsilon", "3", "--epochs", "3", "--lr", "0.01", "--run-dir", ""]
    proc = run("hpcnn.train", [*args, "--checkpoint-dir", str(ckpt)], ranks=4, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("privacy spent: epsilon 3.000 at delta 0.0001 (rdp, noise multiplier") == 1, out
    assert out.count("dp-sgd: per-example gradients clipped to 1, noise multiplier") == 1
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    spent = [float(line.split("epsilon ")[1].split()[0]) for line in epochs]
    assert len(spent) == 3 and spent[0] < spent[1] < spent[2] == 3.0, epochs
    (path,) = ckpt.glob("ckpt-*.h5")
    info = run("hpcnn.checkpoint", ["info", str(path)], timeout=60)
    assert (
        info.returncode == 0
        and "privacy: epsilon 3 at delta 0.0001 (rdp accountant) after 66 private" in info.stdout
    )


@pytest.mark.launches
@pytest.mark.parametrize(
    "args, message",
    [
        (["--dp-sgd"], "dp_sgd needs the noise: --noise-multiplier SIGMA, or --target-epsilon E"),
        (["--dp-sgd", "--noise-multiplier", "1", "--deterministic"], "dp_sgd with deterministic:"),
        (
            ["--dp-sgd", "--target-epsilon", "1e-6"],
            "target_epsilon = 1e-06 at target_delta = 0.0001: no noise",
        ),
        (
            ["--dp-sgd", "--noise-multiplier", "1", "--model", "MODEL"],
            "dp_sgd: BatchNorm(16) mixes the examples",
        ),
    ],
)
def test_what_cannot_be_private_is_refused_once_before_training(tmp_path, args, message):
    from launch import run

    model = tmp_path / "bn.toml"
    model.write_text(
        '[[layers]]\ntype = "Dense"\nfan_in = 64\nfan_out = 16\n[[layers]]\ntype = "BatchNorm"\n'
        'channels = 16\n[[layers]]\ntype = "ReLU"\n[[layers]]\ntype = "Dense"\nfan_in = 16\nfan_out = 10\n'
    )
    args = [str(model) if a == "MODEL" else a for a in args]
    proc = run("hpcnn.train", [*args, "--run-dir", ""], ranks=4, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"hpcnn: error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr and "epoch " not in proc.stdout
