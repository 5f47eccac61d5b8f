"""User-defined layers: registered by class name, rebuilt from their specs, clear errors."""

import numpy as np
import pytest
from user_layers import Scale

from hpcnn.core.layers import LAYER_TYPES, Dense, Layer, ReLU, layer_from_spec
from hpcnn.core.model import Sequential
from hpcnn.errors import UserError
from hpcnn.io.checkpoints import architecture, architecture_difference


def test_a_user_layer_is_registered_and_rebuilt_from_its_spec():
    assert LAYER_TYPES["Scale"] is Scale
    layer = Scale(5)
    default = {"type": "Scale", "features": 5, "init": "ones", "wrong": False}
    assert layer.spec() == default  # the default spec(): each argument of __init__, by name
    again = layer_from_spec(layer.spec())
    assert type(again) is Scale and again.spec() == layer.spec()


def test_a_model_with_a_user_layer_round_trips_through_its_architecture():
    rng = np.random.default_rng(0)
    layers = [Dense(3, 4), Scale(4), ReLU(), Dense(4, 2)]
    model = Sequential(layers, np.float64)
    model.params.initialize(rng)
    model.params.data[:] = rng.normal(size=model.params.size)
    saved = architecture(layers, 3, "float64")
    rebuilt = Sequential([layer_from_spec(spec) for spec in saved["layers"]], np.float64)
    rebuilt.params.data[:] = model.params.data  # what a checkpoint restores
    assert architecture_difference(saved, architecture(rebuilt.layers, 3, "float64")) is None
    x = rng.normal(size=(6, 3))
    np.testing.assert_array_equal(rebuilt.forward(x, train=False), model.forward(x, train=False))
    changed = architecture([Dense(3, 4), Scale(4, init="zeros"), ReLU(), Dense(4, 2)], 3, "float64")
    assert architecture_difference(saved, changed) == (
        "layer 1 is Scale(features=4, init=ones, wrong=False) in the checkpoint, "
        "Scale(features=4, init=zeros, wrong=False) in this run"
    )


def test_an_unknown_type_says_to_import_the_module_that_defines_it():
    with pytest.raises(UserError, match=r"unknown layer type 'Attention': import the module that defines"):
        layer_from_spec({"type": "Attention", "heads": 4})
    with pytest.raises(UserError, match=r"cannot rebuild layer Scale from .*'width'"):
        layer_from_spec({"type": "Scale", "width": 4})


def test_two_classes_with_one_name_are_an_error_when_defined():
    with pytest.raises(UserError, match=r"the name 'Dense' is already taken by hpcnn.core.layers.Dense"):

        class Dense(Layer):  # noqa: F811 (a second class of a taken name)
            pass

    assert LAYER_TYPES["Dense"].__module__ == "hpcnn.core.layers"


def test_defining_the_same_class_again_replaces_it():
    def define():
        class Again(Layer):
            pass

        return Again

    first, second = define(), define()
    assert first is not second and LAYER_TYPES["Again"] is second


def test_spec_errors_name_the_layer_and_the_fix():
    class Forgetful(Layer):
        def __init__(self, width):
            self.size = width

    with pytest.raises(UserError, match=r"Forgetful: spec\(\) records the constructor's argument 'width'"):
        Forgetful(3).spec()

    class Opaque(Layer):
        def __init__(self, fn):
            self.fn = fn

    with pytest.raises(UserError, match=r"layer Opaque: spec\(\) .* is not JSON"):
        Opaque(print).spec()
