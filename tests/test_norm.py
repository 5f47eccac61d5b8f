"""BatchNorm, LayerNorm and Dropout: gradients, the formulas, running statistics, layout-free masks,
checkpoints of layer state."""

import numpy as np
import pytest

import hpcnn
from hpcnn import BatchNorm, Dense, Dropout, LayerNorm, ReLU, Trainer
from hpcnn.core.dropout import mask_uniforms
from hpcnn.core.model import Context, Sequential
from hpcnn.io.checkpoints import inspect, verify
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.deterministic import Sharding, Workers
from hpcnn.testing import check_gradients

# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, shape, rows",
    [
        (BatchNorm(5), 5, 6),
        (BatchNorm(3), (2, 2, 3), 3),
        (LayerNorm(5), 5, 3),
        (LayerNorm(3), (2, 2, 3), 3),
        (Dropout(0.3), 7, 5),
        (Dropout(0.5), (2, 3, 2), 3),
    ],
)
def test_backward_is_the_derivative_of_the_training_forward(layer, shape, rows):
    assert check_gradients(layer, shape, rows=rows) < 1e-6


def test_a_model_with_batchnorm_and_dropout_passes_the_gradient_check():
    layers = [BatchNorm(4), ReLU(), Dropout(0.25), Dense(4, 6), LayerNorm(6), Dense(6, 3)]
    assert check_gradients(layers, 4, rows=8) < 1e-6


# --- BatchNorm against the float64 formula --------------------------------------------------------


def direct_batchnorm(x, g, b, dy, eps=1e-5):
    """Forward and backward of batch normalisation over every axis but the last, written out."""
    c = x.shape[-1]
    v = x.reshape(-1, c)
    m = len(v)
    mean = v.mean(axis=0)
    var = ((v - mean) ** 2).mean(axis=0)
    xhat = (v - mean) / np.sqrt(var + eps)
    y = g * xhat + b
    d = dy.reshape(-1, c)
    dxhat = d * g
    dvar = np.sum(dxhat * (v - mean), axis=0) * -0.5 * (var + eps) ** -1.5
    dmean = -np.sum(dxhat, axis=0) / np.sqrt(var + eps) + dvar * np.mean(-2 * (v - mean), axis=0)
    dx = dxhat / np.sqrt(var + eps) + dvar * 2 * (v - mean) / m + dmean / m
    return (y.reshape(x.shape), dx.reshape(x.shape), np.sum(d * xhat, axis=0), d.sum(axis=0), mean,
            var * m / (m - 1))  # fmt: skip


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 2, 5)])
def test_batchnorm_equals_the_formula_and_updates_the_running_statistics(shape):
    rng = np.random.default_rng(1)
    x, dy = rng.normal(2.0, 3.0, shape), rng.normal(size=shape)
    model = Sequential([BatchNorm(5)], np.float64)
    layer = model.layers[0]
    layer.g[...] = rng.uniform(0.5, 2, 5)
    layer.b[...] = rng.normal(size=5)
    y = model.forward(x).copy()
    dx = model.backward(dy, need_input_grad=True)
    ey, edx, edg, edb, mean, var = direct_batchnorm(x, layer.g, layer.b, dy)
    np.testing.assert_allclose(y, ey, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, edx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.dg, edg, rtol=1e-12)
    np.testing.assert_allclose(layer.db, edb, rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * var, rtol=1e-12)
    # inference normalises with the running statistics, and changes nothing
    state = model.params.state.copy()
    out = model.forward(x, train=False)
    rm, rv = layer.running_mean, layer.running_var
    np.testing.assert_allclose(out, layer.g * (x - rm) / np.sqrt(rv + 1e-5) + layer.b, rtol=1e-12)
    assert np.array_equal(model.params.state, state)


def test_the_running_statistics_are_state_not_parameters():
    model = Sequential([Dense(3, 4), BatchNorm(4)], np.float32)
    assert model.params.size == 3 * 4 + 4 + 2 * 4  # W, b, g, b
    assert model.params.state.size == 8 and [s.name for s in model.params.state_slots] == ["mean", "var"]
    np.testing.assert_array_equal(model.layers[1].running_var, 1)
    np.testing.assert_array_equal(model.layers[1].running_mean, 0)


def test_deterministic_batchnorm_sums_per_shard_and_equals_the_plain_layer():
    rng = np.random.default_rng(2)
    x, dy = rng.normal(1, 2, size=(22, 6)), rng.normal(size=(22, 6))
    plain = Sequential([BatchNorm(6)], np.float64)
    sharded = Sequential([BatchNorm(6)], np.float64)
    grads = np.zeros((6, sharded.params.size))
    sharded.shard(Sharding(4, Workers(1)), grads)  # 6 shards, the last of 2 rows
    y = plain.forward(x).copy()
    dx = plain.backward(dy, need_input_grad=True).copy()
    tape = [{"shard": 0}]
    ys = sharded.forward(x, tape=tape).copy()
    dxs = sharded.backward(dy, need_input_grad=True, tape=tape)
    np.testing.assert_allclose(ys, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxs, dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.sum(axis=0), plain.params.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sharded.params.state, plain.params.state, rtol=1e-12)


def test_micro_batches_update_the_running_statistics_once_each_in_order():
    rng = np.random.default_rng(3)
    x = rng.normal(3, 2, size=(20, 4))
    model = Sequential([BatchNorm(4)], np.float64)
    model.forward(x[:12])
    model.forward(x[12:])
    m1, m2 = x[:12].mean(axis=0), x[12:].mean(axis=0)
    v1, v2 = x[:12].var(axis=0, ddof=1), x[12:].var(axis=0, ddof=1)
    np.testing.assert_allclose(model.layers[0].running_mean, 0.9 * 0.1 * m1 + 0.1 * m2, rtol=1e-12)
    np.testing.assert_allclose(model.layers[0].running_var, 0.81 + 0.09 * v1 + 0.1 * v2, rtol=1e-12)


# --- Dropout --------------------------------------------------------------------------------------


def dropout_forward(layer_index, x, pieces, step=3, seed=7):
    model = Sequential([Dropout(0.4)], np.float64)
    model.context = Context(seed=seed, step=step, first_layer=layer_index, batch_rows=len(x))
    return np.concatenate([model.forward(x[a:b], row=a).copy() for a, b in pieces])


def test_dropout_masks_do_not_depend_on_how_the_batch_is_cut():
    x = np.ones((16, 3, 2, 5))  # 30 values a row: not a multiple of 4
    whole = dropout_forward(2, x, [(0, 16)])
    for pieces in ([(0, 8), (8, 16)], [(0, 4), (4, 8), (8, 12), (12, 16)], [(0, 3), (3, 16)]):
        assert np.array_equal(dropout_forward(2, x, pieces), whole)
    assert not np.array_equal(dropout_forward(3, x, [(0, 16)]), whole)  # another layer
    assert not np.array_equal(dropout_forward(2, x, [(0, 16)], step=4), whole)  # another step
    assert set(np.unique(whole)) == {0.0, 1 / 0.6}


def test_dropout_drops_at_rate_p_and_is_the_identity_at_inference():
    u = mask_uniforms(1, 0, 0, 0, 2000, 50)
    assert abs(np.mean(u < 0.3) - 0.3) < 0.01
    x = np.random.default_rng(0).normal(size=(4000, 25))
    layer = Dropout(0.3)
    model = Sequential([layer], np.float64)
    y = model.forward(x)
    assert abs(np.mean(y == 0) - 0.3) < 0.01
    assert abs(y.mean() - x.mean()) < 0.02  # inverted scaling keeps the mean
    assert model.forward(x, train=False) is x or np.array_equal(model.forward(x, train=False), x)
    with pytest.raises(ValueError, match="expected 0 <= p < 1"):
        Dropout(1.0)


# --- training and checkpoints ---------------------------------------------------------------------


def data(rows=96, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(rows + 32, features))
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=1).astype(np.int32)
    return hpcnn.arrays(x[:rows], y[:rows], x[rows:], y[rows:])


def model():
    return [Dense(6, 12), BatchNorm(12), ReLU(), Dropout(0.2), Dense(12, 3)]


SETTINGS = dict(loss="cross_entropy", batch_size=16, epochs=2, lr=0.05, dtype="float64", log=None,
                eval_every=0, lr_schedule="constant")  # fmt: skip


def test_layer_state_is_checkpointed_and_a_resumed_run_is_bitwise_the_straight_one(tmp_path):
    comm = Comm.serial()
    straight = Trainer(model(), data(), comm=comm, **SETTINGS).fit()
    d = str(tmp_path / "ckpt")
    first = Trainer(model(), data(), comm=comm, max_steps=7, checkpoint_dir=d, **SETTINGS).fit()
    path = first.checkpoint
    verify(path)
    assert inspect(path).layer_state == 24
    import h5py

    with h5py.File(path) as f:
        assert sorted(f["state/001_batchnorm"]) == ["mean", "var"]
        mean = f["state/001_batchnorm/mean"][...]
    assert np.array_equal(mean, first.model.layers[1].running_mean) and mean.any()
    resumed = Trainer(model(), data(), comm=comm, checkpoint_dir=d, resume="auto", **SETTINGS).fit()
    assert np.array_equal(resumed.model.params.data, straight.model.params.data)
    assert np.array_equal(resumed.model.params.state, straight.model.params.state)
    assert first.step_losses + resumed.step_losses == straight.step_losses


def test_weight_decay_leaves_the_running_statistics_alone():
    comm = Comm.serial()
    settings = dict(SETTINGS, optimizer="adamw", weight_decay=0.5, epochs=1)
    r = Trainer([Dense(6, 12), BatchNorm(12), Dense(12, 3)], data(), comm=comm, **settings).fit()
    # the running variance is the (momentum-averaged) batch variance, not decayed towards zero
    assert (r.model.layers[1].running_var > 0.05).all()
