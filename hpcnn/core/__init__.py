"""The numerical core: flat parameter buffers (``params``), layers with forward and backward on views
into them (``layers``; convolution and pooling of channels-last images in ``conv``), losses, the
``Sequential`` model, optimizers and the per-step workspace.

Array code only (numpy, through ``backend``): never MPI, files, argv or printing. Everything
parallel builds on it from ``hpcnn.parallel``; the library's errors come from ``hpcnn.errors``.
"""
