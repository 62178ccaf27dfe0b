"""SCT's salient channels, seen from finished runs: overlaps and class-aware vs plain.

The saliency itself (class-aware CAIS and plain channel norms at each block's ``norm2``
input) and the top-K selection are computed in :mod:`vpeft_viz.methods.sct`, because the
method's ``prepare`` needs them and methods sit below ``analysis/``. A run stores them in
``artifacts/method.npz``; this module compares them:

* :func:`jaccard` / :func:`overlap_matrix`: how many selected channels two tasks share;
* :func:`class_aware_vs_plain`: how much the class-aware selection differs from picking the
  channels with the largest plain activation norm (per block: Jaccard and rank correlation);
* :func:`normalised_scores`: per-block scores scaled to [0, 1] for the block × channel map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..methods.sct import top_channels


@dataclass
class ChannelSelection:
    """One SCT run's stored saliency (depth × width scores, depth × K channels)."""

    class_aware: np.ndarray
    plain: np.ndarray
    channels: np.ndarray
    class_counts: np.ndarray

    @classmethod
    def from_artifacts(cls, arrays: dict[str, np.ndarray]) -> ChannelSelection:
        missing = [k for k in ("channels", "scores_class_aware", "scores_plain")
                   if k not in arrays]
        if missing:
            raise KeyError(f"not an SCT saliency record (missing {', '.join(missing)})")
        counts = arrays.get("class_counts", np.zeros(0, dtype=np.int64))
        return cls(arrays["scores_class_aware"].astype(float), arrays["scores_plain"].astype(float),
                   arrays["channels"].astype(np.int64), np.asarray(counts, dtype=np.int64))

    @property
    def depth(self) -> int:
        return int(self.channels.shape[0])

    @property
    def width(self) -> int:
        return int(self.class_aware.shape[1])

    @property
    def k(self) -> int:
        return int(self.channels.shape[1])

    def plain_channels(self) -> np.ndarray:
        """The top-K channels by plain activation norm (SCT's ablation without classes)."""
        return top_channels(self.plain, self.k)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-block Jaccard index |A ∩ B| / |A ∪ B| of two (depth × K) channel selections."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"selections have {a.shape[0]} and {b.shape[0]} blocks")
    out = np.zeros(a.shape[0])
    for i, (x, y) in enumerate(zip(a, b)):
        sx, sy = set(x.tolist()), set(y.tolist())
        union = len(sx | sy)
        out[i] = len(sx & sy) / union if union else 1.0
    return out


def overlap_matrix(selections: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Mean (over blocks) Jaccard between every pair of selections, e.g. one per task."""
    names = list(selections)
    m = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = float(jaccard(selections[names[i]], selections[names[j]]).mean())
    return names, m


def expected_random_jaccard(width: int, k: int) -> float:
    """Expected Jaccard of two independent uniform K-of-width selections (the chance level):
    the intersection size is hypergeometric."""
    if k >= width:
        return 1.0
    total = math.comb(width, k)
    return sum(math.comb(k, i) * math.comb(width - k, k - i) / total * i / (2 * k - i)
               for i in range(k + 1))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def class_aware_vs_plain(sel: ChannelSelection) -> dict[str, Any]:
    """Per block: Jaccard of the class-aware and plain top-K, and the Spearman correlation
    of the two scores over all channels."""
    plain = sel.plain_channels()
    spearman = np.array([np.corrcoef(_ranks(a), _ranks(b))[0, 1]
                         for a, b in zip(sel.class_aware, sel.plain)])
    only_ca = [sorted(set(a.tolist()) - set(b.tolist())) for a, b in zip(sel.channels, plain)]
    return {"jaccard": jaccard(sel.channels, plain), "spearman": spearman,
            "plain_channels": plain, "only_class_aware": only_ca,
            "chance": expected_random_jaccard(sel.width, sel.k)}


def normalised_scores(scores: np.ndarray) -> np.ndarray:
    """Each block's scores divided by that block's largest (the residual stream grows with
    depth, so raw norms would hide the early blocks)."""
    peak = scores.max(axis=1, keepdims=True)
    return np.divide(scores, peak, out=np.zeros_like(scores, dtype=float), where=peak > 0)


def channel_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every channel within its block (0 = most salient)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(
        scores.shape[0], axis=0), axis=1)
    return ranks
