"""XOR with a 2-4-1 sigmoid network, mean squared error and plain full-batch gradient descent.

The classic first neural network, as an hpcnn script: every rank runs this file, hpcnn splits the
four rows over the ranks (one row each at four ranks) and sums their gradients, so the global batch
of 4 is the full batch at any rank count::

    python examples/xor.py
    mpirun -n 4 python examples/xor.py     # prints the same digits

The same digits, not merely close ones: ``deterministic=True`` makes hpcnn compute in fixed shards
of rows (here one row per shard) and add the shards' gradients in one fixed order, which hpcnn
guarantees bitwise on any number of ranks (docs/deterministic.md). ``dtype="float64"`` alone does
not promise that: a gradient summed over ranks in another order agrees only to rounding (without
``deterministic=True``, 2, 3 and 4 ranks each printed other last digits than one rank here).
"""

import numpy as np

import hpcnn
from hpcnn import SGD, Dense, Sequential, Sigmoid, Trainer

x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
y = np.array([[0], [1], [1], [0]], dtype=np.float64)  # one output unit whose target is the label

model = Sequential([Dense(2, 4, init="xavier"), Sigmoid(), Dense(4, 1, init="xavier"), Sigmoid()])
trainer = Trainer(
    model,
    hpcnn.arrays(x, y),
    loss="mse",
    optimizer=SGD(),  # momentum 0: plain gradient descent
    lr=4.0,
    lr_schedule="constant",
    batch_size=4,  # the full batch, summed over all ranks
    epochs=500,  # one step per epoch
    dtype="float64",
    deterministic=True,
    shard_rows=1,
    eval_every=0,
    log=None,  # no progress lines
)
result = trainer.fit()
predictions = trainer.predict(x)  # the same array on every rank
if trainer.comm.is_root:  # every digit of each float64 (repr): equal text means equal bits
    for row, target, out in zip(x, y, predictions, strict=True):
        print(f"{row[0]:.0f} xor {row[1]:.0f} = {target[0]:.0f}: predicted {float(out[0])!r}")
    right = int(np.sum(np.round(predictions) == y))
    print(f"learned {right}/4 ({right * 25}%) in {result.steps} steps; loss {float(result.final['loss'])!r}")
