"""Losses: per-row sums forward, gradients scaled by the caller.

``forward`` returns the *sum* of per-row losses over the rows given, and ``backward(scale)``
returns the gradient of ``scale * sum``. Data-parallel training passes ``scale = 1 / global_rows``
so that each rank's local gradient, summed across ranks by one Allreduce, is exactly the mean over
the global batch however unevenly the rows were split. Arrays come from ``ws`` (a workspace scope,
one per micro-batch in flight), so a step allocates only batch-length vectors here.
"""

from hpcnn.core.backend import xp
from hpcnn.core.workspace import FRESH


class SoftmaxCrossEntropy:
    """Softmax and cross-entropy fused: stable log-sum-exp forward, ``softmax - onehot`` backward.

    Targets are integer class labels of shape (batch,).
    """

    def forward(self, logits, labels, ws=FRESH) -> float:
        rows, dt = len(logits), logits.dtype
        top = xp.max(logits, axis=1, keepdims=True, out=ws("top", (rows, 1), dt))
        exp = xp.subtract(logits, top, out=ws("probs", logits.shape, dt))  # (batch, classes), max is 0
        picked = exp[xp.arange(rows), labels]  # (batch,) shifted logit of the label
        xp.exp(exp, out=exp)
        sumexp = xp.sum(exp, axis=1, keepdims=True, out=ws("sumexp", (rows, 1), dt))  # (batch, 1)
        loss = xp.log(sumexp[:, 0]) - picked  # (batch,)
        exp /= sumexp  # softmax, kept for backward
        self.probs, self.labels, self.rows = exp, labels, loss
        return float(loss.sum(dtype=xp.float64))

    def shard_sums(self, shard_rows: int) -> list[float]:
        """The last forward's loss summed over each block of ``shard_rows`` rows (a sum's result
        depends on its length: summing per shard keeps it independent of the micro-batch)."""
        return _block_sums(self.rows, shard_rows)

    def backward(self, scale: float):
        d = self.probs
        d[xp.arange(len(self.labels)), self.labels] -= 1
        d *= scale
        self.probs = self.labels = None
        return d


class MeanSquaredError:
    """Per-row mean over outputs of ``(out - target)**2``.

    Integer labels of shape (batch,) are compared as one-hot vectors, or, with one output, as the
    value itself (labels 0 and 1: a 2-class problem with one output unit, like the textbook XOR
    network); float targets of shape (batch, outputs) are used as they are (regression).
    """

    def forward(self, out, target, ws=FRESH) -> float:
        diff = ws("diff", out.shape, out.dtype)  # (batch, outputs)
        if target.ndim == 1 and out.shape[1] == 1:  # out - label
            xp.subtract(out[:, 0], target, out=diff[:, 0])
        elif target.ndim == 1:  # out - onehot(target)
            diff[...] = out
            diff[xp.arange(len(target)), target] -= 1
        else:
            xp.subtract(out, target, out=diff)
        self.diff = diff
        sq = xp.multiply(diff, diff, out=ws("sq", out.shape, out.dtype))
        self.sq = sq
        return float(sq.sum(dtype=xp.float64)) / out.shape[1]

    def shard_sums(self, shard_rows: int) -> list[float]:
        return [v / self.sq.shape[1] for v in _block_sums(self.sq, shard_rows)]

    def backward(self, scale: float):
        d = self.diff
        d *= 2.0 * scale / d.shape[1]
        self.diff = None
        return d


def _block_sums(a, rows: int) -> list[float]:
    return [float(a[i : i + rows].sum(dtype=xp.float64)) for i in range(0, len(a), rows)]


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "mse": MeanSquaredError}


def count_correct(out, labels) -> int:
    """Rows whose largest output is at the label's index; with one output (labels 0 and 1), rows
    whose output rounds to the label (is above 0.5 for label 1)."""
    if out.shape[1] == 1:
        return int(((out[:, 0] > 0.5) == labels).sum())
    return int((out.argmax(axis=1) == labels).sum())
