"""MNIST with 10 labeled digits per class, as elbo reads it: the semi-supervised quality scripts
(scripts/m2_twin.py, scripts/m1m2_quality.sh) pick the same labeled digits for the same seed.

Writes WORK/{x,y}_{train,test}.npy (uint8 images, int64 labels; training labels -1 where a
digit counts as unlabeled), which `elbo data convert --format npy` reads.

Usage: python scripts/mnist_subset.py MNIST_DIR WORK SEED
"""

import gzip
import os
import sys

import numpy as np

CLASSES, PER_CLASS = 10, 10


def idx(path, header):
    with gzip.open(path) as f:
        return np.frombuffer(f.read()[header:], dtype=np.uint8)


def load(mnist, split):
    x = idx(os.path.join(mnist, f"{split}-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
    y = idx(os.path.join(mnist, f"{split}-labels-idx1-ubyte.gz"), 8).astype(np.int64)
    return x, y


def write(mnist, work, seed):
    """Writes the data for elbo; returns (x_train, partial labels, the labeled rows, x_test, y_test)."""
    rng = np.random.RandomState(seed)
    x_train, y_train = load(mnist, "train")
    x_test, y_test = load(mnist, "t10k")
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_train == c), PER_CLASS, replace=False)
            for c in range(CLASSES)
        ]
    )
    partial = np.full_like(y_train, -1)
    partial[chosen] = y_train[chosen]
    os.makedirs(work, exist_ok=True)
    arrays = {"x_train": x_train, "y_train": partial, "x_test": x_test, "y_test": y_test}
    for name, array in arrays.items():
        np.save(os.path.join(work, f"{name}.npy"), array)
    return x_train, partial, chosen, x_test, y_test


if __name__ == "__main__":
    if len(sys.argv) != 4 or not sys.argv[3].isdigit():
        sys.exit(__doc__.strip().splitlines()[-1] + "\n(expected MNIST_DIR, WORK and a seed ≥ 0)")
    write(sys.argv[1], sys.argv[2], int(sys.argv[3]))
