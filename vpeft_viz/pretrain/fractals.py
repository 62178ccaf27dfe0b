"""Formula-driven pretraining images, FractalDB style (iterated function systems).

Kataoka et al., ACCV 2020 (https://arxiv.org/abs/2101.08515); Nakashima et al., AAAI 2022
(https://arxiv.org/abs/2103.13023). A class is a system of 2–7 random affine maps whose
attractor fills enough of the frame; instances perturb one parameter of one map and get
random colours, framing and flips. No licence question: the images come from formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .images import IMAGE_SIZE


@dataclass(frozen=True)
class FractalClass:
    """One iterated function system: ``x ← A_i x + t_i`` with map ``i`` drawn with ``probs``."""

    linear: np.ndarray  # (maps, 2, 2)
    shift: np.ndarray  # (maps, 2)
    probs: np.ndarray  # (maps,)


def sample_ifs(rng: np.random.Generator, maps: tuple[int, int] = (2, 7)) -> FractalClass:
    """A random system of 2–7 affine maps with parameters in [-1, 1] (FractalDB).

    Maps whose linear part expands (largest singular value ≥ 1) are rescaled to a random
    contraction in [0.5, 0.95] so every attractor exists; map probabilities follow |det|.
    """
    n = int(rng.integers(maps[0], maps[1] + 1))
    params = rng.uniform(-1, 1, size=(n, 6))
    linear = params[:, :4].reshape(n, 2, 2)
    sigma = np.linalg.svd(linear, compute_uv=False)[:, 0]
    scale = np.where(sigma >= 1, rng.uniform(0.5, 0.95, n) / sigma, 1.0)
    linear = linear * scale[:, None, None]
    det = np.abs(np.linalg.det(linear)) + 1e-3
    return FractalClass(linear, params[:, 4:], det / det.sum())


def chaos_game(systems: list[FractalClass], points: int, rng: np.random.Generator,
               chains: int = 128, burn_in: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Points on each system's attractor, all systems at once.

    Runs ``chains`` independent chains per system for ``burn_in + points / chains``
    iterations (vectorised over systems and chains). Returns ``(B, P, 2)`` points and the
    ``(B, P)`` index of the map that produced each point (used to colour it).
    """
    b = len(systems)
    m = max(len(s.probs) for s in systems)
    linear = np.zeros((b, m, 2, 2))
    shift = np.zeros((b, m, 2))
    cum = np.ones((b, m))
    for i, s in enumerate(systems):
        k = len(s.probs)
        linear[i, :k], shift[i, :k], cum[i, :k] = s.linear, s.shift, np.cumsum(s.probs)
    cum[:, -1] = 1.0
    steps = burn_in + max(1, math.ceil(points / chains))
    choice = (rng.random((steps, b, chains, 1)) > cum[None, :, None, :]).sum(-1)
    choice = np.minimum(choice, m - 1)
    rows = np.arange(b)[:, None]
    x = rng.uniform(-0.5, 0.5, size=(b, chains, 2))
    out, which = [], []
    for t in range(steps):
        c = choice[t]
        x = np.einsum("bkij,bkj->bki", linear[rows, c], x) + shift[rows, c]
        if t >= burn_in:
            out.append(x)
            which.append(c)
    pts = np.stack(out, axis=2).reshape(b, -1, 2)[:, :points]
    idx = np.stack(which, axis=2).reshape(b, -1)[:, :points]
    return pts, idx


def _to_pixels(pts: np.ndarray, size: int, scale: np.ndarray | None = None,
               offset: np.ndarray | None = None) -> np.ndarray:
    """Map each system's points into a ``size`` frame (aspect kept, centred): (B, P) indices."""
    lo, hi = pts.min(axis=1, keepdims=True), pts.max(axis=1, keepdims=True)
    extent = np.maximum((hi - lo).max(axis=2, keepdims=True), 1e-9)
    centre = (lo + hi) / 2
    s = np.ones((len(pts), 1, 1)) if scale is None else scale[:, None, None]
    o = np.zeros((len(pts), 1, 2)) if offset is None else offset[:, None, :]
    u = (pts - centre) / extent * s + 0.5 + o  # in [0, 1] when scale is 1
    ij = np.clip((u * size).astype(np.int64), 0, size - 1)
    return ij[..., 1] * size + ij[..., 0]


def fill_ratio(system: FractalClass, rng: np.random.Generator, size: int = 64,
               points: int = 8192) -> float:
    """Share of a ``size``² frame the system's attractor covers (FractalDB's filling rate)."""
    pts, _ = chaos_game([system], points, rng)
    flat = _to_pixels(pts, size)[0]
    return float(np.unique(flat).size / size**2)


def fractal_classes(n: int, seed: int, fill_min: float = 0.2,
                    max_tries: int = 1000) -> list[FractalClass]:
    """``n`` systems, each kept only if it fills at least ``fill_min`` of the frame."""
    rng = np.random.default_rng([seed, 1])
    kept: list[FractalClass] = []
    tries = 0
    while len(kept) < n:
        tries += 1
        if tries > max_tries * n:
            raise RuntimeError(f"only {len(kept)} of {n} fractal classes fill ≥ {fill_min:.0%}")
        system = sample_ifs(rng)
        if fill_ratio(system, rng) >= fill_min:
            kept.append(system)
    return kept


def render_fractals(classes: list[FractalClass], labels: np.ndarray, rng: np.random.Generator,
                    points: int = 2048, size: int = IMAGE_SIZE) -> np.ndarray:
    """Instances of the given classes as uint8 RGB images ``(B, size, size, 3)``.

    Per instance: one parameter of one map is multiplied by a weight in [0.8, 1.2] (FractalDB's
    intra-class variation), each map gets a random colour over a random background, and the
    attractor is framed at a random scale and offset and flipped at random.
    """
    systems = []
    for y in labels:
        c = classes[int(y)]
        lin, sh = c.linear.copy(), c.shift.copy()
        k, p = rng.integers(len(c.probs)), rng.integers(6)
        w = rng.uniform(0.8, 1.2)
        if p < 4:
            lin[k].flat[p] *= w
            sig = np.linalg.svd(lin[k], compute_uv=False)[0]
            lin[k] *= min(1.0, 0.98 / sig)
        else:
            sh[k, p - 4] *= w
        systems.append(FractalClass(lin, sh, c.probs))
    b = len(systems)
    pts, which = chaos_game(systems, points, rng)
    flip = rng.random((b, 2)) < 0.5
    pts = np.where(flip[:, None, :], -pts, pts)
    scale = rng.uniform(0.7, 1.0, b)
    offset = rng.uniform(-0.15, 0.15, (b, 2)) * (1 - scale[:, None])
    flat = _to_pixels(pts, size, scale, offset) + (np.arange(b) * size * size)[:, None]
    colours = rng.uniform(0, 1, (b, 7, 3))
    point_rgb = colours[np.arange(b)[:, None], which]  # (B, P, 3)
    count = np.bincount(flat.ravel(), minlength=b * size * size).reshape(b, size, size)
    rgb = np.stack([np.bincount(flat.ravel(), point_rgb[..., ch].ravel(), b * size * size)
                    for ch in range(3)], -1).reshape(b, size, size, 3)
    fg = rgb / np.maximum(count, 1)[..., None]
    alpha = 1 - np.exp(-count / rng.uniform(0.5, 3.0, (b, 1, 1)))
    bg = rng.uniform(0, 1, (b, 1, 1, 3)) * rng.uniform(0.2, 1.0, (b, 1, 1, 1))
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return (img * 255).round().astype(np.uint8)
