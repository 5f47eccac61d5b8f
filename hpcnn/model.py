"""A model is an ordered list of layers over one pair of flat buffers.

``Sequential`` runs forward in order and backward in reverse. ``stage(start, stop)`` cuts out a
consecutive run of layers as a model of its own (with its own buffers), which is what a pipeline
stage holds. ``build_mlp`` is one way to make the layer list; the core types do not assume it.
"""

import copy

from hpcnn.layers import ACTIVATIONS, INIT_FOR, Dense
from hpcnn.params import FlatParams


class Sequential:
    """Layers applied in order, parameters in one ``FlatParams``.

    Parameters
    ----------
    layers : list of Layer
    dtype : dtype of parameters, gradients and activations
    """

    def __init__(self, layers, dtype):
        self.layers = list(layers)
        self.dtype = dtype
        self.params = FlatParams(self.layers, dtype)

    def forward(self, x, train: bool = True):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dout, need_input_grad: bool = False):
        """Fill ``params.grad`` (overwriting it) and return the input gradient if asked."""
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            dout = self.layers[i].backward(dout, need_dx=need_input_grad or i > 0)
        return dout

    def stage(self, start: int, stop: int) -> "Sequential":
        """Layers ``start:stop`` as a model of their own, with copies of their parameters."""
        part = Sequential([copy.copy(layer) for layer in self.layers[start:stop]], self.dtype)
        mine = [s for s in self.params.slots if start <= s.layer < stop]
        for src, dst in zip(mine, part.params.slots, strict=True):
            FlatParams.view(part.params.data, dst)[...] = FlatParams.view(self.params.data, src)
        return part

    def out_features(self, in_features: int) -> int:
        for layer in self.layers:
            in_features = layer.out_features(in_features)
        return in_features

    def describe(self) -> str:
        return " -> ".join(map(repr, self.layers)) + f"  ({self.params.size:,} parameters)"


def build_mlp(sizes, activation: str, dtype, output_activation: str = "identity") -> Sequential:
    """Dense layers of ``sizes[i] -> sizes[i+1]`` with ``activation`` between them.

    ``output_activation`` follows the last Dense (``identity`` for logits fed to the fused softmax
    cross-entropy; ``sigmoid`` for the tutorial's MSE network).
    """
    act = ACTIVATIONS[activation]
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        last = i == len(sizes) - 2
        nonlinearity = output_activation if last else activation
        layers.append(Dense(fan_in, fan_out, init=INIT_FOR[nonlinearity]))
        if not last:
            layers.append(act())
        elif output_activation != "identity":
            layers.append(ACTIVATIONS[output_activation]())
    return Sequential(layers, dtype)
