"""Data parallelism: identical replicas, one fused gradient reduction per step.

Every rank holds the whole model. Each rank backpropagates its slice of the global batch with the
loss scaled by ``1 / global_rows``, so summing the gradient buffers over ranks gives exactly the
mean over the global batch, even when slices differ in size (or are empty). The sum is one in-place
``Allreduce`` of the flat gradient buffer (mpi4py passes numpy buffers, and CuPy ones to a
CUDA-aware MPI, without copies).
"""


class DataParallel:
    """Keep the replicas of ``params`` (a ``FlatParams``) in step over ``comm``.

    Parameters
    ----------
    comm : hpcnn.comm.Comm of the data-parallel group
    params : hpcnn.params.FlatParams of this rank's replica
    """

    def __init__(self, comm, params):
        self.comm, self.params = comm, params

    def broadcast_parameters(self, root: int = 0) -> None:
        """Make every replica start from ``root``'s parameters."""
        self.comm.broadcast_(self.params.data, root)

    def reduce_gradients(self) -> None:
        """Sum the (already ``1 / global_rows``-scaled) gradients over the group, in place."""
        if self.comm.size > 1:
            self.comm.allreduce_sum_(self.params.grad)
