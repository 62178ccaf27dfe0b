"""What an SPT run stores: the state that rebuilds its modules, and the compact record of
the sensitivity scores its views read (count table and pooled matrix images).

See :mod:`vpeft_viz.methods.spt` for the method as a whole.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .allocation import Allocation, SortedScores, encode_indices
from .scoring import NORM_OPS, SensitivityInfo, Unit, structured_cost

# 2: the modules follow the released code (sparse deltas only in linear layers, proj's adapter
# on its input). A version-1 state was trained with sparse LayerNorm deltas and every adapter
# after its matrix; loading one rebuilds those modules (see ``_SPT.load_state``).
STATE_VERSION = 2
GRID_POINTS = 1500  # thresholds in the stored count table
IMAGE_MAX_SIDE = 192  # matrix images are mean-pooled down to at most this many cells a side


def allocation_state(alloc: Allocation, units: list[Unit], info: SensitivityInfo | None,
                     *, auto: bool, train_sparse_layernorm: bool = False) -> dict[str, Any]:
    """JSON that rebuilds the modules exactly: per tuned unit, structured or its indices.

    ``budget.used`` counts every allocated entry, as the release does; the sparse LayerNorm
    entries among them stay frozen unless ``train_sparse_layernorm``, so ``budget.trained``
    (= used − frozen_layernorm) is what the run really trains.
    """
    frozen = 0 if train_sparse_layernorm else sum(
        alloc.costs[u.name] for u in units
        if u.op in NORM_OPS and not alloc.structured[u.name])
    state_units = {}
    for u in units:
        if alloc.structured[u.name]:
            state_units[u.name] = {"structured": True, "count": alloc.counts[u.name]}
        elif alloc.counts[u.name]:
            state_units[u.name] = {"structured": False, "count": alloc.counts[u.name],
                                   "indices": encode_indices(alloc.indices[u.name])}
    return {
        "version": STATE_VERSION,
        "units": state_units,
        "threshold": alloc.threshold,
        "budget": {"target": alloc.target, "used": alloc.used, "reachable": alloc.reachable,
                   "auto": auto, **alloc.breakdown(units), "frozen_layernorm": frozen,
                   "trained": alloc.used - frozen},
        "sensitivity": info.to_dict() if info is not None else None,
    }


def sensitivity_summary(table: SortedScores, kind: str, rank: int, *,
                        points: int = GRID_POINTS, image_side: int = IMAGE_MAX_SIDE
                        ) -> dict[str, np.ndarray]:
    """The compact record of the scores the views need (see the module docstring)."""
    units, arrays = table.units, table.raw
    n = table.num_positive()
    ks = np.unique(np.round(np.geomspace(1, n, points)).astype(np.int64))
    thresholds = table.kth_largest(ks)  # descending in k
    counts = table.counts(thresholds).astype(np.int32)
    out: dict[str, np.ndarray] = {
        "units/name": np.array([u.name for u in units]),
        "units/block": np.array([u.block for u in units], dtype=np.int16),
        "units/op": np.array([u.op for u in units]),
        "units/is_matrix": np.array([u.is_matrix for u in units]),
        "units/numel": np.array([u.numel for u in units], dtype=np.int64),
        "units/rows": np.array([u.shape[0] for u in units], dtype=np.int64),
        "units/cols": np.array([u.shape[1] if u.is_matrix else 1 for u in units], np.int64),
        "units/structured_cost": np.array([structured_cost(u, kind, rank) for u in units],
                                          dtype=np.int64),
        "units/score_sum": np.array([float(a.astype(np.float64).sum()) for a in arrays]),
        "grid/k": ks,
        "grid/threshold": thresholds.astype(np.float32),
        "grid/counts": counts,
    }
    images = {u.name: _pool(a.reshape(u.shape), image_side)
              for u, a in zip(units, arrays) if u.is_matrix}
    logs = [np.log10(im[im > 0]) for im in images.values() if (im > 0).any()]
    hi = max((float(v.max()) for v in logs), default=0.0)
    lo = min((float(v.min()) for v in logs), default=hi - 1.0)
    lo = max(lo, hi - 12.0)
    if hi - lo < 1e-6:
        lo = hi - 1.0
    out["image/log10_range"] = np.array([lo, hi], dtype=np.float32)
    for name, im in images.items():
        with np.errstate(divide="ignore"):
            z = (np.log10(im) - lo) / (hi - lo)
        code = np.where(im > 0, 1 + np.round(254 * np.clip(z, 0, 1)), 0)
        out[f"image/{name}"] = code.astype(np.uint8)
    return out


def _pool_factor(n: int, side: int) -> int:
    """The smallest pooling factor that brings ``n`` to at most ``side`` cells, preferring
    one that divides ``n`` (so every cell averages the same number of weights)."""
    need = math.ceil(n / side)
    for f in range(need, 2 * need + 1):
        if n % f == 0:
            return f
    return need


def _pool(a: np.ndarray, side: int) -> np.ndarray:
    """Mean-pool a 2-D array so that neither side exceeds ``side`` (ragged edges averaged)."""
    rows, cols = a.shape
    fr, fc = _pool_factor(rows, side), _pool_factor(cols, side)
    if rows % fr == 0 and cols % fc == 0:
        return a.reshape(rows // fr, fr, cols // fc, fc).mean(axis=(1, 3), dtype=np.float64)
    pr, pc = math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc
    padded = np.full((pr, pc), np.nan)
    padded[:rows, :cols] = a
    return np.nanmean(padded.reshape(pr // fr, fr, pc // fc, fc), axis=(1, 3))


def allocation_arrays(alloc: Allocation, units: list[Unit], alpha: float,
                      beta: float) -> dict[str, np.ndarray]:
    """The run's own allocation, per unit, for the views (the exact one, not the grid's)."""
    return {
        "allocation/count": np.array([alloc.counts[u.name] for u in units], dtype=np.int64),
        "allocation/structured": np.array([alloc.structured[u.name] for u in units]),
        "allocation/cost": np.array([alloc.costs[u.name] for u in units], dtype=np.int64),
        "allocation/threshold": np.array(alloc.threshold, dtype=np.float32),
        "allocation/budget": np.array([alloc.target, alloc.used], dtype=np.int64),
        "allocation/cls_token": np.array(alloc.cls_token, dtype=np.int64),
        "allocation/alpha_beta": np.array([alpha, beta], dtype=np.float64),
    }
