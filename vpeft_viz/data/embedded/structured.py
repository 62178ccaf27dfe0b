"""Embedded tasks of the structured group (procedural, after CLEVR and dSprites):
count, location, orientation, distance."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from .registry import _task
from .sources import (
    IMAGE_SIZE,
    Splits,
    _colour,
    _noise,
    _sampled_splits,
    _shrink2,
    _to_uint8,
)


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
