"""hpcnn: data- and model-parallel neural-network training with numpy and MPI.

The numerical core (``backend``, ``params``, ``layers``, ``losses``, ``model``, ``optim``) is plain
array code with no MPI or file I/O; the parallel machinery (``comm``, ``data_parallel``,
``pipeline``, ``preempt``) and the I/O (``data``, ``checkpoint``) build on it; ``config``, ``train``
and ``evaluate`` are the faces that know about argv and exit codes.
"""

__version__ = "0.1.0"
