"""Layer-wise model parallelism: stage partitions and the micro-batch schedules that run them.

A model's layers are cut into ``P`` consecutive stages, one per rank of a pipeline (see
``comm.Grid``). For each step, every stage walks the same list of micro-batches:

- forward ``F(m)``: stage 0 takes its inputs from the data, later stages ``Recv`` the activation
  of micro-batch ``m`` from the previous stage (tag ``m``); the output is sent on with ``Isend``,
  or, on the last stage, goes into the loss, whose gradient is computed at once and kept;
- backward ``B(m)``: the last stage uses the kept loss gradient, earlier stages ``Recv`` the
  output gradient from the next stage (tag ``m``); the input gradient is sent back with ``Isend``.
  Weight gradients are not formed here: each layer copies its input and output gradient rows into
  step-long stacks, and after the step's last backward one product per layer over all the step's
  rows gives them (``W``, the weight-gradient pass). Per micro-batch they would be products with
  only its rows, memory-bound at tens of rows, each added into the buffer by one more pass; the
  input gradients, which the previous stage waits for, also leave sooner. The stacks add one copy
  of each Dense layer's input and output gradient for the stage's rows of the step.

Schedules are orders of these operations, the same rule on every stage:
``gpipe`` runs all forwards, then all backwards (all ``M`` micro-batches' activations alive);
``1f1b`` (PipeDream-flush) runs ``P - s - 1`` warm-up forwards on stage ``s``, then alternates one
forward and one backward, then drains the backwards, keeping at most ``P`` micro-batches alive.
Sends never block (``Isend``, completed at the end of the step), and each ``Recv`` names its
micro-batch, so no ordering of the ranks can deadlock, whatever the micro-batch sizes (an empty
micro-batch sends an empty message). Each loss gradient is scaled by ``1 / global_rows``, so the
accumulated gradient is the global-batch mean, exactly as without micro-batches.

Receive buffers come from a pool keyed by shape: allocated the first time a shape is seen (after
the shape handshake told each stage the width it will receive), then reused every step. A run
sees few shapes (full micro-batches, the last partial batch's, evaluation chunks'), and the pool
keeps one buffer per shape and micro-batch in flight.
"""

import math

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.losses import count_correct
from hpcnn.errors import UserError
from hpcnn.parallel.comm import Request
from hpcnn.parallel.probe import Probe, StageTimes

SCHEDULES = ("1f1b", "gpipe")


def balanced_partition(costs: list[float], stages: int) -> list[int]:
    """Cut ``costs`` (one per layer) into ``stages`` consecutive non-empty runs, minimising the
    costliest run. Returns the start index of every stage plus the end: ``[0, b1, ..., len]``."""
    n = len(costs)
    assert 1 <= stages <= n, (stages, n)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    # best[k][i]: the smallest possible maximum when the first i layers form k stages
    best = np.full((stages + 1, n + 1), np.inf)
    cut = np.zeros((stages + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def explicit_partition(starts: list[int], n_layers: int, stages: int) -> list[int]:
    """Bounds from ``--stage-layers``: the first layer index of stages 1..P-1."""
    bounds = [0, *starts, n_layers]
    if len(starts) != stages - 1 or any(b >= c for b, c in zip(bounds[:-1], bounds[1:], strict=True)):
        raise UserError(
            f"stage_layers = {starts}: expected {stages - 1} increasing layer indices between 1 and "
            f"{n_layers - 1} (where stages 1..{stages - 1} start; the model has {n_layers} layers)"
        )
    return bounds


def schedule_ops(kind: str, stage: int, stages: int, micro: int) -> list[tuple[str, int]]:
    """The order of forward (``"F"``) and backward (``"B"``) operations on ``stage``."""
    if kind == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    warmup = min(stages - stage - 1, micro)
    ops = [("F", m) for m in range(warmup)]
    for m in range(micro - warmup):
        ops += [("F", warmup + m), ("B", m)]
    return ops + [("B", m) for m in range(micro - warmup, micro)]


class Pipeline:
    """This rank's stage of a pipeline, running micro-batches through ``model``.

    Parameters
    ----------
    model : Sequential holding this stage's layers (``model.shard``: deterministic mode)
    pipe : Comm of this replica's stages (``None`` for a one-stage pipeline)
    stage, stages : this stage's index and the number of stages
    in_features : width of the activations this stage receives (or reads, on stage 0)
    schedule : ``"1f1b"`` or ``"gpipe"``
    clock : a function returning seconds (``MPI.Wtime``)
    probe : the training's ``Probe``, told each phase of a step (default: one of its own)
    """

    def __init__(
        self, model, pipe, stage: int, stages: int, in_features: int, schedule: str, clock, probe=None
    ):
        self.model, self.pipe, self.stage, self.stages = model, pipe, stage, stages
        # Transfers are flat rows (rows, width); the stage's model views them in its row shape.
        self.in_features = in_features
        self.out_features = math.prod(model.out_shape) if model.out_shape is not None else in_features
        self.schedule = schedule
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.probe = probe if probe is not None else Probe(clock)
        self._pool: dict[tuple, list] = {}
        self._deferred: list = []
        # --deterministic: the last stage keeps each shard's loss sum of the latest step (or
        # evaluation chunk) in shard order
        self.shard_losses: list[float] = []
        # --zero 2 on a single stage: weight gradients deferred too (each formed once per step)
        self.always_defer = False
        # --dp-sgd: rows -> each row's clip factor, called between the last backward and the weight
        # gradients (``hpcnn.training.privacy.Clipping``); weight gradients are then always deferred
        self.clipping = None

    @property
    def shard_rows(self) -> int:
        """Rows per shard in deterministic mode (micro-batches are whole shards), else 0."""
        sharding = self.model.sharding
        return sharding.rows if sharding is not None else 0

    @property
    def times(self) -> StageTimes:
        """Where this rank's step time went (the probe's timers)."""
        return self.probe.times

    @times.setter
    def times(self, value: StageTimes) -> None:
        self.probe.times = value

    def defers_weight_grads(self, micro: int) -> bool:
        if self.clipping is not None:
            return True
        return defers_weight_grads(self.stages, micro, bool(self.shard_rows), self.always_defer)

    def handshake(self) -> None:
        """Check that each stage sends the width and dtype the next one expects (before any data)."""
        if self.stages == 1:
            return
        mine = (self.out_features, np.dtype(self.model.dtype).str)
        if not self.is_last:
            self.pipe.send(mine, dest=self.stage + 1, tag=0)
        if not self.is_first:
            theirs = self.pipe.recv(source=self.stage - 1, tag=0)
            expected = (self.in_features, np.dtype(self.model.dtype).str)
            assert theirs == expected, f"stage {self.stage} receives {theirs}, expects {expected}"

    def _buffer(self, rows: int, width: int):
        free = self._pool.get((rows, width))
        return free.pop() if free else xp.empty((rows, width), dtype=self.model.dtype)

    def _release(self, buf) -> None:
        self._pool.setdefault(buf.shape, []).append(buf)

    def _recv(self, rows: int, width: int, source: int, tag: int):
        """A blocking receive for inference (training steps post theirs up front: ``_take``)."""
        buf = self._buffer(rows, width)
        with self.probe.region("evaluation receive", value=source):
            self.pipe.Recv(buf, source=source, tag=tag)
        return buf

    def _post_receives(self, sizes) -> dict:
        """``("F"|"B", m) -> (request, buffer)``: this step's activations from the previous stage
        and gradients from the next, all posted at the start (tag = micro-batch)."""
        posted = {}
        for m, rows in enumerate(sizes):
            if not self.is_first:
                buf = self._buffer(rows, self.in_features)
                posted["F", m] = (self.pipe.Irecv(buf, source=self.stage - 1, tag=m), buf)
            if not self.is_last:
                buf = self._buffer(rows, self.out_features)
                posted["B", m] = (self.pipe.Irecv(buf, source=self.stage + 1, tag=m), buf)
        return posted

    def _take(self, posted, kind: str, m: int, source: int):
        """Wait for a posted receive; returns its buffer."""
        request, buf = posted.pop((kind, m))
        self.probe("receive activations" if kind == "F" else "receive gradients", m, source)
        request.Wait()
        return buf

    def _tapes(self, m: int, offsets, defer: bool) -> list[dict]:
        """Micro-batch ``m``'s tape: what each layer's backward will need from its forward."""
        layers = self.model.layers
        if self.shard_rows:  # the local index of the micro-batch's first shard
            first = int(offsets[m]) // self.shard_rows
            return [{"shard": first} for _ in layers]
        if defer:  # (first row, step rows, stack scope): weight gradients after the last backward
            rows = (int(offsets[m]), int(offsets[-1]))
            return [{"defer": (*rows, self.model.stack(i))} for i in range(len(layers))]
        return [{} for _ in layers]

    def train_step(self, inputs, targets, sizes, scale: float, loss_fn, on_layer_done=None, first_row=0):
        """Forward and backward all micro-batches of one step; fill ``model.params.grad``.

        ``inputs``/``targets`` are lists of per-micro-batch arrays on the first/last stage (else
        ``None``); ``sizes`` the micro-batches' row counts, known to every stage; ``first_row``:
        the index in the global batch of this replica's first row (each micro-batch's forward is
        told its own first row: ``Sequential.forward(row=...)``, what ``Dropout`` masks and
        ``BatchNorm``'s deterministic shards are placed by). Returns the last
        stage's ``(loss_sum, correct)`` (zeros elsewhere). ``on_layer_done(i)`` is called once layer
        ``i``'s gradient is final: during the last micro-batch's backward (backwards run in
        micro-batch order, so the last one completes each layer), or, where the stage defers weight
        gradients, during the weight-gradient pass after it. The step's phases go to ``probe``; the
        last one runs on until the caller's next.
        """
        micro = len(sizes)
        assert micro >= 1, "a step needs at least one micro-batch"
        probe, times = self.probe, self.probe.times
        tapes, held, kept = {}, {}, {}  # per micro-batch: forward state, recv buffer, loss grad
        sends, loss_sum, correct, live, first_backward = [], 0.0, 0, 0, True
        # Every receive of the step is posted now, and every layer boundary tests all pending
        # transfers: without an asynchronous progress thread, MPI moves a large (rendezvous)
        # message only while both sides are inside MPI, so a transfer posted between two waits
        # would otherwise sit idle through the sender's next computation.
        posted = self._post_receives(sizes)
        # A stage of a pipeline defers weight gradients to one product over all the step's rows
        # after the last backward: per micro-batch, each would be a product with only its rows
        # (memory-bound at tens of rows) plus a pass adding it into the buffer.
        defer = self.defers_weight_grads(micro)
        offsets = np.cumsum([0, *sizes])
        pending = [request for request, _ in posted.values()]
        self.shard_losses = []

        def progress(i=None):
            if pending or sends:
                Request.Testall(pending + [request for request, _ in sends])

        def backward_hook(i):
            on_layer_done(i)
            progress()

        for op, m in schedule_ops(self.schedule, self.stage, self.stages, micro):
            if op == "F":
                x = inputs[m] if self.is_first else self._take(posted, "F", m, self.stage - 1)
                held[m] = x
                probe("forward", m, sizes[m])
                tapes[m] = self._tapes(m, offsets, defer)
                row = first_row + int(offsets[m])
                out = self.model.forward(x, tape=tapes[m], slot=m, on_layer_done=progress, row=row)
                if probe.fault("forward") == "nan":
                    out = out * xp.nan
                if self.is_last:
                    scope = self.model.workspace.scope("loss", ("train", m))
                    loss_sum, correct = self._score(loss_fn, out, targets[m], loss_sum, correct, scope)
                    kept[m] = loss_fn.backward(scale)
                else:
                    sends.append((self.pipe.Isend(out, dest=self.stage + 1, tag=m), out))
                live += 1
                times.peak_live = max(times.peak_live, live)
            else:
                dout = kept.pop(m) if self.is_last else self._take(posted, "B", m, self.stage + 1)
                probe("backward", m, sizes[m])
                # gradients final: reduce them (deferred ones are final after weight_grads)
                final = m == micro - 1 and on_layer_done is not None and not defer
                dx = self.model.backward(
                    dout,
                    need_input_grad=not self.is_first,
                    tape=tapes.pop(m),
                    accumulate=not first_backward,
                    slot=m,
                    on_layer_done=backward_hook if final else progress,
                )
                first_backward = False
                x = held.pop(m)
                if not self.is_first:
                    sends.append((self.pipe.Isend(dx, dest=self.stage - 1, tag=m), dx))
                    self._release_unless_sent(x, sends)
                if not self.is_last:
                    self._release_unless_sent(dout, sends)
                live -= 1
        if defer:
            rows = int(offsets[-1])
            factors = None
            if self.clipping is not None:
                probe("clipping", 0, rows)
                factors = self.clipping(rows)
            probe("weight gradients", 0, rows)
            self.model.weight_grads(rows, backward_hook if on_layer_done else progress, factors)
        self._complete(sends)
        return loss_sum, correct

    def forward_only(self, inputs, targets, sizes, loss_fn, outputs: list | None = None):
        """Inference through the pipeline: returns the last stage's loss sum and correct count
        (zeros without ``targets``); with ``outputs``, the last stage appends each micro-batch's
        model output to it (prediction)."""
        sends, loss_sum, correct = [], 0.0, 0
        self.shard_losses = []
        for m, rows in enumerate(sizes):
            x = inputs[m] if self.is_first else self._recv(rows, self.in_features, self.stage - 1, m)
            out = self.model.forward(x, train=False, slot=m)
            if self.is_last:
                if outputs is not None:
                    outputs.append(xp.array(out))  # a copy: out is a workspace array
                if targets is not None:
                    scope = self.model.workspace.scope("loss", ("infer", m))
                    loss_sum, correct = self._score(loss_fn, out, targets[m], loss_sum, correct, scope)
            else:
                sends.append((self.pipe.Isend(out, dest=self.stage + 1, tag=m), out))
            if not self.is_first:
                self._release_unless_sent(x, sends)
        self._complete(sends, timed=False)
        return loss_sum, correct

    def _release_unless_sent(self, buf, sends) -> None:
        """Return a receive buffer to the pool, unless a layer passed it through unchanged and it
        is now the buffer of a pending send (then it is returned when the sends complete)."""
        if any(sent is buf for _, sent in sends):
            self._deferred.append(buf)
        else:
            self._release(buf)

    def _complete(self, sends, timed: bool = True) -> None:
        """Wait for this step's sends (``timed``: a phase of the training step)."""
        if sends:
            if timed:
                self.probe("send wait", 0, len(sends))
            Request.Waitall([request for request, _ in sends])
        while self._deferred:
            self._release(self._deferred.pop())

    def _score(self, loss_fn, out, target, loss_sum: float, correct: int, ws):
        """Add a micro-batch's loss (and, for class labels, its correct count) to the running
        sums; in deterministic mode also keep each shard's loss sum."""
        loss_sum += loss_fn.forward(out, target, ws)
        if self.shard_rows:
            self.shard_losses += loss_fn.shard_sums(self.shard_rows)
        if target.ndim == 1:  # class labels; regression targets are (rows, outputs)
            correct += count_correct(out, target)
        return loss_sum, correct


def defers_weight_grads(stages: int, micro: int, sharded: bool, always: bool = False) -> bool:
    """Whether a step of ``micro`` micro-batches forms weight gradients once, after the last
    backward: on every stage of a pipeline, or ``always`` (``--zero 2``: a gradient written once per
    step needs no whole-model buffer); ``sharded`` (deterministic mode) sums them per shard."""
    return (stages > 1 or always) and micro > 1 and not sharded


def gpipe_bubble(stages: int, micro: int) -> float:
    """The idle fraction of GPipe (and of 1F1B) with equal stages: (P - 1) / (M + P - 1)."""
    return (stages - 1) / (micro + stages - 1)
