"""Optional embedded tasks: generated on request, never part of the default suite."""

from __future__ import annotations

import numpy as np

from .registry import _task
from .sources import (
    TRAIN_SIZE,
    Splits,
    _idx_file,
    _stratified_pools,
)

_FASHION_FILES = tuple(f"fashion:{n}" for n in (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


@_task("fashion_mnist", "natural", optional=True,
       classes=("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                "sneaker", "bag", "ankle boot"), test_size=1000,
       description="Zalando clothing photos (28×28 grey), 10 classes; train/val from the "
                   "official train set, test from t10k. Optional, not in the default suite "
                   "(a pretraining source of the embedded backbone).",
       source="Debian package dataset-fashion-mnist (Xiao et al. 2017)", licence="MIT",
       files=_FASHION_FILES)
def _fashion_mnist(seq: np.random.SeedSequence) -> Splits:
    train_x, train_y, test_x, test_y = (_idx_file(ref) for ref in _FASHION_FILES)
    split_rng, *rngs = (np.random.default_rng(s) for s in seq.spawn(3))
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    fit, _ = _stratified_pools(train_y, (100, -1), split_rng)
    (test,) = _stratified_pools(test_y, (100,), split_rng)
    out: Splits = {}
    for split, xs, ys, idx in (("train", train_x, train_y, fit[:TRAIN_SIZE]),
                               ("val", train_x, train_y, fit[TRAIN_SIZE:]),
                               ("test", test_x, test_y, test)):
        padded = np.pad(xs[idx], ((0, 0), (2, 2), (2, 2)))
        out[split] = (np.repeat(padded[..., None], 3, axis=-1), ys[idx])
    return out
