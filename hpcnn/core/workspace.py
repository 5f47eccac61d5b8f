"""Arrays a model reuses from step to step instead of allocating them.

A training step produces the same activation, gradient and scratch arrays every time: same owner
(layer), same role, same shape. ``Workspace`` hands out one array per such key, made the first time
it is asked for and returned again every later step, so that a step allocates nothing
activation- or parameter-sized after the first (numpy's large allocations are fresh pages from the
kernel each time: page faults on every step otherwise).

Keys carry a *slot*: the micro-batch a pipeline stage has in flight (``("train", m)``) or an
inference chunk (``("infer", m)``). Arrays of different slots never alias, so the activations of
micro-batches alive at once, and a pending ``Isend`` of an output, stay intact. An array is valid
until the next forward (or backward) with the same slot: callers that keep outputs copy them.
A run sees few shapes (full batches, an epoch's last partial batch, evaluation chunks), so the
workspace stays small: one set of arrays per shape and slot.
"""

from hpcnn.core.backend import xp


class Workspace:
    """One reusable array per ``(owner, slot, name, shape, dtype)``."""

    def __init__(self):
        self._arrays: dict = {}
        self._scopes: dict = {}
        self._grown: dict = {}  # RowsScope arrays: one per key, as many rows as ever asked for

    def scope(self, owner, slot) -> "Scope":
        """The arrays of one layer (``owner``) for one slot."""
        key = (owner, slot)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = Scope(self, key)
        return scope

    def array(self, key, shape, dtype):
        full = (key, shape, dtype)
        a = self._arrays.get(full)
        if a is None:
            a = self._arrays[full] = xp.empty(shape, dtype=dtype)
        return a

    def rows_scope(self, owner) -> "RowsScope":
        """The arrays of ``owner`` that are refilled every step with a varying row count."""
        key = (owner, "rows")
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = RowsScope(self, key)
        return scope

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self._arrays.values(), *self._grown.values()))


class Scope:
    """``scope(name, shape)``: the reusable array of one layer and slot (contents undefined)."""

    __slots__ = ("ws", "key")

    def __init__(self, ws: Workspace, key):
        self.ws, self.key = ws, key

    def __call__(self, name: str, shape: tuple, dtype):
        return self.ws.array((self.key, name), shape, dtype)


class RowsScope:
    """``scope(name, shape)``: the first ``shape[0]`` rows of one array per name, reallocated only
    when more rows are asked for. For arrays written anew every step whose row count follows the
    batch (an epoch's short last batch): one allocation, not one per row count."""

    __slots__ = ("ws", "key")

    def __init__(self, ws: Workspace, key):
        self.ws, self.key = ws, key

    def __call__(self, name: str, shape: tuple, dtype):
        key, grown = (self.key, name), self.ws._grown
        a = grown.get(key)
        if a is None or len(a) < shape[0] or a.shape[1:] != tuple(shape[1:]) or a.dtype != dtype:
            a = grown[key] = xp.empty(shape, dtype=dtype)
        return a[: shape[0]]


class Fresh:
    """A scope that allocates every time: for layers used on their own (tests, one-off calls)."""

    def __call__(self, name: str, shape: tuple, dtype):
        return xp.empty(shape, dtype=dtype)


FRESH = Fresh()
