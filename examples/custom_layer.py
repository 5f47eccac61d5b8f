"""A layer of your own: root-mean-square normalisation with a learned gain, in every mode hpcnn runs.

hpcnn ships Dense, activations, ``BatchNorm``, ``LayerNorm`` and ``Dropout``; ``RMSNorm`` below
(``y = g * x / sqrt(mean(x^2) + eps)`` over each row: ``LayerNorm`` without centring or bias) is a
layer it does not ship, written as a
user would: a subclass of ``hpcnn.Layer``. This script checks its gradients against finite
differences, then trains a model containing it data parallel, in a 2-stage pipeline (at an even
number of ranks), through a checkpoint and a resume, and in deterministic mode::

    python examples/custom_layer.py [CHECKPOINT_DIR]
    mpirun -n 2 python examples/custom_layer.py    # 2 pipeline stages; 4 ranks: 2 stages x 2 replicas

What a layer with parameters must do in each mode (``hpcnn/core/layers.py``'s ``Dense`` is the
reference); ``RMSNorm`` does all of it, so it is correct everywhere:

- plain step: ``backward`` writes its weight gradients into the views ``bind`` gave it;
- micro-batches (``micro_batches`` > 1): the second and later backwards of a step *add*
  (``accumulate=True``);
- pipeline stages with micro-batches: backward *defers* them (``saved["defer"]``): it copies what
  the weight gradients need into step-long stacks, and ``weight_grads`` forms them once over all the
  step's rows (``deferred_width``: the values kept per row);
- deterministic mode (``shard`` hands the layer its row shards and one gradient row per shard):
  one weight gradient per shard of rows, into its own row (hpcnn adds them in a fixed order);
  everything else is row by row here, so a row's output does not depend on which rows share its
  batch.

The checkpoint stores the layer as ``spec()``, ``{"type": "RMSNorm", "features": ..., "eps": ...}``
(read from the attributes named like ``__init__``'s arguments), and rebuilds it by class name: a
script that loads the checkpoint (``Trainer.load``, ``resume=``) must define or import ``RMSNorm``
first. (``python -m hpcnn.evaluate`` has no way to import it: it knows hpcnn's own layers only.)
"""

import hashlib
import shutil
import sys
import tempfile

import numpy as np

import hpcnn
from hpcnn import Adam, Dense, Layer, ReLU, Trainer
from hpcnn.core.backend import xp  # the array module hpcnn computes with
from hpcnn.core.params import ParamSpec
from hpcnn.core.workspace import FRESH
from hpcnn.testing import check_gradients


class RMSNorm(Layer):
    """``y = g * x / sqrt(mean(x^2) + eps)`` over each row's ``features`` values."""

    def __init__(self, features: int, eps: float = 1e-5):
        self.features, self.eps = features, eps
        self._part = None  # scratch for micro-batches after the first (accumulate)
        self.shards = self.shard_grads = None  # deterministic mode (``shard``)

    def param_specs(self):
        return [ParamSpec("g", (self.features,), "ones")]

    def shard(self, sharding, grads):
        self.shards, self.shard_grads = sharding, grads  # {name: (shards, *shape)}; None: inference

    def bind(self, params, grads):
        self.g, self.dg = params["g"], grads["g"]
        self._part = None

    def forward(self, x, saved, ws=FRESH):
        n, dt = len(x), x.dtype
        inv = xp.einsum("ij,ij->i", x, x, out=ws("inv", (n,), dt))  # 1 / rms, per row
        inv /= self.features
        inv += self.eps
        xp.sqrt(inv, out=inv)
        xp.divide(1, inv, out=inv)
        xhat = xp.multiply(x, inv[:, None], out=ws("xhat", x.shape, dt))
        y = xp.multiply(xhat, self.g, out=ws("y", x.shape, dt))
        if saved is not None:
            saved["xhat"], saved["inv"] = xhat, inv
        return y

    def backward(self, dy, saved, need_dx=True, accumulate=False, ws=FRESH):
        xhat, inv = saved.pop("xhat"), saved.pop("inv")
        self._weight_grads(dy, xhat, saved, accumulate)
        if not need_dx:
            return None
        # dx = inv * (d - xhat * mean(d * xhat)), d = dy * g: the gradient through xhat
        n, dt = len(dy), dy.dtype
        d = xp.multiply(dy, self.g, out=ws("d", dy.shape, dt))
        m = xp.einsum("ij,ij->i", d, xhat, out=ws("m", (n,), dt))
        m /= self.features
        dx = xp.multiply(xhat, m[:, None], out=ws("dx", dy.shape, dt))
        xp.subtract(d, dx, out=dx)
        dx *= inv[:, None]
        return dx

    def _weight_grads(self, dy, xhat, saved, accumulate):
        """dg = sum over rows of dy * xhat: written, added, deferred or per shard."""
        if self.shards is not None:  # deterministic mode: each shard's sum into its own row
            first, sh = saved.get("shard", 0), self.shards
            dg = self.shard_grads["g"]

            def one(k):
                r = sh.rows_of(k, len(dy))
                xp.einsum("ij,ij->j", dy[r], xhat[r], out=dg[first + k])

            sh.workers.run(one, sh.blocks(len(dy)))
        elif "defer" in saved:  # a pipeline stage: keep this micro-batch's rows for weight_grads
            first, rows, stack = saved["defer"]
            stack("xhat", (rows, self.features), xhat.dtype)[first : first + len(dy)] = xhat
            stack("dy", (rows, self.features), dy.dtype)[first : first + len(dy)] = dy
        elif accumulate:
            if self._part is None:
                self._part = xp.empty_like(self.dg)
            self.dg += xp.einsum("ij,ij->j", dy, xhat, out=self._part)
        else:
            xp.einsum("ij,ij->j", dy, xhat, out=self.dg)

    def weight_grads(self, stack, rows):
        xhat = stack("xhat", (rows, self.features), self.dg.dtype)
        dy = stack("dy", (rows, self.features), self.dg.dtype)
        xp.einsum("ij,ij->j", dy, xhat, out=self.dg)

    def deferred_width(self, in_shape):
        return 2 * self.features

    def out_shape(self, in_shape):
        if in_shape != (self.features,):
            raise ValueError(f"RMSNorm({self.features}) takes rows of {self.features} values, not {in_shape}")
        return in_shape

    def flops(self, in_shape):
        return 14.0 * self.features  # a few elementwise passes and row sums, forward and backward


def make_data(rows=768, test_rows=256, features=16, classes=4, seed=0):
    """Labels from a random linear teacher, on features of very different scales (what RMSNorm
    evens out)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows + test_rows, features)) * rng.uniform(0.1, 10.0, features)
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=1).astype(np.int32)
    return x[:rows], y[:rows], x[rows:], y[rows:]


def make_model(features=16, hidden=32, classes=4):
    return [Dense(features, hidden), RMSNorm(hidden), ReLU(), Dense(hidden, classes)]


def fingerprint(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def main(directory=None):
    comm = hpcnn.Comm.world()

    # 1. The backward is the derivative of the forward (float64 finite differences; raises if not).
    error = max(check_gradients(RMSNorm(6), 6), check_gradients(make_model(5, 6, 3), 5))
    comm.print0(f"gradient check: largest relative error {error:.1e} (rtol 1e-6): passed")

    x, y, x_test, y_test = make_data()
    data = hpcnn.arrays(x, y, x_test, y_test)
    common = dict(loss="cross_entropy", batch_size=64, eval_every=0, log=None, comm=comm)

    # 2. Data parallel over every rank.
    result = Trainer(make_model(), data, optimizer=Adam(), lr=1e-2, epochs=4, **common).fit()
    comm.print0(f"data parallel on {comm.size} rank(s): held-out accuracy {result.final['accuracy']:.3f}")

    # 3. Two pipeline stages (when the ranks pair up), 2 micro-batches a step, 24 steps. A second run
    # stops after step 9 (its on_step callback says so; like a preemption, it leaves a checkpoint) and
    # a third resumes it: the resumed run ends with the same bits as the uninterrupted one.
    stages = 2 if comm.size % 2 == 0 else 1
    # (the optimizer by name: each trainer makes its own; an optimizer object is bound to one model)
    layout = dict(
        pipeline_stages=stages, micro_batches=2, optimizer="adam", lr=1e-2, epochs=2, log_every=1, **common
    )
    whole = Trainer(make_model(), data, **layout)
    whole.fit()
    made_here = directory is None
    if made_here:
        directory = comm.bcast(tempfile.mkdtemp(prefix="hpcnn-custom-layer-") if comm.is_root else None)
    try:
        stopped = Trainer(
            make_model(), data, checkpoint_dir=directory, on_step=lambda r: r["step"] == 9, **layout
        )
        stopped.fit()
        resumed = Trainer(make_model(), data, checkpoint_dir=directory, resume="auto", **layout)
        resumed.fit()
    finally:
        comm.Barrier()
        if made_here and comm.is_root:
            shutil.rmtree(directory, ignore_errors=True)
    same = comm.min(int(np.array_equal(whole.model.params.data, resumed.model.params.data)))
    comm.print0(
        f"pipeline of {stages} stage(s) x {comm.size // stages} replica(s): stopped at step "
        f"{stopped.result.steps}, resumed to step {resumed.result.steps}: parameters "
        f"{'bitwise equal to' if same else 'DIFFER from'} the uninterrupted run's (step {whole.result.steps})"
    )

    # 4. Deterministic mode: the same bits on any number of ranks and any layout.
    det = Trainer(make_model(), data, deterministic=True, shard_rows=16, **layout)
    det.fit()
    out = det.predict(x_test)
    comm.print0(f"deterministic: held-out outputs sha256 {fingerprint(out)} (the same on any layout)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
