"""Gradient buckets and their reduction during backward (serial part: a recording communicator)."""

import tracemalloc
from types import SimpleNamespace

import numpy as np

from hpcnn.config import Config
from hpcnn.core.conv import Conv2D, GlobalAvgPool, MaxPool2D
from hpcnn.core.layers import Dense, ReLU
from hpcnn.core.losses import SoftmaxCrossEntropy
from hpcnn.core.model import Sequential, mlp_layers
from hpcnn.io.datasets import arrays
from hpcnn.parallel import data_parallel
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.data_parallel import DataParallel, buckets
from hpcnn.parallel.inspector import Inspector
from hpcnn.parallel.preempt import StopRequest
from hpcnn.training.engine import Training
from hpcnn.training.setup import Parts


def test_buckets_are_whole_layers_covering_the_buffer_in_backward_order():
    model = Sequential(mlp_layers([30, 20, 20, 10, 5], "relu"), np.float32)
    sizes = {0: 30 * 20 + 20, 2: 20 * 20 + 20, 4: 20 * 10 + 10, 6: 10 * 5 + 5}
    got = buckets(model.params.slots, 500 * 4, 4)
    # backward order: layer 6 (55), 4 (210), 2 (420) -> 685 >= 500; then layer 0 (620)
    assert [(sorted(m), stop - start) for start, stop, m in got] == [
        ([2, 4, 6], sizes[6] + sizes[4] + sizes[2]),
        ([0], sizes[0]),
    ]
    assert got[0][0] == 0 and got[-1][1] == model.params.size
    assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
    one = buckets(model.params.slots, 10**9, 4)
    assert [(start, stop) for start, stop, _ in one] == [(0, model.params.size)]


class Recorder:
    """A 2-rank communicator stand-in that records when reductions start and what they cover;
    ``Requests`` stands in for ``Request`` and records the waits."""

    size = 2

    def __init__(self, events):
        self.events = events

    def Iallreduce(self, sendbuf, buf, op):
        self.events.append(("reduce", len(buf)))
        return SimpleNamespace()

    def Allreduce(self, sendbuf, buf, op):
        self.events.append(("allreduce", len(buf)))

    def Requests(self):
        events = self.events

        class Requests:
            @staticmethod
            def Testall(requests):
                return False

            @staticmethod
            def Waitall(requests):
                events.append(("wait", len(requests)))

        return Requests


class Tracing:
    """Wrap a layer to record when its backward runs."""

    def __init__(self, layer, name, events):
        self.layer, self.name, self.events = layer, name, events

    def __getattr__(self, attr):
        return getattr(self.layer, attr)

    def backward(self, *args, **kwargs):
        self.events.append(("backward", self.name))
        return self.layer.backward(*args, **kwargs)


def test_each_bucket_starts_as_soon_as_backward_completes_it(monkeypatch):
    events = []
    monkeypatch.setattr(data_parallel, "Request", Recorder(events).Requests())
    layers = [Tracing(layer, i, events) for i, layer in enumerate(mlp_layers([30, 20, 20, 10, 5], "relu"))]
    model = Sequential(layers, np.float32)
    model.params.initialize(np.random.default_rng(0))
    dp = DataParallel(Recorder(events), model.params, overlap=True, bucket_mb=500 * 4 / 2**20)
    loss = SoftmaxCrossEntropy()
    x, y = np.ones((6, 30), np.float32), np.arange(6) % 5
    loss.forward(model.forward(x), y)
    model.backward(loss.backward(1 / 6), on_layer_done=dp.on_layer_done)
    dp.reduce(6)
    first, second = (stop - start for start, stop, _ in dp.buckets)
    assert events == [
        *[("backward", i) for i in (6, 5, 4, 3, 2)],
        ("reduce", first),  # layers 6, 4, 2 done: started before layers 1 and 0 run backward
        ("backward", 1),
        ("backward", 0),
        ("reduce", second),
        ("wait", 2),
    ]
    events.clear()
    blocking = DataParallel(Recorder(events), model.params, overlap=False)
    assert blocking.on_layer_done is None
    blocking.reduce(6)
    assert events == [("allreduce", model.params.size)]


def steady_step_peak(cfg, parts=None) -> int:
    """The bytes a training step allocates at its peak after two warm-up steps."""
    comm = Comm.serial()
    inspector = Inspector(comm, 0)
    training = Training(cfg, comm, lambda *a: None, inspector, parts=parts)
    batches = list(training.sampler.epoch(0))
    sums = np.zeros(3)
    with StopRequest(comm, ()) as training.stop:
        for ids, rows in batches[:2]:
            training._step(ids, rows, sums)
        tracemalloc.start()
        training._step(*batches[2], sums)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    inspector.close()
    training.grid.free()
    return peak


def test_a_training_step_allocates_no_activation_sized_array():
    """After the first steps, a step (read, forward, loss, backward, reduction, optimizer) allocates
    less than one activation array: everything comes from the workspace and preallocated state.
    (numpy's ufuncs may take a fixed iteration buffer of ``np.getbufsize()`` elements, 32 KiB.)"""
    cfg = Config(
        data="synthetic", synthetic_features=256, synthetic_rows=1024, hidden=[512, 512], batch_size=256,
        micro_batches=2, optimizer="adam", eval_every=0,
    )  # fmt: skip
    peak = steady_step_peak(cfg)
    smallest_activation = 128 * 256 * 4  # a micro-batch of 128 rows x the input width, float32
    assert peak < smallest_activation, f"a step allocated {peak} bytes"


def test_a_conv_net_training_step_allocates_no_activation_sized_array():
    """The same for a convolutional network: im2col columns, padded images, pooling masks and input
    gradients all come from the workspace."""
    rng = np.random.default_rng(0)
    ds = arrays(rng.normal(size=(512, 16 * 16 * 2)).astype(np.float32), rng.integers(0, 4, 512))
    ds.shape = (16, 16, 2)
    layers = [
        Conv2D(2, 8, 3, padding=1), ReLU(), MaxPool2D(2), Conv2D(8, 8, 3, stride=2), ReLU(), MaxPool2D(2, 1),
        Conv2D(8, 16, 1), GlobalAvgPool(), Dense(16, 4),
    ]  # fmt: skip
    cfg = Config(batch_size=128, micro_batches=2, optimizer="adam", eval_every=0)
    peak = steady_step_peak(cfg, Parts(layers=layers, data=ds))
    smallest_activation = 64 * 16 * 16 * 2 * 4  # a micro-batch's input, float32
    assert peak < smallest_activation, f"a step allocated {peak} bytes"
