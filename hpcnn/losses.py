"""Losses: per-row sums forward, gradients scaled by the caller.

``forward`` returns the *sum* of per-row losses over the rows given, and ``backward(scale)``
returns the gradient of ``scale * sum``. Data-parallel training passes ``scale = 1 / global_rows``
so that each rank's local gradient, summed across ranks by one Allreduce, is exactly the mean over
the global batch however unevenly the rows were split.
"""

from hpcnn.backend import xp


class SoftmaxCrossEntropy:
    """Softmax and cross-entropy fused: stable log-sum-exp forward, ``softmax - onehot`` backward.

    Targets are integer class labels of shape (batch,).
    """

    def forward(self, logits, labels) -> float:
        shifted = logits - logits.max(axis=1, keepdims=True)  # (batch, classes), max is 0
        exp = xp.exp(shifted)
        sumexp = exp.sum(axis=1, keepdims=True)  # (batch, 1)
        rows = xp.arange(len(labels))
        loss = xp.log(sumexp[:, 0]) - shifted[rows, labels]  # (batch,)
        exp /= sumexp
        self.probs, self.labels = exp, labels
        return float(loss.sum(dtype=xp.float64))

    def backward(self, scale: float):
        d = self.probs
        d[xp.arange(len(self.labels)), self.labels] -= 1
        d *= scale
        self.probs = self.labels = None
        return d


class MeanSquaredError:
    """Per-row mean over outputs of ``(out - target)**2``.

    Integer labels of shape (batch,) are compared as one-hot vectors; float targets of shape
    (batch, outputs) are used as they are (regression).
    """

    def forward(self, out, target) -> float:
        if target.ndim == 1:
            onehot = xp.zeros_like(out)
            onehot[xp.arange(len(target)), target] = 1
            target = onehot
        self.diff = out - target  # (batch, outputs)
        return float((self.diff * self.diff).sum(dtype=xp.float64)) / out.shape[1]

    def backward(self, scale: float):
        d = self.diff
        d *= 2.0 * scale / d.shape[1]
        self.diff = None
        return d


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "mse": MeanSquaredError}


def count_correct(out, labels) -> int:
    """Rows whose largest output is at the label's index."""
    return int((out.argmax(axis=1) == labels).sum())
