"""Analytic gradients of every layer, loss and a whole model against central finite differences.

float64, relative error ||analytic - numeric|| / (||analytic|| + ||numeric||) < 1e-6.
"""

import numpy as np
import pytest

from hpcnn.core.layers import GELU, Dense, Layer, ReLU, Sigmoid, Tanh
from hpcnn.core.losses import MeanSquaredError, SoftmaxCrossEntropy, count_correct
from hpcnn.core.model import Sequential, build_mlp
from hpcnn.testing import central_differences

H = 1e-6
TOL = 1e-6


def rel_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


def numeric_grad(f, array):
    """Central differences of scalar ``f()`` with respect to every element of ``array`` (in place)."""
    return central_differences(f, array, H)


def away_from_kinks(rng, shape):
    """Inputs with |x| >= 0.1 so that ReLU's kink at 0 is never inside a difference step."""
    x = rng.uniform(0.1, 2.0, shape)
    return x * rng.choice([-1.0, 1.0], shape)


def gelu_tanh():
    return GELU(approximate="tanh")


@pytest.mark.parametrize("layer_cls", [ReLU, Sigmoid, Tanh, GELU, gelu_tanh, Layer])
def test_activation_input_gradient(layer_cls):
    rng = np.random.default_rng(1)
    layer = layer_cls()
    x = away_from_kinks(rng, (5, 7))
    r = rng.normal(size=(5, 7))  # upstream gradient: objective is sum(forward(x) * r)
    saved = {}
    layer.forward(x, saved)
    dx = layer.backward(r.copy(), saved)
    num = numeric_grad(lambda: float((layer.forward(x, None) * r).sum()), x)
    assert rel_error(dx, num) < TOL


def test_dense_gradients():
    rng = np.random.default_rng(2)
    model = Sequential([Dense(6, 4)], np.float64)
    model.params.initialize(rng)
    model.params.data[:] = rng.normal(size=model.params.size)  # nonzero biases too
    x = rng.normal(size=(5, 6))
    r = rng.normal(size=(5, 4))

    def objective():
        return float((model.forward(x, train=False) * r).sum())

    model.forward(x)
    dx = model.backward(r.copy(), need_input_grad=True)
    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    assert rel_error(model.params.grad, numeric_grad(objective, model.params.data)) < TOL


def test_dense_skips_input_gradient_when_not_needed():
    model = Sequential([Dense(3, 2)], np.float64)
    model.forward(np.ones((4, 3)))
    assert model.backward(np.ones((4, 2))) is None


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_softmax_cross_entropy_gradient(scale):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, labels)
    d = loss.backward(scale)
    num = numeric_grad(lambda: scale * SoftmaxCrossEntropy().forward(logits, labels), logits)
    assert rel_error(d, num) < TOL


def test_softmax_cross_entropy_value_and_stability():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    loss = SoftmaxCrossEntropy().forward(logits, np.array([0, 2]))
    # row 0: log(1 + e^-1000 + e^-2000) ~ 0; row 1: log(3)
    assert loss == pytest.approx(np.log(3.0), rel=1e-12)
    assert np.isfinite(SoftmaxCrossEntropy().forward(np.array([[1e4, -1e4]], np.float32), np.array([1])))


@pytest.mark.parametrize("integer_labels", [True, False])
def test_mse_gradient(integer_labels):
    rng = np.random.default_rng(4)
    out = rng.normal(size=(5, 3))
    target = rng.integers(0, 3, 5) if integer_labels else rng.normal(size=(5, 3))
    loss = MeanSquaredError()
    loss.forward(out, target)
    d = loss.backward(0.5)
    num = numeric_grad(lambda: 0.5 * MeanSquaredError().forward(out, target), out)
    assert rel_error(d, num) < TOL


def test_mse_of_one_output_against_labels_compares_the_label_itself():
    rng = np.random.default_rng(7)
    out, labels = rng.normal(size=(6, 1)), np.array([0, 1, 1, 0, 1, 0])
    loss = MeanSquaredError()
    assert loss.forward(out, labels) == pytest.approx(float(((out[:, 0] - labels) ** 2).sum()), rel=1e-15)
    d = loss.backward(0.25)
    num = numeric_grad(lambda: 0.25 * MeanSquaredError().forward(out, labels), out)
    assert rel_error(d, num) < TOL
    assert count_correct(np.array([[0.2], [0.7], [0.51], [0.9]]), np.array([0, 1, 0, 0])) == 2


def test_mse_value():
    out = np.array([[0.5, 0.0], [1.0, 1.0]])
    # row 0 vs one-hot [1, 0]: (0.25 + 0) / 2; row 1 vs [0, 1]: (1 + 0) / 2
    assert MeanSquaredError().forward(out, np.array([0, 1])) == pytest.approx(0.125 + 0.5)


@pytest.mark.parametrize(
    "activation,output_activation,loss_cls",
    [
        ("relu", "identity", SoftmaxCrossEntropy),
        ("gelu", "identity", SoftmaxCrossEntropy),
        ("gelu_tanh", "identity", SoftmaxCrossEntropy),
        ("tanh", "identity", SoftmaxCrossEntropy),
        ("sigmoid", "sigmoid", MeanSquaredError),
    ],
)
def test_model_gradient(activation, output_activation, loss_cls):
    rng = np.random.default_rng(5)
    model = build_mlp([4, 6, 5, 3], activation, np.float64, output_activation)
    model.params.initialize(rng)
    model.params.data[:] += 0.1 * rng.normal(size=model.params.size)
    x = rng.normal(size=(7, 4))
    y = rng.integers(0, 3, 7)
    loss = loss_cls()

    def objective():
        return loss_cls().forward(model.forward(x, train=False), y) / 7

    loss.forward(model.forward(x), y)
    dx = model.backward(loss.backward(1 / 7), need_input_grad=True)
    assert rel_error(model.params.grad, numeric_grad(objective, model.params.data)) < TOL
    assert rel_error(dx, numeric_grad(objective, x)) < TOL


def test_gradient_of_empty_slice_is_zero():
    """A rank whose slice of the last batch is empty contributes exactly zero."""
    model = build_mlp([3, 4, 2], "relu", np.float64)
    model.params.initialize(np.random.default_rng(0))
    model.params.grad[:] = 1.0
    loss = SoftmaxCrossEntropy()
    assert loss.forward(model.forward(np.empty((0, 3))), np.empty(0, np.int64)) == 0.0
    model.backward(loss.backward(0.5))
    assert not model.params.grad.any()


def test_accumulated_micro_batch_gradients_equal_the_whole_batch_gradient():
    """Micro-batches in flight together (one tape and workspace slot each), backward in any order,
    accumulated."""
    rng = np.random.default_rng(6)
    model = build_mlp([4, 6, 3], "gelu", np.float64)
    model.params.initialize(rng)
    x, r = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    model.forward(x)
    model.backward(r)
    whole = model.params.grad.copy()
    parts = [slice(0, 4), slice(4, 5), slice(5, 9)]
    tapes = [[{} for _ in model.layers] for _ in parts]
    for m, (part, tape) in enumerate(zip(parts, tapes, strict=True)):
        model.forward(x[part], tape=tape, slot=m)
    for i in (2, 0, 1):
        model.backward(r[parts[i]], tape=tapes[i], accumulate=i != 2, slot=i)
    assert np.abs(model.params.grad - whole).max() < 1e-13
    assert all(not saved for tape in tapes for saved in tape), "backward releases what forward kept"
