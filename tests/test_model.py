"""Flat buffers, views, initialisation and cutting a model into stages."""

import numpy as np
import pytest

from hpcnn.core.layers import Dense, ReLU
from hpcnn.core.model import Sequential, build_mlp, mlp_layers


def test_views_share_the_flat_buffers_in_backward_order():
    model = build_mlp([3, 4, 2], "relu", np.float32)
    p = model.params
    assert p.size == 3 * 4 + 4 + 4 * 2 + 2
    assert p.data.dtype == np.float32 and p.data.flags.c_contiguous and p.grad.shape == p.data.shape
    # Slots are listed in model order; the last layer (which backward reaches first) lies first.
    offsets = [(s.layer, s.name, s.offset) for s in p.slots]
    assert offsets == [(0, "W", 10), (0, "b", 22), (2, "W", 0), (2, "b", 8)]
    first, second = model.layers[0], model.layers[2]
    first.W[1, 2] = 7.0
    second.b[1] = -3.0
    assert p.data[10 + 1 * 4 + 2] == 7.0 and p.data[9] == -3.0
    assert np.shares_memory(first.dW, p.grad) and np.shares_memory(second.db, p.grad)


def test_backward_writes_into_the_gradient_buffer_without_reallocating_it():
    model = build_mlp([3, 4, 2], "relu", np.float64)
    model.params.initialize(np.random.default_rng(0))
    grad = model.params.grad
    before = grad.__array_interface__["data"][0]
    model.forward(np.ones((5, 3)))
    model.backward(np.ones((5, 2)))
    assert model.params.grad is grad and grad.__array_interface__["data"][0] == before
    assert np.abs(grad).sum() > 0


def test_initialisation_is_seeded_and_scaled():
    a = build_mlp([200, 300, 10], "relu", np.float64)
    b = build_mlp([200, 300, 10], "relu", np.float64)
    a.params.initialize(np.random.default_rng(7))
    b.params.initialize(np.random.default_rng(7))
    assert np.array_equal(a.params.data, b.params.data)
    he = a.layers[0].W
    assert he.std() == pytest.approx(np.sqrt(2 / 200), rel=0.02)
    assert not a.layers[0].b.any()
    t = build_mlp([200, 300, 10], "tanh", np.float64)
    t.params.initialize(np.random.default_rng(7))
    limit = np.sqrt(6 / 500)
    assert np.abs(t.layers[0].W).max() <= limit
    assert t.layers[0].W.std() == pytest.approx(
        limit / np.sqrt(3), rel=0.02
    )  # uniform(-a, a): std a / sqrt(3)


def test_stages_compose_to_the_whole_model():
    rng = np.random.default_rng(3)
    model = build_mlp([5, 8, 6, 3], "tanh", np.float64)
    model.params.initialize(np.random.default_rng(9))
    x = rng.normal(size=(4, 5))
    layers = mlp_layers([5, 8, 6, 3], "tanh")
    first, second = Sequential(layers[:3], np.float64), Sequential(layers[3:], np.float64)
    first.params.initialize(np.random.default_rng(9))
    second.params.initialize(
        np.random.default_rng(9), skip=[s for layer in layers[:3] for s in layer.param_specs()]
    )
    assert first.params.size + second.params.size == model.params.size
    assert np.array_equal(second.forward(first.forward(x, False), False), model.forward(x, False))
    assert not np.shares_memory(first.params.data, model.params.data)
    # gradients of the pieces are the pieces of the whole model's gradient
    r = rng.normal(size=(4, 3))
    model.forward(x)
    model.backward(r)
    h = first.forward(x)
    second.forward(h)
    first.backward(second.backward(r, need_input_grad=True))
    pieces = np.concatenate([second.params.grad, first.params.grad])  # backward order: last stage first
    assert np.allclose(pieces, model.params.grad, rtol=0, atol=1e-14)


def test_a_model_is_any_list_of_layers():
    model = Sequential([Dense(2, 3), ReLU(), Dense(3, 3), ReLU(), Dense(3, 1)], np.float32)
    assert Sequential.shape_after(model.layers, 2) == (1,)
    assert Sequential(model.layers, np.float32, in_shape=(2,)).out_shape == (1,)
    assert "Dense(2, 3) -> ReLU" in model.describe()


def test_deferred_weight_gradients_are_one_product_over_all_micro_batches():
    """A pipeline stage's backwards only stack inputs and output gradients; ``weight_grads``
    then gives the gradient of the whole batch, whatever the (uneven, even empty) micro-batches."""
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((11, 5)), rng.standard_normal((11, 3))
    whole = build_mlp([5, 7, 3], "gelu", np.float64)
    whole.params.initialize(np.random.default_rng(1))
    whole.forward(x)
    dx_whole = whole.backward(dout, need_input_grad=True)

    model = build_mlp([5, 7, 3], "gelu", np.float64)
    model.params.data[:] = whole.params.data
    model.params.grad[:] = 123.0  # untouched until weight_grads
    sizes = [4, 0, 6, 1]
    offsets = np.cumsum([0, *sizes])
    dx = []
    for m, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        tape = [{"defer": (int(lo), 11, model.stack(i))} for i in range(len(model.layers))]
        model.forward(x[lo:hi], tape=tape, slot=m)
        dx.append(model.backward(dout[lo:hi], need_input_grad=True, tape=tape, slot=m).copy())
    assert (model.params.grad == 123.0).all()
    model.weight_grads(11)
    np.testing.assert_allclose(model.params.grad, whole.params.grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.concatenate(dx), dx_whole, rtol=1e-12, atol=1e-14)


def test_stacks_are_reused_when_a_step_has_fewer_rows():
    """An epoch's short last batch reuses the full batch's stacks (no second set is kept)."""
    model = build_mlp([5, 7, 3], "relu", np.float64)
    model.params.initialize(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    held = []
    for rows in (10, 4, 10):
        x, dout = rng.standard_normal((rows, 5)), rng.standard_normal((rows, 3))
        tape = [{"defer": (0, rows, model.stack(i))} for i in range(len(model.layers))]
        model.forward(x, tape=tape)
        model.backward(dout, tape=tape)
        model.weight_grads(rows)
        np.testing.assert_allclose(
            model.layers[0].dW,
            x.T @ ((x @ model.layers[0].W + model.layers[0].b > 0) * (dout @ model.layers[2].W.T)),
            rtol=1e-12,
        )
        held.append(model.workspace.nbytes)
    assert held[1] == held[2]  # nothing new for a shape seen before
    stack = model.stack(2)
    assert np.shares_memory(stack("x", (4, 7), np.float64), stack("x", (10, 7), np.float64))
