"""Rebuild ``digits.h5`` from scikit-learn's bundled copy of the UCI digits set.

Run once by maintainers (``pip install scikit-learn; python hpcnn/datasets/build_digits.py``);
hpcnn itself never imports scikit-learn. The held-out split is a fixed, seeded 20% of the rows so
that every user and every rank count sees the same split.
"""

from pathlib import Path

import h5py
import numpy as np
from sklearn.datasets import load_digits

SPLIT_SEED = 1797
TEST_FRACTION = 0.2


def main() -> None:
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), pixel counts 0..16 -> [0, 1]
    y = bunch.target.astype(np.int32)  # (1797,)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(TEST_FRACTION * len(x)))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    out = Path(__file__).with_name("digits.h5")
    with h5py.File(out, "w", track_order=True) as f:
        f.attrs["format_version"] = 1
        f.attrs["num_classes"] = 10
        f.attrs["source"] = (
            "UCI ML hand-written digits (optical recognition), test set part, "
            "as bundled with scikit-learn (sklearn.datasets.load_digits)"
        )
        f.attrs["licence"] = "CC BY 4.0 (UCI Machine Learning Repository, Alpaydin & Kaynak 1998)"
        f.attrs["preprocessing"] = "pixel counts 0..16 divided by 16; seeded 80/20 train/test split"
        for name, rows in (("", train), ("_test", test)):
            f.create_dataset("x" + name, data=x[rows], compression="gzip", shuffle=True)
            f.create_dataset("y" + name, data=y[rows], compression="gzip", shuffle=True)


if __name__ == "__main__":
    main()
