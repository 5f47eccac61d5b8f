"""Optimizers, schedules and clipping against values computed by hand."""

import math
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from hpcnn.config import Config
from hpcnn.core import optim
from hpcnn.core.optim import SGD, Adam, AdamW, Schedule, clip_grad_norm, make_optimizer


def flat(p, g):
    return SimpleNamespace(data=np.array(p, dtype=np.float64), grad=np.array(g, dtype=np.float64))


def test_sgd_plain():
    ps = flat([1.0, 2.0], [0.5, -1.0])
    SGD().bind(ps).step(0.1)
    assert ps.data.tolist() == pytest.approx([0.95, 2.1], abs=1e-15)


def test_sgd_momentum_two_steps():
    ps = flat([1.0], [0.5])
    opt = SGD(momentum=0.9).bind(ps)
    opt.step(0.1)  # v = 0.5, p = 1 - 0.05
    assert ps.data[0] == pytest.approx(0.95, abs=1e-15)
    ps.grad[:] = 0.5
    opt.step(0.1)  # v = 0.9 * 0.5 + 0.5 = 0.95, p = 0.95 - 0.095
    assert ps.data[0] == pytest.approx(0.855, abs=1e-15)
    assert opt.state["velocity"][0] == pytest.approx(0.95, abs=1e-15)


def test_sgd_nesterov_two_steps():
    ps = flat([1.0], [0.5])
    opt = SGD(momentum=0.9, nesterov=True).bind(ps)
    opt.step(0.1)  # v = 0.5, step with g + 0.9 v = 0.95 -> p = 0.905
    assert ps.data[0] == pytest.approx(0.905, abs=1e-15)
    ps.grad[:] = 0.5
    opt.step(0.1)  # v = 0.95, step with 0.5 + 0.855 = 1.355 -> p = 0.905 - 0.1355
    assert ps.data[0] == pytest.approx(0.7695, abs=1e-15)


def test_sgd_weight_decay():
    ps = flat([2.0], [0.5])
    SGD(weight_decay=0.1).bind(ps).step(0.1)  # g = 0.5 + 0.2 = 0.7 -> p = 2 - 0.07
    assert ps.data[0] == pytest.approx(1.93, abs=1e-15)


def test_sgd_keeps_velocity_only_with_momentum():
    assert SGD().state_names() == [] and SGD(momentum=0.5).state_names() == ["velocity"]
    ps = flat([1.0, 2.0], [0.5, -1.0])
    assert SGD().bind(ps).state == {}
    assert list(SGD(0.9).bind(ps).state) == ["velocity"]


def test_adam_first_step_is_lr_times_sign():
    ps = flat([1.0, -1.0], [0.3, -2.0])
    Adam(eps=0.0).bind(ps).step(0.01)  # bias-corrected m / sqrt(v) = g / |g|
    assert ps.data.tolist() == pytest.approx([0.99, -0.99], abs=1e-15)


def test_adam_several_steps_against_the_formula():
    grads = [0.5, -0.2, 0.1]
    ps = flat([1.0], [0.0])
    opt = Adam(beta1=0.9, beta2=0.99, eps=1e-8).bind(ps)
    p, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        ps.grad[:] = g
        opt.step(0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        p -= 0.1 * (m / (1 - 0.9**t)) / (math.sqrt(v / (1 - 0.99**t)) + 1e-8)
        assert ps.data[0] == pytest.approx(p, rel=1e-14)
    # step 2 by hand: m = 0.9*0.05 - 0.02 = 0.025, v = 0.99*0.0025 + 0.0004 = 0.002875
    # mhat = 0.025 / 0.19, vhat = 0.002875 / 0.0199


def test_adam_l2_versus_adamw_decoupled():
    l2 = flat([2.0], [0.5])
    Adam(eps=0.0, weight_decay=0.1).bind(l2).step(0.01)  # g = 0.7, first step moves by lr
    assert l2.data[0] == pytest.approx(1.99, abs=1e-15)
    w = flat([2.0], [0.5])
    AdamW(eps=0.0, weight_decay=0.1).bind(w).step(0.01)  # 2 * (1 - 0.001) - 0.01
    assert w.data[0] == pytest.approx(1.988, abs=1e-15)
    neg = flat([2.0], [-0.1])
    Adam(eps=0.0, weight_decay=0.1).bind(neg).step(0.01)  # g = -0.1 + 0.2 = 0.1 > 0: moves down
    assert neg.data[0] == pytest.approx(1.99, abs=1e-15)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(momentum=0.9, nesterov=True, weight_decay=0.1).bind(ps),
        lambda ps: SGD(weight_decay=0.1).bind(ps),
        lambda ps: Adam(weight_decay=0.1).bind(ps),
        lambda ps: AdamW(weight_decay=0.1).bind(ps),
    ],
)
def test_optimizers_update_in_place_without_parameter_sized_temporaries(make):
    n = 250_000  # 2 MB per float64 buffer: any temporary of that size shows in the peak
    ps = flat(np.ones(n), np.full(n, 0.1))
    opt = make(ps)
    buffers = lambda: [ps.data, ps.grad, opt.scratch, *opt.state.values()]  # noqa: E731
    before = [id(b) for b in buffers()]
    opt.step(0.1)  # the first step may create nothing either, but warm up numpy's caches
    tracemalloc.start()
    opt.step(0.1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [id(b) for b in buffers()] == before, "a buffer was replaced instead of updated in place"
    assert peak < n * 8 / 4, f"step allocated {peak} bytes"


def test_schedules():
    const = Schedule("constant", 0.1, 100)
    assert [const(s) for s in (0, 50, 99)] == [0.1, 0.1, 0.1]
    step = Schedule("step", 1.0, 100, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = Schedule("cosine", 1.0, 110, warmup_steps=10, min_lr=0.1)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55)  # halfway: min + (max - min) / 2
    assert cos(110) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Schedule("linear", 1.0, 10)


def test_clip_grad_norm():
    g = np.array([3.0, 4.0])
    assert clip_grad_norm(g, 1.0) == 5.0
    assert g == pytest.approx([0.6, 0.8], rel=1e-6)
    small = np.array([0.3, 0.4])
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    assert small.tolist() == [0.3, 0.4]
    # the norm over parts held elsewhere (pipeline stages) is added by sum_across
    part = np.array([3.0])
    assert clip_grad_norm(part, 2.5, sum_across=lambda sq: sq + 16.0) == 5.0
    assert part[0] == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize(
    "make", [lambda p: SGD(0.9, nesterov=True, weight_decay=0.01).bind(p), lambda p: Adam().bind(p)]
)
def test_blocked_update_equals_the_whole_buffer_update(make, monkeypatch):
    """The block-by-block passes give bitwise the update of whole-buffer passes (blocks of 7
    elements, a ragged last block, against one block holding everything)."""
    rng = np.random.default_rng(1)
    data, grad = rng.normal(size=(2, 100))
    results = []
    for block_bytes in (7 * 8, 10**6):
        monkeypatch.setattr(optim, "BLOCK_BYTES", block_bytes)
        ps = flat(data.copy(), grad.copy())
        opt = make(ps)
        for lr in (0.1, 0.05, 0.02):
            ps.grad[:] = grad
            opt.step(lr)
        results.append(ps.data.copy())
    assert np.array_equal(results[0], results[1])


def test_optimizers_are_unbound_until_bind_which_allocates_fresh_state():
    opt = Adam()
    assert opt.params is None and opt.state == {} and opt.t == 0
    with pytest.raises(RuntimeError, match=r"Adam\(.*\) is not bound to parameters: call bind"):
        opt.step(0.1)
    ps = flat([1.0, 2.0], [0.5, -1.0])
    assert opt.bind(ps) is opt and opt.params is ps
    assert sorted(opt.state) == ["m", "v"] and all(b.shape == ps.data.shape for b in opt.state.values())
    opt.step(0.1)
    assert opt.t == 1 and opt.state["m"].any()
    other = flat([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    opt.bind(other)  # binding again starts afresh
    assert opt.t == 0 and opt.state["m"].shape == (3,) and not opt.state["m"].any()


def test_names_and_repr():
    assert [SGD().name, Adam().name, AdamW().name] == ["sgd", "adam", "adamw"]
    assert repr(SGD(0.9, nesterov=True)) == "SGD(momentum=0.9, nesterov=True, weight_decay=0.0)"
    assert repr(AdamW(weight_decay=0.01)) == "AdamW(beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0.01)"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: SGD(momentum=-0.1), "momentum = -0.1: must be a number >= 0"),
        (lambda: SGD(nesterov=True), "nesterov needs momentum > 0"),
        (lambda: SGD(weight_decay=-1), "weight_decay = -1: must be"),
        (lambda: Adam(beta1=1.0), r"beta1 = 1.0: must be a number in \[0, 1\)"),
        (lambda: AdamW(eps="small"), "eps = 'small': must be a number"),
        (lambda: SGD(flat([1.0], [1.0])), "momentum = namespace"),  # the params belong in bind()
    ],
)
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "fields,kind,names",
    [
        (dict(optimizer="sgd"), SGD, []),  # plain SGD unless momentum is given, as in PyTorch
        (dict(optimizer="sgd", momentum=0.9, nesterov=True), SGD, ["velocity"]),
        (dict(optimizer="adam", beta2=0.99), Adam, ["m", "v"]),
        (dict(optimizer="adamw", weight_decay=0.01), AdamW, ["m", "v"]),
    ],
)
def test_make_optimizer_returns_an_unbound_optimizer_with_the_config_fields(fields, kind, names):
    cfg = Config(**fields)
    opt = make_optimizer(cfg)
    assert type(opt) is kind and opt.params is None and opt.state_names() == names
    chosen = opt.config_fields()
    assert chosen["optimizer"] == cfg.optimizer
    assert all(getattr(cfg, key) == value for key, value in chosen.items())
