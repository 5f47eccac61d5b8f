"""The textbook XOR network: 2-4-1, sigmoid units, MSE against the label itself, plain SGD."""

import numpy as np
import pytest

from hpcnn.config import resolve
from hpcnn.core.layers import Dense, Sigmoid
from hpcnn.parallel.comm import Comm
from hpcnn.train import fit

COMMAND = "--data xor --batch-size 4 --hidden 4 --activation sigmoid --output-activation sigmoid --loss mse "
COMMAND += "--optimizer sgd --lr 2 --epochs 1000 --lr-schedule constant --eval-every 0 --run-dir="


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_2_4_1_network_learns_xor(seed):
    cfg = resolve([*COMMAND.split(), "--seed", str(seed)])
    assert cfg.momentum == 0.0  # plain gradient descent
    result = fit(cfg, Comm.serial())
    layers = result.model.layers
    assert [type(layer) for layer in layers] == [Dense, Sigmoid, Dense, Sigmoid]
    assert [(layers[0].fan_in, layers[0].fan_out), (layers[2].fan_in, layers[2].fan_out)] == [(2, 4), (4, 1)]
    out = result.model.forward(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32), train=False)
    assert out.shape == (4, 1) and np.round(out[:, 0]).tolist() == [0, 1, 1, 0]
    assert result.final["split"] == "training" and result.final["accuracy"] == 1.0


def test_cross_entropy_keeps_two_logits():
    argv = ["--data", "xor", "--batch-size", "4", "--hidden", "8", "--epochs", "1", "--run-dir="]
    result = fit(resolve(argv), Comm.serial())
    assert result.model.layers[-1].fan_out == 2
