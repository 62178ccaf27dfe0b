"""Embedded tasks of the specialized group: histology, retinopathy, faces."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from .registry import _task
from .sources import (
    IMAGE_SIZE,
    TRAIN_SIZE,
    VAL_SIZE,
    Splits,
    _balanced_labels,
    _dihedral,
    _noise,
    _picture,
    _rotated_crop,
    _sampled_splits,
    _shrink2,
    _stratified_pools,
    _to_uint8,
    source_path,
)

_IHC_CENTRE, _IHC_CONTEXT = 20, 56  # windows (slide pixels) for the label and its context
_IHC_COLS = {"fit": (0, 232), "test": (280, 512)}  # disjoint halves of the slide


@functools.lru_cache(maxsize=1)
def _ihc_centres() -> dict[tuple[str, int, bool], np.ndarray]:
    """Patch centres (y, x) per (region, label, hard): label 1 where at least half of the
    central 20×20 pixels are stained brown by DAB (colour deconvolution, Ruifrok 2001), 0
    where at most a tenth are; *hard* when the wider 56×56 context leans the other way."""
    from scipy.ndimage import uniform_filter
    from skimage.color import rgb2hed

    dab = rgb2hed(np.asarray(_picture("skimage:ihc.png", "RGB")))[..., 2] > 0.04
    centre = uniform_filter(dab.astype(np.float32), _IHC_CENTRE)
    context = uniform_filter(dab.astype(np.float32), _IHC_CONTEXT)
    margin = 47  # fits the largest rotated patch (64 px) around any centre
    out = {}
    for region, (c0, c1) in _IHC_COLS.items():
        inside = np.zeros(dab.shape, bool)
        inside[margin:-margin, c0 + margin:c1 - margin] = True
        for label, is_label, hard in ((1, centre >= 0.5, context < 0.55),
                                      (0, centre <= 0.1, context >= 0.2)):
            for h in (False, True):
                keep = inside & is_label & (hard if h else ~hard)
                out[region, label, h] = np.argwhere(keep)
    return out


def _stain_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vary haematoxylin / eosin / DAB amounts (HED stain augmentation, Tellez et al. 2018,
    https://arxiv.org/abs/1902.06543), DAB down to a fifth, then desaturate by a random
    amount: colour alone no longer gives the label away."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.clip(rgb / 255, 0, 1))
    scale = np.r_[rng.uniform(0.5, 1.5, 2), rng.uniform(0.2, 1.2)]
    rgb = hed2rgb(hed * scale + rng.uniform(-0.02, 0.02, 3)) * 255
    grey = rgb.mean(-1, keepdims=True)
    return grey + (rgb - grey) * rng.uniform(0, 1)


@_task("histology", "specialized", classes=("DAB-negative", "DAB-positive"), test_size=1000,
       description="PatchCamelyon-like: is the centre of a colon-tissue patch stained brown "
                   "(DAB)? Half the patches have context that says the opposite; stains "
                   "jittered. Test patches from the slide's right 45%, train/val its left 45%.",
       source="scikit-image data.immunohistochemistry (CMMI)",
       licence="no known copyright restrictions", files=("skimage:ihc.png",))
def _histology(seq: np.random.SeedSequence) -> Splits:
    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        centres = _ihc_centres()[region, label, bool(rng.random() < 0.5)]
        cy, cx = centres[rng.integers(len(centres))] + rng.uniform(0, 1, 2)
        side = int(rng.integers(36, 64, endpoint=True))
        rgb = _rotated_crop(_picture("skimage:ihc.png", "RGB"), cx, cy, side, rng.uniform(0, 360))
        return _noise(_stain_jitter(_dihedral(rgb, rng), rng), rng, (1, 4))

    return _sampled_splits(seq, 2, 1000, sample)


@functools.lru_cache(maxsize=1)
def _fundus() -> tuple[Image.Image, np.ndarray]:
    """The fundus photo at half size (705 px: patches are shrunk to 64 px anyway) and the
    summed-area table of its dark border (0 over a box: the box is all eye)."""
    pic = _picture("skimage:retina.jpg", "RGB").reduce(2)
    outside = (np.asarray(pic, dtype=np.int32).sum(-1) < 90).astype(np.int64)
    return pic, np.pad(outside.cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _inside_fundus(x0: int, y0: int, x1: int, y1: int) -> bool:
    s = _fundus()[1]
    return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0] == 0


_LESION = {  # colour, alpha, radius range on the 64 px canvas
    "microaneurysm": (np.array([95.0, 8.0, 12.0]), 0.9, (1.3, 2.2)),
    "haemorrhage": (np.array([110.0, 15.0, 10.0]), 0.75, (3.0, 5.5)),
    "exudate": (np.array([240.0, 215.0, 110.0]), 0.85, (1.2, 2.4)),
}
_GRADES = {  # lesions per grade: counts drawn uniformly from each (low, high)
    0: {},
    1: {"microaneurysm": (1, 3)},
    2: {"microaneurysm": (4, 9), "haemorrhage": (0, 1)},
    3: {"microaneurysm": (2, 6), "haemorrhage": (2, 4), "exudate": (3, 8)},
}


def _draw_lesions(canvas: np.ndarray, grade: int, rng: np.random.Generator) -> np.ndarray:
    n = canvas.shape[0]
    for kind, (low, high) in _GRADES[grade].items():
        colour, alpha, (r_lo, r_hi) = _LESION[kind]
        for _ in range(int(rng.integers(low, high, endpoint=True))):
            cx, cy = rng.uniform(5, n - 5, 2)
            r = rng.uniform(r_lo, r_hi)
            aspect = rng.uniform(0.7, 1.3)
            x0, y0 = max(int(cx - 2 * r) - 1, 0), max(int(cy - 2 * r) - 1, 0)
            x1, y1 = min(int(cx + 2 * r) + 2, n), min(int(cy + 2 * r) + 2, n)
            yy, xx = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
            d = np.hypot((xx - cx) / aspect, (yy - cy) * aspect)
            a = alpha * np.clip(r + 0.5 - d, 0, 1)[..., None]  # soft edge, one pixel wide
            patch = canvas[y0:y1, x0:x1]
            canvas[y0:y1, x0:x1] = patch * (1 - a) + colour * rng.uniform(0.85, 1.15) * a
    return canvas


@_task("retinopathy", "specialized",
       classes=("none", "mild", "moderate", "severe"), test_size=1000,
       description="Diabetic-retinopathy-like grade of fundus patches with drawn lesions: none; "
                   "1–3 microaneurysms; 4–9 (+ haemorrhage); haemorrhages and exudates. Test "
                   "patches from the photo's lower part, train/val its upper part.",
       source="scikit-image data.retina (Häggström 2014, Wikimedia Commons) + drawn lesions",
       licence="CC0 1.0", files=("skimage:retina.jpg",))
def _retinopathy(seq: np.random.SeedSequence) -> Splits:
    rows = {"fit": (0, 320), "test": (385, 705)}  # of the half-size photo

    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        pic = _fundus()[0]
        r0, r1 = rows[region]
        while True:
            side = int(rng.integers(50, 90, endpoint=True))
            half = side * math.sqrt(0.5) + 2
            cx = rng.uniform(half, pic.width - half)
            cy = rng.uniform(r0 + half, r1 - half)
            box = [int(cx - half), int(cy - half), int(cx + half) + 1, int(cy + half) + 1]
            if _inside_fundus(*box):
                break
        canvas = _rotated_crop(pic, cx, cy, side, rng.uniform(0, 360), out=2 * IMAGE_SIZE)
        canvas = _draw_lesions(canvas * rng.uniform(0.8, 1.15), label, rng)
        return _noise(_shrink2(canvas), rng, (1, 4))

    return _sampled_splits(seq, len(_GRADES), 1000, sample)


@_task("faces", "specialized", classes=("non-face", "face"), test_size=800,
       description="Face or background crop from LFW (25×25 grey): 200 source images, split "
                   "96 / 24 / 80 between train, val and test, each seen through ~8–10 random "
                   "crops, turns, flips and contrast changes.",
       source="scikit-image data.lfw_subset (Labeled Faces in the Wild, Huang et al.)",
       licence="LFW: no explicit licence (research use); scikit-image BSD-3-Clause",
       files=("skimage:lfw_subset.npy",))
def _faces(seq: np.random.SeedSequence) -> Splits:
    stack = np.load(source_path("skimage:lfw_subset.npy"))  # 100 faces, then 100 non-faces
    source_labels = np.repeat([1, 0], 100)
    split_rng, *rngs = (np.random.default_rng(s) for s in seq.spawn(4))
    pools = _stratified_pools(source_labels, (48, 12, 40), split_rng)
    out: Splits = {}
    for (split, n), pool, rng in zip((("train", TRAIN_SIZE), ("val", VAL_SIZE), ("test", 800)),
                                     pools, rngs):
        by_class = [pool[source_labels[pool] == k] for k in (0, 1)]
        labels = _balanced_labels(n, 2, rng)
        used = [0, 0]
        images = []
        for y in labels:
            src = stack[by_class[y][used[y] % len(by_class[y])]]
            used[y] += 1
            # reflect-padded, so turned crops have no empty corners
            pic = Image.fromarray(np.pad(src, 8, mode="reflect").astype(np.float32), "F")
            side = int(rng.integers(16, 25, endpoint=True))
            cx, cy = 8 + side / 2 + rng.integers(0, 25 - side, 2, endpoint=True)
            g = _rotated_crop(pic, cx, cy, side, rng.uniform(-20, 20))
            g = g[:, ::-1] if rng.random() < 0.5 else g
            g = np.clip((g - g.mean()) * rng.uniform(0.5, 1.5) + rng.uniform(0.3, 0.7), 0, 1)
            g = g ** rng.uniform(0.6, 1.6)
            images.append(_to_uint8(_noise(np.repeat(g[..., None] * 255, 3, -1), rng, (1, 5))))
        out[split] = (np.stack(images), labels)
    return out
