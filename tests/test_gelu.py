"""GELU's two forms: the exact one against math.erfc, the series it uses derived again, and
checkpoints that rebuild the form they were trained with. (Gradients: test_gradients.py.)"""

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest

from hpcnn.core import layers
from hpcnn.core.layers import GELU, current_spec, layer_from_spec, normal_cdf
from hpcnn.core.model import mlp_layers
from hpcnn.io.checkpoints import architecture, architecture_difference


def reference_cdf(x) -> np.ndarray:
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in np.asarray(x, dtype=np.float64)])


def test_the_exact_form_matches_erf_to_rounding():
    x = np.concatenate([np.linspace(-8, 8, 20001), [0.0, -0.0, 1e-300, -1e-300]])
    ref = reference_cdf(x)
    got = normal_cdf(x, np.empty_like(x))
    assert np.abs(got - ref).max() <= 4 * 2**-52  # a few units in the last place of values near 1
    # relative error in the lower tail: exp(-x^2 / 2) amplifies x's rounding by x^2
    assert (np.abs(got - ref) / ref).max() < 2e-14
    far = np.array([-40.0, -38.0, -30.0, 30.0, np.inf, -np.inf])
    assert normal_cdf(far, np.empty_like(far)) == pytest.approx(reference_cdf(far), rel=1e-12, abs=0)
    x32 = x.astype(np.float32)
    got32 = normal_cdf(x32, np.empty_like(x32))
    assert got32.dtype == np.float32 and np.abs(got32 - reference_cdf(x32)).max() < 3e-7


def test_the_forms_differ_as_published():
    x = np.linspace(-4, 4, 801)
    exact = GELU().forward(x, None)
    approx = GELU(approximate="tanh").forward(x, None)
    np.testing.assert_allclose(exact, x * reference_cdf(x), rtol=1e-14, atol=1e-16)
    # the tanh approximation's largest error is about 4.7e-4 (near |x| = 2.2)
    assert 4e-4 < np.abs(exact - approx).max() < 5e-4


def mills_over_t(t: Decimal, k: Decimal) -> Decimal:
    """``Q(x) / (phi(x) t)`` at ``x = k (1 - t) / t``, to ~100 digits."""
    x = k * (1 - t) / t
    if x <= 15:  # Q / phi = sqrt(pi / 2) e^(x^2 / 2) - sum x^(2n+1) / (1 3 5 ... (2n+1))
        s, term, n = Decimal(0), x, 0
        while term > s * Decimal(10) ** -125:
            s += term
            n += 1
            term = term * x * x / (2 * n + 1)
        return ((PI / 2).sqrt() * (x * x / 2).exp() - s) / t
    f = x  # the continued fraction 1 / (x + 1 / (x + 2 / (x + ...)))
    for n in range(4000, 0, -1):
        f = x + n / f
    return 1 / (f * t)


def decimal_pi() -> Decimal:
    getcontext().prec = 132
    last, t, s, n, na, d, da = 0, Decimal(3), Decimal(3), 1, 0, 0, 24
    while s != last:
        last, n, na, d, da = s, n + na, na + 8, d + da, da + 32
        t = t * n / d
        s += t
    getcontext().prec = 130
    return +s


PI = decimal_pi()


def test_the_series_is_the_chebyshev_series_of_the_mills_ratio():
    """The coefficients in layers.py, derived again: g(u) at 64 Chebyshev points in 130-digit
    arithmetic, then the discrete cosine transform."""
    nodes = 64
    j = np.arange(nodes)
    u = np.cos(np.pi * (j + 0.5) / nodes)
    k = Decimal(layers._GELU_K)
    g = np.array([float(mills_over_t((Decimal(float(v)) + 1) / 2, k)) for v in u])
    series = layers._GELU_SERIES
    coefficients = [2 / nodes * np.sum(g * np.cos(m * np.pi * (j + 0.5) / nodes)) for m in range(len(series))]
    coefficients[0] /= 2
    np.testing.assert_allclose(series, coefficients, rtol=0, atol=2e-15)


def test_specs_record_the_form_and_old_checkpoints_keep_the_tanh_form():
    assert GELU().spec() == {"type": "GELU", "approximate": "none"}
    assert layer_from_spec(GELU(approximate="tanh").spec()).approximate == "tanh"
    old = layer_from_spec({"type": "GELU"})  # written before GELU had a choice: it computed tanh
    assert old.approximate == "tanh" and current_spec({"type": "GELU"})["approximate"] == "tanh"
    x = np.linspace(-3, 3, 61)
    c = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(old.forward(x, None), 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3))))
    with pytest.raises(ValueError, match="GELU approximate = 'erf': expected one of none, tanh"):
        GELU(approximate="erf")


def test_an_old_gelu_checkpoint_resumes_as_gelu_tanh_only():
    def arch(activation):
        return architecture(mlp_layers([4, 8, 3], activation), 4, "float32")

    saved = arch("gelu_tanh")
    saved["layers"][1] = {"type": "GELU"}  # as the checkpoint of an older hpcnn holds it
    assert architecture_difference(saved, arch("gelu_tanh")) is None
    assert architecture_difference(saved, arch("gelu")) == (
        "layer 1 is GELU(approximate=tanh) in the checkpoint, GELU(approximate=none) in this run"
    )


def test_activation_names():
    assert [repr(layer) for layer in mlp_layers([2, 3, 1], "gelu")][1] == "GELU"
    assert [repr(layer) for layer in mlp_layers([2, 3, 1], "gelu_tanh")][1] == "GELU(approximate='tanh')"
