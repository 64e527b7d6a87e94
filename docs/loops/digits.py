"""The loops' data: 8x8 synthetic digits standing in for MNIST (Flax's examples read theirs
through an input pipeline module of their own; this is that module here)."""

import numpy as np


def digits(n, seed):
    """``n`` images and labels: class k lights pixel row k % 8 (and a column for k >= 8) on a
    zero background, as MNIST's strokes are, so that ReLU units sit on their kink at
    initialization."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 8, 8, 1), np.float32)
    for i, k in enumerate(labels):
        images[i, k % 8, 1:7, 0] = rng.uniform(0.6, 1.0, 6)
        if k >= 8:
            images[i, 1:7, k - 6, 0] = rng.uniform(0.6, 1.0, 6)
    return images, labels
