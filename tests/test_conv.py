"""Convolution and pooling layers: finite differences, direct loop implementations, every backward mode."""

import json
import math

import numpy as np
import pytest

from hpcnn.core.conv import AvgPool2D, Conv2D, Flatten, GlobalAvgPool, MaxPool2D
from hpcnn.core.layers import Dense, ReLU, layer_from_spec
from hpcnn.core.model import Key, Sequential
from hpcnn.parallel.deterministic import Sharding, Workers
from hpcnn.testing import check_gradients

CONVS = [  # (Conv2D arguments, input row shape)
    ((2, 3, 3), (5, 6, 2)),
    ((2, 3, 3, 1, 1), (5, 6, 2)),  # "same" padding: the transposed-convolution input gradient
    ((2, 3, (3, 5), 1, (1, 2)), (6, 7, 2)),  # non-square, "same"
    ((2, 3, (2, 3), 2, 1), (7, 6, 2)),  # stride 2: col2im
    ((1, 2, 1), (4, 4, 1)),  # 1x1
    ((2, 4, 1, 2), (5, 5, 2)),  # 1x1, stride 2 (pixels skipped)
    ((3, 2, 3, (1, 2), (2, 0)), (5, 7, 3)),  # padding larger than "same"
    ((2, 2, 4, 3, 3), (5, 5, 2)),  # stride 3, kernel 4, padding 3
    ((1, 3, 5), (5, 5, 1)),  # kernel as large as the image: one output pixel
    ((1, 3, (3, 2), 2, 1), (7, 6, 1)),  # one channel (blocked columns), strided and padded
    ((1, 2, 5), (9, 10, 1)),  # one channel, blocks of 3 pixels: three pieces per field row in col2im
    ((1, 2, 3), (4, 4, 1)),  # one channel, blocks of 2 pixels
    ((1, 2, (3, 2), (1, 3), (1, 0)), (5, 12, 1)),  # one channel, stride wider than the kernel
    ((1, 2, 3, 1, 1), (5, 7, 1)),  # one channel, prime output width: columns by kernel offset
    ((2, 3, 3), (5, 7, 2)),  # short field rows, prime output width: col2im
    ((8, 3, 4, 2), (7, 7, 8)),  # field rows of 32 values: col2im
]


@pytest.mark.parametrize("args, shape", CONVS)
@pytest.mark.parametrize("rows", [1, 3])
def test_conv_gradients_match_finite_differences(args, shape, rows):
    assert check_gradients(Conv2D(*args), shape, rows=rows) < 1e-6


def test_conv_without_bias():
    layer = Conv2D(2, 3, 3, padding=1, bias=False)
    assert [s.name for s in layer.param_specs()] == ["W"]
    assert check_gradients(layer, (4, 5, 2)) < 1e-6


@pytest.mark.parametrize(
    "layer",
    [
        MaxPool2D(2),
        MaxPool2D(3, 2),
        MaxPool2D((2, 3), (1, 2)),
        MaxPool2D(2, 3),
        AvgPool2D(2),
        AvgPool2D(3, 1),
        AvgPool2D((1, 2)),
        GlobalAvgPool(),
        Flatten(),
    ],
    ids=repr,
)
@pytest.mark.parametrize("shape", [(5, 7, 2), (4, 6, 3)])
def test_pooling_gradients_match_finite_differences(layer, shape):
    assert check_gradients(layer, shape, rows=2) < 1e-6


def direct_conv(x, W, b, stride, padding):
    """The convolution by its definition, one output value at a time."""
    (sh, sw), (ph, pw) = stride, padding
    n, h, w, _ = x.shape
    kh, kw, _, cout = W.shape
    xp = np.zeros((n, h + 2 * ph, w + 2 * pw, x.shape[3]))
    xp[:, ph : ph + h, pw : pw + w] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, ho, wo, cout))
    for r in range(n):
        for i in range(ho):
            for j in range(wo):
                for o in range(cout):
                    field = xp[r, i * sh : i * sh + kh, j * sw : j * sw + kw, :]
                    y[r, i, j, o] = np.sum(field * W[:, :, :, o]) + b[o]
    return y


def conv_layer(args, dtype=np.float64, seed=0):
    layer = Conv2D(*args)
    model = Sequential([layer], dtype)
    model.params.data[:] = np.random.default_rng(seed).normal(size=model.params.size)
    return layer, model


@pytest.mark.parametrize("args, shape", CONVS)
def test_conv_forward_equals_the_direct_loop(args, shape):
    layer, model = conv_layer(args)
    x = np.random.default_rng(1).normal(size=(2, *shape))
    W = model.params.view(model.params.data, model.params.slots[0])
    b = model.params.view(model.params.data, model.params.slots[1])
    want = direct_conv(x, W, b, layer._s, layer._p)
    got = layer.forward(x, None)
    assert got.shape == (2, *layer.out_shape(shape))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_max_pool_equals_the_direct_loop_and_routes_ties_to_the_first_maximum():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 7, 6, 3))
    layer = MaxPool2D(3, 2)
    y = layer.forward(x, None)
    want = np.array([[[[x[r, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, c].max() for c in range(3)]
                       for j in range(2)] for i in range(3)] for r in range(2)])  # fmt: skip
    np.testing.assert_array_equal(y, want)
    tied = np.zeros((1, 2, 2, 1))  # one window, every value its maximum: the first takes the gradient
    saved = {}
    MaxPool2D(2).forward(tied, saved)
    dx = MaxPool2D(2).backward(np.full((1, 1, 1, 1), 5.0), saved)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])
    tied = np.array([[[1.0, 3.0], [3.0, 3.0]]])[..., None]  # ties after the first value
    saved = {}
    MaxPool2D(2).forward(tied, saved)
    dx = MaxPool2D(2).backward(np.ones((1, 1, 1, 1)), saved)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_float32_forward_is_close_to_float64():
    layers = [Conv2D(3, 8, 3, padding=1), ReLU(), MaxPool2D(2), Conv2D(8, 4, 3, 2), GlobalAvgPool()]
    x = np.random.default_rng(3).normal(size=(4, 10, 10, 3))
    out = {}
    for dtype in (np.float32, np.float64):
        model = Sequential(layers, dtype)
        model.params.initialize(np.random.default_rng(0))
        out[dtype] = model.forward(x.astype(dtype), train=False).astype(np.float64)
    np.testing.assert_allclose(out[np.float32], out[np.float64], rtol=1e-4, atol=1e-5)


def small_net():
    # "same" padding (the input gradient as a transposed convolution), then stride 2 with padding (col2im)
    return [
        Conv2D(1, 4, 3, padding=1),
        ReLU(),
        MaxPool2D(2),
        Conv2D(4, 6, 3, 2, 1),
        ReLU(),
        Flatten(),
        Dense(24, 5),
    ]


def test_a_sequential_conv_net_takes_flat_rows():
    rng = np.random.default_rng(4)
    model = Sequential(small_net(), np.float64, in_shape=(8, 8, 1))
    assert model.out_shape == (5,)
    assert Sequential.shapes(model.layers, (8, 8, 1)) == [
        (8, 8, 1), (8, 8, 4), (8, 8, 4), (4, 4, 4), (2, 2, 6), (2, 2, 6), (24,), (5,)
    ]  # fmt: skip
    model.params.initialize(rng)
    flat = rng.normal(size=(3, 64))
    out = model.forward(flat).copy()
    dx = model.backward(rng.normal(size=(3, 5)), need_input_grad=True)
    assert dx.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(model.forward(flat.reshape(3, 8, 8, 1), train=False), out)
    assert check_gradients(small_net(), (8, 8, 1), rows=2) < 1e-6


def trained_net(seed=0):
    model = Sequential(small_net(), np.float64, in_shape=(8, 8, 1))
    model.params.initialize(np.random.default_rng(seed))
    return model


def test_accumulate_adds_the_second_micro_batch():
    rng = np.random.default_rng(5)
    x1, x2, d1, d2 = (
        rng.normal(size=(3, 64)),
        rng.normal(size=(2, 64)),
        rng.normal(size=(3, 5)),
        rng.normal(size=(2, 5)),
    )
    model = trained_net()
    model.forward(x1)
    model.backward(d1)
    g1 = model.params.grad.copy()
    model.forward(x2)
    model.backward(d2)
    g2 = model.params.grad.copy()
    t1, t2 = [{} for _ in model.layers], [{} for _ in model.layers]
    model.forward(x1, tape=t1, slot=0)
    model.forward(x2, tape=t2, slot=1)
    model.backward(d1, tape=t1, slot=0)
    model.backward(d2, tape=t2, slot=1, accumulate=True)
    np.testing.assert_allclose(model.params.grad, g1 + g2, rtol=1e-12, atol=1e-14)


def test_deferred_weight_gradients_equal_the_plain_backward():
    rng = np.random.default_rng(6)
    x, d = rng.normal(size=(5, 64)), rng.normal(size=(5, 5))
    model = trained_net()
    model.forward(x)
    want_dx = model.backward(d, need_input_grad=True).copy()
    want = model.params.grad.copy()
    model.params.grad[:] = np.nan  # every value must be written again
    dxs = []
    for m, (a, b) in enumerate([(0, 2), (2, 5)]):  # two micro-batches of a 5-row step
        tape = [{"defer": (a, 5, model.stack(i))} for i in range(len(model.layers))]
        model.forward(x[a:b], tape=tape, slot=m)
        dxs.append(model.backward(d[a:b], need_input_grad=True, tape=tape, slot=m).copy())
    model.weight_grads(5)
    np.testing.assert_allclose(model.params.grad, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.concatenate(dxs), want_dx, rtol=1e-12, atol=1e-14)
    conv = model.layers[0]
    assert conv.deferred_width((8, 8, 1)) == 64 + 64 * 4 + 64 * 9


def sharded(model, rows, shards):
    grads = np.zeros((shards, model.params.size))
    model.shard(Sharding(rows, Workers(1)), grads)
    return grads


def test_shards_sum_to_the_gradient_and_a_shard_does_not_depend_on_the_others():
    rng = np.random.default_rng(7)
    a, b, c = (rng.normal(size=(2, 64)) for _ in range(3))
    d = rng.normal(size=(4, 5))
    plain = trained_net()
    plain.forward(np.concatenate([a, b]))
    want_dx = plain.backward(d, need_input_grad=True).copy()
    model = trained_net()
    grads = sharded(model, 2, 2)
    out_ab = model.forward(np.concatenate([a, b])).copy()
    dx_ab = model.backward(d, need_input_grad=True).copy()
    np.testing.assert_allclose(grads.sum(axis=0), plain.params.grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx_ab, want_dx, rtol=1e-12, atol=1e-14)
    grads_ab = grads.copy()
    out_ca = model.forward(np.concatenate([c, a])).copy()  # shard a second, beside other rows
    dx_ca = model.backward(np.concatenate([d[2:], d[:2]]), need_input_grad=True).copy()
    np.testing.assert_array_equal(out_ca[2:], out_ab[:2])
    np.testing.assert_array_equal(dx_ca[2:], dx_ab[:2])
    np.testing.assert_array_equal(grads[1], grads_ab[0])
    model.shard(None)


@pytest.mark.parametrize(
    "layer",
    [
        Conv2D(3, 8, 3),
        Conv2D(3, 8, [3, 5], stride=(1, 2), padding=[1, 2], bias=False, init="xavier"),
        MaxPool2D(2),
        MaxPool2D((2, 3), stride=1),
        AvgPool2D(3, 2),
        GlobalAvgPool(),
        Flatten(),
    ],
    ids=repr,
)
def test_specs_round_trip(layer):
    spec = layer.spec()
    again = layer_from_spec(json.loads(json.dumps(spec)))  # as a checkpoint stores it
    assert type(again) is type(layer) and again.spec() == spec
    assert again.out_shape((9, 10, 3)) == layer.out_shape((9, 10, 3))


def test_shapes_flops_and_errors():
    conv = Conv2D(3, 8, 5, stride=2, padding=1)
    assert conv.out_shape((32, 30, 3)) == (15, 14, 8)
    assert conv.flops((32, 30, 3)) == 3 * 2 * 15 * 14 * 5 * 5 * 3 * 8
    assert conv.products((32, 30, 3)) == [(15 * 14, 5 * 5 * 3, 8)]
    assert conv.workspace_width((32, 30, 3)) >= 15 * 14 * 75
    with pytest.raises(ValueError, match="takes 3 channels, not 4"):
        conv.out_shape((32, 32, 4))
    with pytest.raises(ValueError, match="leaves no output pixel"):
        conv.out_shape((2, 2, 3))
    with pytest.raises(ValueError, match=r"image rows \(H, W, C\)"):
        conv.out_shape((12,))
    with pytest.raises(ValueError, match="leaves no output pixel"):
        MaxPool2D(3).out_shape((2, 5, 1))
    with pytest.raises(ValueError, match="must be positive"):
        Conv2D(3, 8, 0)
    assert GlobalAvgPool().out_shape((4, 5, 6)) == (6,)
    assert Flatten().out_shape((4, 5, 6)) == (120,)
    assert MaxPool2D(2).out_shape((7, 6, 3)) == (3, 3, 3)
    x = np.ones((2, 3, 4, 5))
    assert np.shares_memory(Flatten().forward(x, {}), x)  # a view


# -- the per-layer time split of docs/performance.md ----------------------------------------------------

NETS = {  # the benchmark networks of docs/performance.md (ReLU after every convolution and hidden Dense)
    "lenet": ((28, 28, 1), [(1, 6, 5, 1, 0), "pool", (6, 16, 5, 1, 0), "pool", 256, 120, 84, 10]),
    "cifar": ((32, 32, 3), [(3, 32, 3, 1, 1), (32, 32, 3, 1, 1), "pool", (32, 64, 3, 1, 1), (64, 64, 3, 1, 1),
                            "pool", 4096, 256, 10]),
}  # fmt: skip


def net_layers(name: str) -> tuple[tuple, list]:
    if name == "cifar-norm":  # the CIFAR-sized net with BatchNorm after every convolution, LayerNorm
        # and Dropout after its hidden Dense: the normalisation layers' share of a step
        from hpcnn import BatchNorm, Dropout, LayerNorm

        layers = []
        for item in ((3, 32), (32, 32), "pool", (32, 64), (64, 64), "pool"):
            if item == "pool":
                layers.append(MaxPool2D(2))
            else:
                layers += [Conv2D(*item, 3, padding=1), BatchNorm(item[1]), ReLU()]
        return (32, 32, 3), [*layers, Dense(4096, 256), LayerNorm(256), ReLU(), Dropout(0.5), Dense(256, 10)]
    shape, plan = NETS[name]
    layers, dense = [], [n for n in plan if isinstance(n, int)]
    for item in plan:
        if isinstance(item, tuple):
            layers += [Conv2D(*item), ReLU()]
        elif item == "pool":
            layers.append(MaxPool2D(2))
    for i, (a, b) in enumerate(zip(dense[:-1], dense[1:], strict=True)):
        layers += [Dense(a, b)] + ([ReLU()] if i < len(dense) - 2 else [])
    return shape, layers


def layer_split(name: str, batch: int = 256, steps: int = 10, dtype=np.float32) -> tuple[float, list]:
    """Seconds per training step (forward, softmax cross-entropy, backward, SGD with momentum) of
    network ``name`` and, per layer, ``(layer, forward s, backward s, im2col s, col2im s)``: the
    time in im2col copies (of ``x`` in forward, of ``dy`` for a transposed-convolution input
    gradient) and in col2im; the rest of a convolution's time is its products (and bias)."""
    import time

    import hpcnn.core.conv as conv
    from hpcnn.core.losses import SoftmaxCrossEntropy
    from hpcnn.core.optim import SGD

    shape, layers = net_layers(name)
    model = Sequential(layers, dtype, in_shape=shape)
    model.params.initialize(np.random.default_rng(0))
    opt, loss = SGD(momentum=0.9).bind(model.params), SoftmaxCrossEntropy()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(batch, int(np.prod(shape)))).astype(dtype), rng.integers(0, 10, batch)
    spent = np.zeros((len(layers), 4))
    where = [0, 2]  # (layer, column) the wrapped copies charge their time to

    def timed(fn, column):
        def run(*args, **kwargs):
            t = time.perf_counter()
            fn(*args, **kwargs)
            spent[where[0], column] += time.perf_counter() - t

        return run

    Conv = conv.Conv2D
    kept = conv._fields, Conv._offset_cols, Conv._col2im, Conv._offset_col2im, Conv._blocked_col2im
    conv._fields, Conv._offset_cols = timed(kept[0], 2), timed(kept[1], 2)
    Conv._col2im, Conv._offset_col2im, Conv._blocked_col2im = (timed(f, 3) for f in kept[2:])
    try:
        for step in range(steps + 2):  # two warm-up steps: the workspace is filled
            if step == 2:
                spent[:] = 0
                start = time.perf_counter()
            tape, h = [{} for _ in layers], x.reshape(batch, *shape)
            for i, layer in enumerate(layers):
                tape[i]["key"] = Key(0, step, i, 0, batch)  # (what Dropout's masks are drawn by)
                where[0], t = i, time.perf_counter()
                h = layer.forward(h, tape[i], model.workspace.scope(i, ("train", 0)))
                spent[i, 0] += time.perf_counter() - t
            loss.forward(h, y)
            d = loss.backward(1.0 / batch)
            for i in range(len(layers) - 1, -1, -1):
                where[0], t = i, time.perf_counter()
                d = layers[i].backward(d, tape[i], i > 0, False, model.workspace.scope(i, ("train", 0)))
                spent[i, 1] += time.perf_counter() - t
            opt.step(0.01)
        total = (time.perf_counter() - start) / steps
    finally:
        conv._fields, Conv._offset_cols, Conv._col2im, Conv._offset_col2im, Conv._blocked_col2im = kept
    return total, [(layer, *(spent[i] / steps)) for i, layer in enumerate(layers)]


def print_layer_split(name: str, batch: int = 256, steps: int = 10) -> None:
    """``layer_split`` as the table of docs/performance.md (milliseconds)."""
    total, rows = layer_split(name, batch, steps)
    print(f"{name}, batch {batch}: {total * 1e3:.1f} ms/step, {batch / total:.0f} samples/s")
    print("| layer | forward | backward | of which im2col | col2im |\n|---|---|---|---|---|")
    for layer, fwd, bwd, im2col, col2im in rows:
        print(
            f"| `{layer!r}` | {fwd * 1e3:.2f} | {bwd * 1e3:.2f} | {im2col * 1e3:.2f} | {col2im * 1e3:.2f} |"
        )


def test_the_layer_split_adds_up():
    total, rows = layer_split("lenet", batch=4, steps=1, dtype=np.float64)
    assert [repr(r[0]) for r in rows[:3]] == ["Conv2D(1, 6, 5)", "ReLU", "MaxPool2D(2)"]
    norm_total, norm_rows = layer_split("cifar-norm", batch=2, steps=1, dtype=np.float64)
    assert {type(r[0]).__name__ for r in norm_rows} >= {"BatchNorm", "LayerNorm", "Dropout"}
    assert sum(f + b for _, f, b, _, _ in norm_rows) <= norm_total
    assert sum(f + b for _, f, b, _, _ in rows) <= total
    assert all(i + c <= f + b for _, f, b, i, c in rows)
    assert rows[0][3] > 0 and rows[3][4] > 0  # im2col in the first convolution, col2im in the second


@pytest.mark.parametrize(
    "layer",
    [Conv2D(3, 4, 3, padding=1), Conv2D(3, 4, 3, stride=2), MaxPool2D(2), AvgPool2D(3, stride=1),
     GlobalAvgPool(), Flatten(), Dense(6 * 6 * 3, 5)],
    ids=repr,
)  # fmt: skip
def test_a_replica_with_no_rows_of_the_batch_passes_empty_arrays_through(layer):
    """Deterministic mode can leave a replica without rows of a batch: every layer then takes and
    gives arrays of 0 rows (no reshape of 0 rows with -1, whose size numpy cannot infer)."""
    model = Sequential([layer], np.float64, in_shape=(6, 6, 3))
    model.params.initialize(np.random.default_rng(0))
    y = model.forward(np.zeros((0, 6 * 6 * 3)))
    assert y.shape == (0, *model.out_shape)
    dx = model.backward(np.zeros((0, math.prod(model.out_shape))), need_input_grad=True)
    assert dx.shape == (0, 6, 6, 3) and not model.params.grad.any()


def test_a_one_channel_conv_step_allocates_no_activation_sized_array():
    """The blocked columns, their kernel, the padded input gradient: all reused from step to step."""
    import tracemalloc

    model = Sequential(
        [Conv2D(1, 6, 5, padding=2), ReLU(), MaxPool2D(2), Flatten(), Dense(6 * 14 * 14, 10)],
        np.float32,
        in_shape=(28, 28, 1),
    )
    model.params.initialize(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x, d = rng.normal(size=(64, 784)).astype(np.float32), rng.normal(size=(64, 10)).astype(np.float32)
    assert model.layers[0]._block((28, 28, 1)) == 4  # the blocked path, with padding
    for _ in range(2):
        model.forward(x)
        model.backward(d, need_input_grad=True)
    tracemalloc.start()
    model.forward(x)
    model.backward(d, need_input_grad=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 784 * 4, f"a step allocated {peak} bytes"  # less than the input
