"""Linear centred kernel alignment (CKA) between two sets of representations.

Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019,
https://arxiv.org/abs/1905.00414. For representations X (n × d₁) and Y (n × d₂) of the same
n examples, centred per feature,

    CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F),

the feature-space form of HSIC(XXᵀ, YYᵀ) / √(HSIC(XXᵀ, XXᵀ) · HSIC(YYᵀ, YYᵀ)) with linear
kernels. It is 1 for identical representations, invariant to orthogonal transforms and
isotropic scaling of either side (not to arbitrary invertible linear maps), and in [0, 1].

Here an example is one token of one image, so a layer of 500 images of 65 tokens is 32,500
rows. :class:`StreamingCKA` never holds them: it accumulates the d × d sums batch by batch
(in float64, after subtracting the first batch's mean so the centring does not cancel
catastrophically) and gives the exact value of :func:`linear_cka` on all the rows at the end.
One reference stream (the frozen backbone) is compared with several others (the tuned runs)
at once, so the reference's sums are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (n × d₁) and (n × d₂) representations of the same n examples."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"CKA needs two (n × d) arrays of the same n; got {x.shape} and "
                         f"{y.shape}")
    if len(x) < 2:
        raise ValueError("CKA needs at least two examples")
    x = x - x.mean(0)
    y = y - y.mean(0)
    return _cka(x.T @ x, y.T @ y, y.T @ x)


def _cka(xx: np.ndarray, yy: np.ndarray, yx: np.ndarray) -> float:
    den = np.linalg.norm(xx) * np.linalg.norm(yy)
    if den == 0:
        return float("nan")  # a constant representation: no similarity defined
    return float(np.sum(yx * yx) / den)


class _Moments:
    """Shifted sums of one stream: n, Σ(x − s), Σ(x − s)(x − s)ᵀ."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, x):
        """Add rows ``x`` (torch or numpy, n × d); returns them shifted (float32)."""
        x = _as_float32(x)
        if self.shift is None:
            self.shift = x.mean(0)
            d = x.shape[1]
            self.sum = np.zeros(d)
            self.outer = np.zeros((d, d))
        xs = x - self.shift
        self.n += len(xs)
        self.sum += xs.sum(0, dtype=np.float64)
        self.outer += (xs.T @ xs).astype(np.float64)
        return xs

    def centred(self) -> np.ndarray:
        """Σ over rows of (x − mean)(x − mean)ᵀ."""
        return self.outer - np.outer(self.sum, self.sum) / self.n


def _as_float32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class StreamingCKA:
    """Linear CKA between a reference stream and ``streams`` others, fed batch by batch."""

    def __init__(self, streams: int) -> None:
        self.ref = _Moments()
        self.others = [_Moments() for _ in range(streams)]
        self.cross: list[np.ndarray | None] = [None] * streams

    def add(self, ref, others: Sequence) -> None:
        """Rows of the same examples: ``ref`` (n × d) and one (n × dⱼ) per other stream."""
        if len(others) != len(self.others):
            raise ValueError(f"expected {len(self.others)} streams, got {len(others)}")
        xs = self.ref.add(ref)
        for j, y in enumerate(others):
            ys = self.others[j].add(y)
            if len(ys) != len(xs):
                raise ValueError(f"stream {j} has {len(ys)} rows, the reference {len(xs)}")
            c = (ys.T @ xs).astype(np.float64)
            self.cross[j] = c if self.cross[j] is None else self.cross[j] + c

    def values(self) -> list[float]:
        """CKA of each stream with the reference, on every row added so far."""
        if self.ref.n < 2:
            raise ValueError("CKA needs at least two examples")
        xx = self.ref.centred()
        out = []
        for m, c in zip(self.others, self.cross):
            # Σ(y − ȳ)(x − x̄)ᵀ from shifted sums: C − (Σy)(Σx)ᵀ / n
            yx = c - np.outer(m.sum, self.ref.sum) / self.ref.n
            out.append(_cka(xx, m.centred(), yx))
        return out
