"""A convolutional network on the built-in digits, as images, through the Python API.

    python examples/cnn.py
    mpirun -n 4 python examples/cnn.py      # the same training, each rank on a quarter of each batch

The digits are 8x8 grey images: here read from the file hpcnn ships and shaped (rows, 1, 8, 8),
channels first as most image data comes; ``hpcnn.arrays`` takes them so (``image_layout="nchw"``,
the default) and hands the model channels-last rows (8, 8, 1). The network is ``--model
cnn-digits``'s: two 3x3 convolutions, a 2x2 max-pool and two dense layers. Training stops early once
the held-out accuracy reaches ``TARGET``; ``predict`` then takes images in the same layout.
"""

from importlib import resources

import h5py
import numpy as np

import hpcnn
from hpcnn import Adam, Dense, ReLU, Sequential, Trainer
from hpcnn.core.conv import Conv2D, Flatten, MaxPool2D

TARGET = 0.985  # held-out accuracy at which to stop early
comm = hpcnn.Comm.world()

with h5py.File(resources.files("hpcnn") / "datasets" / "digits.h5", "r") as f:
    x, y = f["x"][:].reshape(-1, 1, 8, 8), f["y"][:]  # (1438, 1, 8, 8): N, C, H, W
    x_test, y_test = f["x_test"][:].reshape(-1, 1, 8, 8), f["y_test"][:]  # (359, 1, 8, 8)


def on_epoch(row):
    """Log one epoch; True (rank 0's answer decides) stops training after it."""
    test = row["test"]
    comm.print0(
        f"epoch {row['epoch']:2d}  train loss {row['loss']:.4f}  held-out accuracy {test['accuracy']:.4f}"
    )
    return test["accuracy"] >= TARGET


model = Sequential([
    Conv2D(1, 16, 3, padding=1), ReLU(),  # (8, 8, 16)
    Conv2D(16, 32, 3, padding=1), ReLU(),  # (8, 8, 32)
    MaxPool2D(2),  # (4, 4, 32)
    Flatten(),  # (512,)
    Dense(512, 64), ReLU(),
    Dense(64, 10),  # logits for the fused softmax loss
])  # fmt: skip
trainer = Trainer(
    model,
    hpcnn.arrays(x, y, x_test, y_test),
    loss="cross_entropy",
    optimizer=Adam(),
    lr=2e-3,
    batch_size=64,  # global: summed over the ranks
    epochs=30,
    comm=comm,
    on_epoch=on_epoch,
    log=None,  # on_epoch does the logging
)
result = trainer.fit()
predicted = trainer.predict(x_test).argmax(axis=1)  # images in, as given to arrays
comm.print0(
    f"held-out accuracy {result.final['accuracy']:.4f} after {result.steps} steps on {comm.size} rank(s); "
    f"predict agrees on {np.mean(predicted == y_test):.4f}"
)
