"""The one place where hpcnn chooses its array module.

Every numerical module does ``from hpcnn.core.backend import xp`` and never imports numpy for array math
directly, so moving to GPUs is a change here (``xp = cupy`` plus host/device copies in ``to_host``),
not a rewrite.
"""

import numpy

xp = numpy

DTYPES = {"float32": xp.float32, "float64": xp.float64}


def dtype_of(name: str):
    """The array dtype for a config name (``float32`` or ``float64``)."""
    return DTYPES[name]


def to_host(a):
    """A numpy view/copy of an ``xp`` array, for MPI buffers, HDF5 and printing."""
    return numpy.asarray(a)
