"""How the replicas of a pipeline stage agree on its gradient: the interface the training step calls.

Every data-parallel replica of a stage computes the gradient of its rows of the global batch; a
``GradientSync`` turns those into the one gradient every replica then steps with, and says what
the step's metrics and gradient norm are. The training step calls, in this order:

1. ``on_layer_done`` as backward's hook (``None``: no hook), where a reduction may start early;
2. ``metrics`` once backward is done: what this rank adds to the running loss/accuracy sums;
3. ``reduce``: afterwards ``params.grad`` holds the reduced gradient (or this rank's part of it);
4. ``sq_norm``: the squared gradient norm, after clipping the gradient to a maximum norm;
5. ``step``: the optimizer's step (unless ``sq_norm`` was not finite).

Two implement it: ``DataParallel`` (``data_parallel``: bucketed ``Iallreduce`` overlapped with
backward) and ``ShardReducer`` (``deterministic``: per-shard gradients summed in one tree order,
bitwise the same at any layout); ``ZeroSync`` (``zero``: the optimizer state, and the gradient,
sharded over the replicas) implements ``reduce`` as a reduce-scatter and ``step`` as the optimizer
on this rank's part followed by an all-gather of the parameters. The optimizer is bound to
``optimizer_params()``: the whole ``FlatParams``, or this rank's ``FlatShard`` of it.
"""

from hpcnn.core.backend import xp


class GradientSync:
    """The default parts of a gradient synchronisation over ``comm`` of ``params``.

    Parameters
    ----------
    comm : hpcnn.parallel.comm.Comm of the data-parallel group (the replicas of this stage)
    params : hpcnn.core.params.FlatParams of this rank's stage
    """

    on_layer_done = None  # the backward hook: ``on_layer_done(i)`` once layer ``i``'s gradient is final

    def __init__(self, comm, params):
        self.comm, self.params = comm, params

    def optimizer_params(self):
        """What the optimizer updates: the stage's ``FlatParams`` (a sharded sync: its part)."""
        return self.params

    def first_nonfinite(self):
        """The first layer of this stage whose reduced gradient holds a non-finite value, or
        ``None`` (a sharded sync: collective over the replicas)."""
        params = self.params
        for slot in params.slots:
            if not xp.isfinite(params.view(params.grad, slot)).all():
                return slot.layer
        return None

    def grad_bytes(self) -> int:
        """Bytes of gradient buffers this rank holds."""
        return int(self.params.grad.nbytes)

    def broadcast_parameters(self, root: int = 0) -> None:
        """Make every replica start from ``root``'s parameters."""
        self.comm.Bcast(self.params.data, root=root)

    def metrics(self, global_rows: int, loss_sum: float, correct: int, rows: int, shard_losses):
        """``(counted, loss_sum)``: what this rank adds to the running ``(loss sum, correct, rows)``
        sums (``None``: nothing) and the step's loss sum as this rank knows it. ``loss_sum``,
        ``correct``, ``rows``: this rank's, of the global batch of ``global_rows`` rows (last
        pipeline stage; zeros elsewhere); ``shard_losses``: its shards' loss sums (deterministic)."""
        raise NotImplementedError

    def reduce(self, global_rows: int) -> None:
        """Replace this rank's gradient of a ``global_rows``-row batch by the reduced one."""
        raise NotImplementedError

    def sq_norm(self, max_norm: float = 0.0) -> tuple[float, float]:
        """Clip the reduced gradient to norm ``max_norm`` (0: no clipping); return ``(sq, share)``:
        the squared norm this rank's decisions use (whether to step) and this rank's share of the
        whole model's squared norm for the records (the shares of all ranks add up to it)."""
        raise NotImplementedError

    def step(self, opt, lr: float) -> None:
        """The optimizer's step on the reduced gradient."""
        opt.step(lr)

    def close(self) -> None:
        """Release what the synchronisation holds beyond the step (threads)."""
