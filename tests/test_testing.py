"""hpcnn.testing.check_gradients: passes for every built-in layer, fails for a wrong backward."""

import numpy as np
import pytest
from user_layers import Scale

from hpcnn.core.layers import GELU, Dense, Layer, ReLU, Sigmoid, Tanh
from hpcnn.core.model import Sequential, build_mlp
from hpcnn.testing import check_gradients


class Square(Layer):
    """``y = x^2``, with a backward that forgets the factor 2 when ``wrong``."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def forward(self, x, saved, ws=None):
        if saved is not None:
            saved["x"] = x
        return x * x

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=None):
        return dy * saved.pop("x") * (1 if self.wrong else 2)


@pytest.mark.parametrize(
    "layer,features",
    [
        (Dense(5, 3), 5),
        (ReLU(), 4),
        (Sigmoid(), 4),
        (Tanh(), 4),
        (GELU(), 4),
        (GELU(approximate="tanh"), 4),
        (Layer(), 4),
        (Square(), 4),
        (Scale(4), 4),
    ],
)
def test_every_built_in_layer_passes(layer, features):
    assert check_gradients(layer, features) < 1e-7


def test_models_and_layer_lists_pass_and_are_not_changed():
    model = build_mlp([3, 5, 2], "gelu", np.float32, "sigmoid")
    model.params.initialize(np.random.default_rng(1))
    before, W = model.params.data.copy(), model.layers[0].W
    assert check_gradients(model, np.random.default_rng(2).normal(size=(4, 3))) < 1e-6
    assert np.array_equal(model.params.data, before) and model.layers[0].W is W  # still its own buffer
    assert model.params.data.dtype == np.float32
    assert check_gradients([Dense(3, 4), Scale(4), Tanh(), Dense(4, 2)], 3, rows=5, seed=3) < 1e-7


def test_a_missing_factor_two_fails_naming_the_input():
    with pytest.raises(
        AssertionError, match=r"gradient check failed: input: relative error 0.333 > rtol 1e-06"
    ):
        check_gradients(Square(wrong=True), 4)
    # behind a Dense layer every tensor is off by the same factor
    message = (
        r"layer 0 Dense\(2, 4\) \w: relative error 0.333 > .* worst element \[[\d, ]+\]: backward .*, finite"
    )
    with pytest.raises(AssertionError, match=message):
        check_gradients([Dense(2, 4), Square(wrong=True)], 2)


def test_a_wrong_parameter_gradient_fails_naming_the_tensor():
    with pytest.raises(
        AssertionError, match=r"gradient check failed: layer 1 Scale w: relative error 1 > rtol"
    ):
        check_gradients([Dense(3, 4), Scale(4, wrong=True)], 3)
    model = Sequential([Dense(3, 4), Scale(4)], np.float64)
    with pytest.raises(AssertionError, match="nothing was checked: every gradient is zero"):
        check_gradients(model, 3)  # its parameters are all zero: it was never initialised
