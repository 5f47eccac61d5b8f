"""A layer hpcnn does not ship, written as a user would: tests import it (and a job started by a test
imports it by name, ``--import user_layers``) to check the registry, checkpoints and the gradient
check with a layer that has a parameter of its own."""

from hpcnn.core.layers import Layer
from hpcnn.core.params import ParamSpec


class Scale(Layer):
    """``y = x * w`` per feature; ``wrong``: the parameter gradient has the wrong sign (a bug the
    gradient check must find)."""

    def __init__(self, features: int, init: str = "ones", wrong: bool = False):
        self.features, self.init, self.wrong = features, init, wrong

    def param_specs(self):
        return [ParamSpec("w", (self.features,), self.init)]

    def bind(self, params, grads):
        self.w, self.dw = params["w"], grads["w"]

    def forward(self, x, saved, ws=None):
        if saved is not None:
            saved["x"] = x
        return x * self.w

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=None):
        dw = (saved.pop("x") * dy).sum(axis=0) * (-1 if self.wrong else 1)
        if accumulate:
            self.dw += dw
        else:
            self.dw[...] = dw
        return dy * self.w if need_dx else None
