"""hpcnn: data- and model-parallel neural-network training with numpy and MPI.

The library: a ``Trainer`` fits a model (``Sequential`` of ``Dense``, activations, convolution and
pooling (``Conv2D``, ``MaxPool2D``, ...) and layers of your own, ``Layer`` subclasses) on data
(``arrays``, a built-in dataset, an HDF5 file) with a loss and an optimizer (``SGD``, ``Adam``,
``AdamW``), over the ranks of an MPI job, with settings as ``Config``
fields. The parts: ``hpcnn.core`` (numerical: plain numpy, no MPI, files or argv), ``hpcnn.parallel``
(communicator, data-parallel reduction, pipeline, preemption, stall inspector), ``hpcnn.io``
(datasets, checkpoints, run directories), ``hpcnn.training`` (the loop and the ``Trainer``), and the
commands (``python -m hpcnn.train``, ``evaluate``, ``bench``, ``sweep``, ``plot``, ``data``,
``checkpoint``), the only code that reads argv, prints for the user and picks exit codes. The
library raises instead (a ``JobError`` carries the exit code a command would use), except where no
exception can end a hang: the stall inspector and a second Ctrl-C end the job themselves, with one
message and ``MPI_Abort``.

The names below are imported on first use: ``import hpcnn`` loads neither numpy nor mpi4py, so
``python -m hpcnn.train`` catches signals before anything heavy is imported.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Trainer": "hpcnn.training.trainer",
    "Result": "hpcnn.training.engine",
    "Config": "hpcnn.config",
    "Sequential": "hpcnn.core.model",
    "Layer": "hpcnn.core.layers",
    "Dense": "hpcnn.core.layers",
    "ReLU": "hpcnn.core.layers",
    "Sigmoid": "hpcnn.core.layers",
    "Tanh": "hpcnn.core.layers",
    "GELU": "hpcnn.core.layers",
    "BatchNorm": "hpcnn.core.norm",
    "LayerNorm": "hpcnn.core.norm",
    "Dropout": "hpcnn.core.dropout",
    "Conv2D": "hpcnn.core.conv",
    "MaxPool2D": "hpcnn.core.conv",
    "AvgPool2D": "hpcnn.core.conv",
    "GlobalAvgPool": "hpcnn.core.conv",
    "Flatten": "hpcnn.core.conv",
    "SoftmaxCrossEntropy": "hpcnn.core.losses",
    "MeanSquaredError": "hpcnn.core.losses",
    "SGD": "hpcnn.core.optim",
    "Adam": "hpcnn.core.optim",
    "AdamW": "hpcnn.core.optim",
    "arrays": "hpcnn.io.datasets",
    "Comm": "hpcnn.parallel.comm",
    "Interrupted": "hpcnn.parallel.preempt",
    "JobError": "hpcnn.errors",
    "UserError": "hpcnn.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpcnn' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
