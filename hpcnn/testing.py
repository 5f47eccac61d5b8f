"""Tools for testing layers and models: ``check_gradients`` compares backward with finite differences.

A layer of your own (``hpcnn.Layer`` subclass) is right when its backward is the derivative of its
forward. ``check_gradients(MyLayer(...), in_shape)`` checks exactly that, in float64::

    from hpcnn.testing import check_gradients
    check_gradients(MyLayer(8), 8)              # raises AssertionError if backward is wrong
    check_gradients([Dense(4, 8), MyLayer(8)], 4)

The objective is ``sum(forward(x) * r)`` for a fixed random ``r`` (so ``r`` is the output gradient
backward receives); every parameter element and every input element is moved by ``+-h`` in turn
(central differences). A tensor passes when ``||backward - numeric|| / (||backward|| + ||numeric||)``
is at most ``rtol``: a norm over the whole tensor, which the finite differences' rounding noise on
small elements does not trip, while a wrong factor or sign anywhere does.
"""

import copy

import numpy as np

from hpcnn.core.layers import Layer
from hpcnn.core.model import Sequential, as_shape


def check_gradients(layer_or_model, x_or_in_shape, *, rows: int = 3, h: float = 1e-6, rtol: float = 1e-6,
                    seed: int = 0) -> float:  # fmt: skip
    """Check the backward of ``layer_or_model`` against central finite differences in float64.

    Parameters
    ----------
    layer_or_model : a ``Layer``, a list of layers, or a ``Sequential``. It is copied (in float64),
        never changed. A ``Sequential``'s current parameters are used; layers on their own get
        parameters drawn from ``seed`` (their initialisation plus noise, so that no tensor is zero).
    x_or_in_shape : input rows (copied to float64), or the shape of one input row (a number of
        features, or ``(H, W, C)`` for images): then ``rows`` rows are drawn from ``seed`` with
        ``0.1 <= |x| <= 2`` (off ReLU's kink).
    h : the finite-difference step.
    rtol : the largest relative error (per tensor, see the module docstring) that passes.

    Returns the largest relative error over the tensors (parameters and input); raises
    ``AssertionError`` naming the worst tensor, its worst element and their values when it is above
    ``rtol``.
    """
    rng = np.random.default_rng(seed)
    if isinstance(layer_or_model, Sequential):
        layers, values = layer_or_model.layers, layer_or_model.params.data
    elif isinstance(layer_or_model, Layer):
        layers, values = [layer_or_model], None
    else:
        layers, values = list(layer_or_model), None
    model = Sequential(copy.deepcopy(layers), np.float64)
    if values is not None:
        model.params.data[:] = values
    else:
        model.params.initialize(rng)
        model.params.data += 0.1 * rng.normal(size=model.params.size)
    if isinstance(x_or_in_shape, (int, np.integer, tuple)):
        shape = (rows, *as_shape(x_or_in_shape))
        x = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    else:
        x = np.array(x_or_in_shape, dtype=np.float64)
    out = model.forward(x, train=False)
    r = rng.normal(size=out.shape)
    scratch = [{} for _ in model.layers]

    def objective() -> float:
        # the training forward, which backward differentiates (BatchNorm's batch statistics,
        # Dropout's mask: the same every call, as nothing in the model's context changes)
        return float(np.sum(model.forward(x, tape=[d.clear() or d for d in scratch]) * r))

    model.forward(x)
    dx = model.backward(r.copy(), need_input_grad=True)
    if dx is None:
        raise AssertionError("backward returned no input gradient though one was asked for (need_dx)")
    checks = [("input", x, np.array(dx))]
    for slot in model.params.slots:
        name = f"layer {slot.layer} {model.layers[slot.layer]!r} {slot.spec.name}"
        view = model.params.view(model.params.data, slot)
        checks.append((name, view, model.params.view(model.params.grad, slot).copy()))
    worst, nonzero = (-1.0, "", None, None), False
    for name, tensor, analytic in checks:
        if analytic.shape != tensor.shape:
            raise AssertionError(
                f"{name}: backward's gradient has shape {analytic.shape}, the tensor {tensor.shape}"
            )
        numeric = central_differences(objective, tensor, h)
        nonzero = nonzero or bool(analytic.any() or numeric.any())
        scale = np.linalg.norm(analytic) + np.linalg.norm(numeric)
        error = float(np.linalg.norm(analytic - numeric) / scale) if scale > 0 else 0.0
        if not np.isfinite(error):
            error = float("inf")
        if error > worst[0]:
            worst = (error, name, analytic, numeric)
    error, name, analytic, numeric = worst
    if not nonzero:
        raise AssertionError(
            "nothing was checked: every gradient is zero (a model whose parameters are all zero?)"
        )
    if error > rtol:
        index = np.unravel_index(np.argmax(np.abs(analytic - numeric)), analytic.shape)
        where = ", ".join(map(str, index))
        raise AssertionError(
            f"gradient check failed: {name}: relative error {error:.3g} > rtol {rtol:g}; worst element "
            f"[{where}]: backward {analytic[index]:.9g}, finite differences {numeric[index]:.9g}"
        )
    return error


def central_differences(objective, tensor, h: float):
    """``d objective / d tensor`` element by element, moving each element in place and back."""
    grad = np.zeros(tensor.shape)
    flat, gflat = tensor.reshape(-1), grad.reshape(-1)  # views: tensor is contiguous
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = objective()
        flat[i] = old - h
        down = objective()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad
