"""Natural pretraining images: Fashion-MNIST and photographs, both from Debian packages.

Nothing here reads the embedded downstream suite's files
(:data:`vpeft_viz.data.embedded.SOURCE_FILES`); the photo list is checked against it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..data.embedded import FASHION_MNIST_DIR

FASHION_DIR = FASHION_MNIST_DIR  # Debian's dataset-fashion-mnist; one place, in data.embedded
IMAGE_SIZE = 32


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=1)
def load_fashion_mnist(root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 Fashion-MNIST training images (28×28 uint8, read-only) and labels."""
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found at {root}: install the Debian "
                                "package dataset-fashion-mnist (apt-get install "
                                "dataset-fashion-mnist)")
    y = read_idx(labels).astype(np.int64)
    y.flags.writeable = False
    return read_idx(images), y


def tint_fashion(images: np.ndarray, rng: np.random.Generator,
                 size: int = IMAGE_SIZE) -> np.ndarray:
    """Grey 28 px images → RGB ``size`` px: random ink/paper colours, shift and flip."""
    b, h, w = images.shape
    canvas = np.zeros((b, size, size), dtype=np.float64)
    dy, dx = rng.integers(0, size - h + 1, b), rng.integers(0, size - w + 1, b)
    for i in range(b):
        canvas[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] = images[i] / 255.0
    flip = rng.random(b) < 0.5
    canvas[flip] = canvas[flip, :, ::-1]
    ink, paper = rng.uniform(0, 1, (b, 1, 1, 3)), rng.uniform(0, 1, (b, 1, 1, 3))
    img = paper + canvas[..., None] * (ink - paper)
    return (img * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Photographs (Debian wallpaper packages)

# Debian packages of photographs (licences in weights/MODEL_CARD.md) and where they go.
PHOTO_PACKAGES = ("plasma-workspace-wallpapers", "gnome-backgrounds", "mate-backgrounds",
                  "ukui-wallpapers")
PHOTO_ROOTS = (Path("/usr/share/wallpapers"), Path("/usr/share/backgrounds"))
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PHOTO_SIDE = 384  # shorter side each photo is decoded to, once; crops are taken from it
_RESOLUTION_NAME = re.compile(r"^(\d+)x(\d+)$")


def photo_files(roots: tuple[Path, ...] | None = None) -> list[Path]:
    """Every distinct photograph under ``roots`` (default: the wallpaper packages' folders).

    KDE wallpapers ship one picture at several resolutions (``<name>/contents/images/
    1920x1080.jpg``, ...): only the largest of a folder is kept, and previews
    (``screenshot.*``) are skipped, so no picture counts twice. Files with the same bytes as
    a file of the embedded downstream suite (``SOURCE_FILES``) are never returned.
    """
    found: set[Path] = set()
    for root in PHOTO_ROOTS if roots is None else roots:
        if root.is_dir():
            found.update(p.resolve() for p in root.rglob("*")
                         if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()
                         and not p.stem.startswith("screenshot"))
    best: dict[Path, tuple[int, Path]] = {}
    files = []
    for p in sorted(found):
        m = _RESOLUTION_NAME.match(p.stem)
        if m is None:
            files.append(p)
            continue
        area = int(m[1]) * int(m[2])
        if p.parent not in best or area > best[p.parent][0]:
            best[p.parent] = (area, p)
    files += [p for _, p in best.values()]
    banned = _suite_hashes()
    return sorted(p for p in files if _sha256(p) not in banned)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _suite_hashes() -> frozenset[str]:
    """Content hashes of the embedded downstream suite's source files (to keep them out)."""
    from ..data.embedded import SOURCE_FILES, source_path

    paths = (source_path(ref) for ref in SOURCE_FILES)
    return frozenset(_sha256(p) for p in paths if p.exists())


def photo_fingerprint(files: list[Path]) -> str:
    """Identifies a photo set (paths and sizes): a checkpoint refuses to resume on another."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _decode(path: Path, side: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, much faster
        img = img.convert("RGB")
        scale = side / min(img.size)
        if scale < 1:
            img = img.resize((max(side, round(img.width * scale)),
                              max(side, round(img.height * scale))), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def photo_cache_dir() -> Path:
    """``$VPEFT_VIZ_CACHE/pretrain``, else ``~/.cache/vpeft_viz/pretrain`` (never the repo)."""
    base = os.environ.get("VPEFT_VIZ_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "vpeft_viz") \
        / "pretrain"


@functools.lru_cache(maxsize=2)
def load_photos(files: tuple[Path, ...], side: int = PHOTO_SIDE) -> tuple[np.ndarray, ...]:
    """The photos decoded to a shorter side of ``side`` px (uint8 RGB), decoded only once.

    Decoding the full-size wallpapers takes minutes, so the result is kept in a ``.npz`` in
    :func:`photo_cache_dir`, keyed by the photo set's fingerprint and ``side``.
    """
    if not files:
        raise FileNotFoundError(
            "no photographs found: install the Debian packages "
            + " ".join(PHOTO_PACKAGES) + " (apt-get install ...), which fill "
            + " and ".join(map(str, PHOTO_ROOTS)))
    cache = photo_cache_dir() / f"photos_{photo_fingerprint(list(files))}_{side}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return tuple(z[f"p{i}"] for i in range(len(files)))
    photos = tuple(_decode(p, side) for p in files)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"p{i}": a for i, a in enumerate(photos)})
    os.replace(tmp, cache)
    return photos


def crop_photos(photos: tuple[np.ndarray, ...], n: int, rng: np.random.Generator,
                sizes: tuple[int, ...], min_scale: float = 0.1) -> list[np.ndarray]:
    """``n`` random square crops, each resized to every size in ``sizes``: uint8 arrays.

    A crop's side is a share of the photo's shorter side drawn log-uniformly in
    [``min_scale``, 1] (multi-scale: whole scenes down to details), at a uniform position,
    flipped left-right half of the time. Each size is resampled from the photo itself
    (bilinear, antialiased when shrinking), so the teacher's larger input is sharper than
    an upsampling of the student's.
    """
    from PIL import Image

    which = rng.integers(0, len(photos), n)
    scale = np.exp(rng.uniform(np.log(min_scale), 0.0, n))
    pos = rng.random((n, 2))
    flip = rng.random(n) < 0.5
    out = [np.empty((n, s, s, 3), dtype=np.uint8) for s in sizes]
    for i in range(n):
        photo = photos[which[i]]
        h, w = photo.shape[:2]
        side = max(1.0, scale[i] * min(h, w))
        x0, y0 = pos[i, 0] * (w - side), pos[i, 1] * (h - side)
        img = Image.fromarray(photo)
        for arr, s in zip(out, sizes):
            crop = np.asarray(img.resize((s, s), Image.BILINEAR,
                                         box=(x0, y0, x0 + side, y0 + side)))
            arr[i] = crop[:, ::-1] if flip[i] else crop
    return out
