"""``--deterministic``: training whose bits do not depend on the number of ranks or the layout.

Floating-point sums depend on their order, and everything that changes with the layout changes an
order: how many rows one matrix product covers (BLAS picks kernels and blockings by shape), how
many BLAS threads split it, in which order MPI adds the ranks' gradients, how a loss is summed over
a micro-batch. Deterministic mode removes each of these:

1. **Fixed units.** Every global batch is cut into *shards* of ``shard_rows`` consecutive rows (the
   last may be shorter). A data-parallel replica holds whole shards (``shard_range``); a micro-batch
   is whole shards. Every matrix product runs shard by shard with single-threaded BLAS, so each
   shard's activations and weight gradients are a function of the shard's rows and the parameters
   only, whichever rank, thread or micro-batch computes them. Ranks get their cores' worth of
   speed back from ``Workers``: threads that each run whole shards (BLAS itself stays at one thread).
2. **One summation order.** The gradient is the sum of the shards' gradients in the order of a
   fixed binary tree over the shard indices (``tree_split``). A replica adds what its own shards
   cover (whole subtrees, ``tree_nodes``); every rank then receives, for its chunk of the flat
   buffer, the other replicas' subtree sums and completes the tree in the same order, then sends
   its finished chunk to everyone (``ShardReducer``; point-to-point messages throughout). At two,
   four or eight replicas each holds one subtree, and the traffic is that of a reduce-scatter plus
   an all-gather (a ring Allreduce's); every rank sends ``replicas - 1`` messages per phase.
3. **Exact metrics.** Per-shard loss sums are placed in a vector that is zero except where a rank
   owns the shard; a sum over ranks of one value and zeros is exact in any order, and the shard
   values are then added with ``math.fsum`` (correctly rounded, order-free). The gradient norm is
   summed per tensor in model order the same way.

Elementwise work (bias, activations, the softmax, the optimizer) is exact per element and needs
nothing. The result depends on ``shard_rows`` (like on ``batch_size``): keep it when scaling.
"""

import contextvars
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hpcnn.core.backend import xp
from hpcnn.core.optim import clip_grad_norm
from hpcnn.core.params import FlatShard
from hpcnn.errors import UserError
from hpcnn.io.datasets import split_counts
from hpcnn.parallel.comm import IN_PLACE, SUM, Request
from hpcnn.parallel.sync import GradientSync
from hpcnn.parallel.zero import gather_parts

# shard_rows = 0: each full batch in this many shards. More shards let more replicas work but cost
# throughput (smaller products, more per-shard gradients to add): at the benchmark network, 4 shards
# ran at ~0.8 of the default path's speed, 8 at ~0.65 (docs/performance.md).
AUTO_SHARDS = 4


def shard_rows(cfg) -> int:
    """Rows per shard: ``cfg.shard_rows``, or (0) the batch cut into ``AUTO_SHARDS`` shards."""
    return cfg.shard_rows or max(1, -(-cfg.batch_size // AUTO_SHARDS))


def shard_count(rows: int, rows_per_shard: int) -> int:
    return -(-rows // rows_per_shard)


def shard_range(shards: int, replicas: int, replica: int) -> tuple[int, int]:
    """``(first, count)`` of the shards replica ``replica`` holds: contiguous, near-equal."""
    return split_counts(shards, replicas, replica)


def tree_split(a: int, b: int) -> int:
    """Where the canonical tree cuts shards ``[a, b)``: after the largest power of two below
    ``b - a``, so that aligned power-of-two blocks (what 2, 4, 8 replicas hold) are whole nodes."""
    return a + (1 << ((b - a - 1).bit_length() - 1))


def tree_nodes(lo: int, hi: int, total: int) -> list[tuple[int, int]]:
    """The largest nodes of the tree over ``[0, total)`` that lie inside ``[lo, hi)``, left to right
    (they cover it exactly: what a replica holding those shards can add up on its own)."""
    out = []

    def visit(a, b):
        if b <= lo or a >= hi:
            return
        if lo <= a and b <= hi:
            out.append((a, b))
            return
        mid = tree_split(a, b)
        visit(a, mid)
        visit(mid, b)

    if lo < hi:
        visit(0, total)
    return out


def exact_sum(values) -> float:
    """The correctly rounded sum, the same in every order (``inf``/``nan`` where the sum overflows
    or mixes infinities: the caller's non-finite checks then say what happened)."""
    values = [float(v) for v in values]
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):  # fsum raises where a float sum gives inf or nan
        return float(sum(values))


class Workers:
    """Run numbered pieces of work on ``n`` threads (this one and ``n - 1`` helpers).

    Each thread takes a contiguous run of the pieces. numpy releases the interpreter lock inside
    matrix products and large elementwise loops, so single-threaded BLAS calls on different shards
    run in parallel; which thread runs a shard does not change its result.
    """

    def __init__(self, n: int, blas_limit=None):
        self.n = max(1, int(n))
        self._pool = None
        if self.n > 1:
            self._pool = ThreadPoolExecutor(
                self.n - 1, thread_name_prefix="hpcnn-shard", initializer=_one_blas_thread
            )
        self._blas_limit = blas_limit

    @classmethod
    def replacing_blas_threads(cls) -> "Workers":
        """As many workers as BLAS has threads now (what ``comm.blas_threads`` chose), BLAS itself
        set to one thread (a product's bits depend on how many threads split it) until ``close``."""
        from threadpoolctl import threadpool_info, threadpool_limits

        n = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
        return cls(n, threadpool_limits(limits=1, user_api="blas"))

    def run(self, fn, count: int) -> None:
        """``fn(i)`` for ``i in range(count)``; returns when all are done (re-raising any error).
        Once closed, everything runs on the calling thread (same results: a trained model stays
        usable)."""
        parts = min(self.n, count) if self._pool is not None else 1
        if parts <= 1:
            for i in range(count):
                fn(i)
            return

        def part(p):
            start, n = split_counts(count, parts, p)
            for i in range(start, start + n):
                fn(i)

        # in a copy of the caller's context: numpy's error state (np.errstate) holds in the helpers too
        futures = [self._pool.submit(contextvars.copy_context().run, part, p) for p in range(1, parts)]
        try:
            part(0)
        finally:
            for f in futures:
                f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None


def _one_blas_thread() -> None:
    """In each shard thread: BLAS built on OpenMP keeps its thread count per calling thread."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class Sharding:
    """How a layer computes in deterministic mode: fixed-size row blocks on ``workers``.

    A layer's input holds whole shards from its first row (a micro-batch), so blocks of ``rows``
    rows from its start are shards; ``first`` (kept on the tape) is the local index of the first.
    ``Sequential.shard`` hands it to the layers.
    """

    def __init__(self, rows: int, workers: Workers):
        self.rows, self.workers = rows, workers

    def blocks(self, n: int) -> int:
        return shard_count(n, self.rows)

    def rows_of(self, k: int, n: int) -> slice:
        return slice(k * self.rows, min(n, (k + 1) * self.rows))

    def matmul_rows(self, a, b, out) -> None:
        """``out = a @ b`` one shard of rows at a time."""
        n = len(a)

        def one(k):
            r = self.rows_of(k, n)
            xp.matmul(a[r], b, out=out[r])

        self.workers.run(one, self.blocks(n))


def shard_stage(model, rows: int) -> Sharding:
    """Make ``model`` (a stage's ``Sequential``) compute in shards of ``rows`` rows on
    single-threaded BLAS, with as many shard threads as BLAS had (for inference: evaluation of a
    deterministic run; ``sharding.workers.close()`` gives BLAS its threads back)."""
    sharding = Sharding(rows, Workers.replacing_blas_threads())
    model.shard(sharding)
    return sharding


def exact_metrics(world, shard_losses, first: int, total: int, counts, is_last: bool) -> np.ndarray:
    """``(loss sum, *counts)`` over all ``total`` shards, the same bits on every layout: each
    shard's loss sum travels alone (a sum over ranks of one value and zeros is exact in any order)
    and the values are added exactly; counts are integers (exact in float64), summed over every
    rank of ``world`` (zeros where a rank has nothing to count)."""
    v = np.zeros(total + len(counts))
    if is_last:
        v[first : first + len(shard_losses)] = shard_losses
    v[total:] = counts
    world.Allreduce(IN_PLACE, v, op=SUM)
    return np.array([exact_sum(v[:total]), *v[total:]])


class ShardReducer(GradientSync):
    """Sum the shards' gradients of one replica group in the canonical tree order (a
    ``GradientSync``); metrics and the gradient norm are summed exactly too.

    Parameters
    ----------
    comm : hpcnn.parallel.comm.Comm of the data-parallel group (rank ``r``: replica ``r``)
    model : Sequential of this stage; its layers compute in shards and write their gradients into
        rows of this reducer's per-shard buffer
    max_shards : most shards this replica holds in one step
    rows : rows per shard
    world : Comm of every rank (the exact metrics); default ``comm``
    stages : Comm of this replica's pipeline stages (``None``: one stage), for the gradient norm
    is_last : whether this rank holds the last stage (computes the loss)
    tensors : ``(index of this stage's first tensor in the whole model, tensors in the model)``;
        the norm is summed per tensor in model order (default: this stage is the model)
    zero : shard the optimizer state over the replicas (``--zero 1|2``): each rank updates the
        chunk of the buffer it completes the tree for, and the parameters are gathered. The whole
        reduced gradient is still gathered (the norm is summed per whole tensor), and the per-shard
        gradient buffers stay: stage 2 is stage 1 here.

    ``start()`` ends the set-up: it takes BLAS's threads for the shard threads (``close()`` gives
    them back).
    """

    def __init__(
        self, comm, model, max_shards: int, rows: int, world=None, stages=None, is_last=True, tensors=None,
        zero=False,
    ):  # fmt: skip
        super().__init__(comm, model.params)
        params = self.params
        self.zero = zero and comm.size > 1
        self._chunks = [split_counts(params.size, comm.size, q) for q in range(comm.size)]
        start, n = self._chunks[comm.rank]
        self.shard = FlatShard(params, start, start + n, params.grad[start : start + n])
        self.world = comm if world is None else world
        self.stages, self.is_last, self.rows = stages, is_last, rows
        self._tensor_base, self._tensor_count = tensors or (0, len(params.slots))
        # (shards, n_params): shard k's gradient in row k, laid out like params.grad
        self.grads = xp.zeros((max(1, max_shards), params.size), dtype=params.dtype)
        self.sharding = Sharding(rows, Workers(1))
        try:
            model.shard(self.sharding, self.grads)
        except NotImplementedError as exc:
            raise UserError(f"deterministic: {exc}") from None
        self._recv: dict = {}  # receive buffers by shape

    @property
    def workers(self) -> Workers:
        return self.sharding.workers

    def grad_bytes(self) -> int:
        """The reduced gradient and the per-shard gradients."""
        return int(self.params.grad.nbytes + self.grads.nbytes)

    def optimizer_params(self):
        """This rank's chunk (``zero``), else the whole stage."""
        return self.shard if self.zero else self.params

    def step(self, opt, lr: float) -> None:
        opt.step(lr)
        if self.zero:  # every chunk's updated parameters to every replica
            counts, displs = [n for _, n in self._chunks], [start for start, _ in self._chunks]
            gather_parts(self.comm, self.params.data, counts, displs)

    def start(self) -> "ShardReducer":
        """Shard threads in place of BLAS's own (BLAS single-threaded: a product's bits depend on
        how many threads split it). The last step of a set-up: nothing after it may fail."""
        self.sharding.workers = Workers.replacing_blas_threads()
        return self

    def close(self) -> None:
        self.sharding.workers.close()

    def _shards(self, global_rows: int) -> tuple[int, int, int]:
        """``(first, count, total)``: this replica's shards of a ``global_rows``-row batch."""
        total = shard_count(global_rows, self.rows)
        first, count = shard_range(total, self.comm.size, self.comm.rank)
        return first, count, total

    def metrics(self, global_rows, loss_sum, correct, rows, shard_losses):
        """The metrics of all shards, exact, on every rank; counted once (on rank 0 of ``world``)."""
        first, _, total = self._shards(global_rows)
        counts = (correct, rows) if self.is_last else (0, 0)
        step = exact_metrics(self.world, shard_losses, first, total, counts, self.is_last)
        return (step if self.world.is_root else None), step[0]

    def reduce(self, global_rows: int) -> None:
        self.reduce_shards(*self._shards(global_rows))

    def sq_norm(self, max_norm: float = 0.0) -> tuple[float, float]:
        """The whole model's squared norm, the same bits on every layout: one value per tensor
        (fixed shapes), exact across stages (each tensor's value on one stage, zeros elsewhere),
        added exactly; the same on every rank, counted by rank 0 of ``world``."""
        params = self.params
        values = np.zeros(self._tensor_count)
        for i, slot in enumerate(params.slots):
            g = params.view(params.grad, slot).reshape(-1)
            values[self._tensor_base + i] = float(xp.dot(g, g))
        if self.stages is not None:
            self.stages.Allreduce(IN_PLACE, values, op=SUM)
        sq = exact_sum(values)
        if max_norm:
            clip_grad_norm(params.grad, max_norm, None, sq)
        return sq, sq if self.world.is_root else 0.0

    def reduce_shards(self, first: int, count: int, total: int) -> None:
        """Fill ``params.grad`` with the tree sum of all ``total`` shards' gradients; this replica
        computed shards ``first .. first + count - 1`` into rows ``0 .. count - 1``."""
        grad = self.params.grad
        nodes = tree_nodes(first, first + count, total)
        comm = self.comm
        if comm.size == 1:  # one node, the root: its last addition goes straight into grad
            self._add_subtrees([(0, total, 0)], out=grad)
            return
        self._add_subtrees([(a - first, b - first, a) for a, b in nodes])
        chunks = self._chunks
        here, mine = comm.rank, chunks[comm.rank]
        requests, parts = [], {}
        for q, (start, n) in enumerate(chunks):
            if q != here and n:
                for tag, (a, _) in enumerate(nodes):
                    requests.append(comm.Isend(self.grads[a - first, start : start + n], q, tag))
        held = [self._nodes_of(p, total) if p != here else [] for p in range(comm.size)]
        incoming = sum(len(h) for h in held)
        if mine[1]:
            buf = self._buffer(incoming, mine[1])
            i = 0
            for p, theirs in enumerate(held):
                for tag, node in enumerate(theirs):
                    parts[node] = buf[i]
                    requests.append(comm.Irecv(buf[i], p, tag))
                    i += 1
            start, n = mine
            for a, b in nodes:
                parts[a, b] = self.grads[a - first, start : start + n]
        Request.Waitall(requests)
        requests = []
        if mine[1]:
            start, n = mine
            xp.copyto(grad[start : start + n], _complete(parts, 0, total))
            requests += [
                comm.Isend(grad[start : start + n], q, _GATHER) for q in range(comm.size) if q != here
            ]
        # Every rank's chunk to every other rank. Point-to-point rather than Allgatherv: MPICH's
        # Allgatherv took 18 ms for 7 MiB at two ranks with MPIR_CVAR_ENABLE_HEAVY_YIELD=1 (0.5 ms
        # for these messages).
        for p, (start, n) in enumerate(chunks):
            if p != here and n:
                requests.append(comm.Irecv(grad[start : start + n], p, _GATHER))
        Request.Waitall(requests)

    def _nodes_of(self, replica: int, total: int) -> list[tuple[int, int]]:
        first, count = shard_range(total, self.comm.size, replica)
        return tree_nodes(first, first + count, total)

    def _buffer(self, rows: int, width: int):
        key = (rows, width)
        if key not in self._recv:
            self._recv[key] = xp.empty(key, dtype=self.params.dtype)
        return self._recv[key]

    def _add_subtrees(self, nodes, out=None) -> None:
        """Each node ``(lo, hi, global_lo)`` of local rows: its tree sum into row ``lo`` (or, for
        a single node, into ``out``), column block by column block (a block of every row stays in
        cache while it is added)."""
        grads = self.grads
        if out is not None and nodes[0][1] - nodes[0][0] == 1:
            xp.copyto(out, grads[nodes[0][0]])
            return
        nodes = [(lo, hi, g) for lo, hi, g in nodes if hi - lo > 1]
        if not nodes:
            return
        size, block = self.params.size, _BLOCK

        def add(lo, hi, g, cols, into=None):
            if hi - lo == 1:
                return
            mid = tree_split(g, g + hi - lo) - g + lo
            add(lo, mid, g, cols)
            add(mid, hi, g + mid - lo, cols)
            if into is None:
                grads[lo, cols] += grads[mid, cols]
            else:
                xp.add(grads[lo, cols], grads[mid, cols], out=into[cols])

        def one(j):
            cols = slice(j * block, min(size, (j + 1) * block))
            for lo, hi, g in nodes:
                add(lo, hi, g, cols, out)

        self.workers.run(one, -(-size // block))


_BLOCK = 1 << 15  # columns per block of the local tree sum
_GATHER = 30000  # tag of the reduced chunks' all-gather (subtree sums use tags 0, 1, ...)


def _complete(parts: dict, a: int, b: int):
    """The tree sum over shards ``[a, b)`` from ``parts`` (node -> array), adding in place into
    the left operand (each part is used once)."""
    if (a, b) in parts:
        return parts[a, b]
    mid = tree_split(a, b)
    left = _complete(parts, a, mid)
    left += _complete(parts, mid, b)
    return left
