"""Handwritten digits: an MLP trained with Adam on hpcnn's built-in ``digits`` data, data parallel.

    python examples/digits.py
    mpirun -n 4 python examples/digits.py      # the same training, each rank on a quarter of each batch

The data are 8x8 images (64 features, 10 classes): 1,438 training rows and 359 held-out rows that
training never sees. ``on_epoch`` runs on every rank after each epoch with the same numbers; rank 0
prints them, and training stops early once the held-out accuracy reaches ``TARGET`` (rank 0's answer
decides for every rank, and the stop is a normal end: a final evaluation follows).
"""

import hpcnn
from hpcnn import Adam, Dense, ReLU, Sequential, Trainer

TARGET = 0.98  # held-out accuracy at which to stop early
comm = hpcnn.Comm.world()


def on_epoch(row):
    """Log one epoch (``row``: the epoch's numbers, as ``result.history`` keeps them)."""
    test = row["test"]
    comm.print0(
        f"epoch {row['epoch']:2d}  train loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}  "
        f"held-out loss {test['loss']:.4f}  accuracy {test['accuracy']:.3f}"
    )
    return test["accuracy"] >= TARGET  # True: stop after this epoch


model = Sequential([Dense(64, 128), ReLU(), Dense(128, 10)])  # logits for the fused softmax loss
trainer = Trainer(
    model,
    "digits",
    loss="cross_entropy",
    optimizer=Adam(),
    lr=1e-2,
    batch_size=64,  # global: summed over the ranks
    epochs=20,
    comm=comm,
    on_epoch=on_epoch,
    log=None,  # on_epoch does the logging
)
result = trainer.fit()
comm.print0(
    f"held-out accuracy {result.final['accuracy']:.4f} after {result.steps} steps on {comm.size} rank(s)"
    + (" (stopped early)" if len(result.history) < trainer.config.epochs else "")
)
