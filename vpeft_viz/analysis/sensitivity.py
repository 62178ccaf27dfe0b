"""SPT's sensitivity, seen from a finished run: live re-allocation, layouts and shares.

The sensitivity itself (``Σ g²`` per weight) and the allocation rule are computed in
:mod:`vpeft_viz.methods.spt`, because the method's ``prepare`` needs them and methods sit
below ``analysis/`` (imports point down only). This module holds what only the views need,
working from the compact record a run stores in ``artifacts/method.npz`` (see the
``methods.spt`` docstring): a *count table* — how many weights of each matrix/vector lie above
~1,500 global thresholds — and each matrix's pooled, log-quantised sensitivity image.

* :func:`reallocate` re-runs SPT's allocation rule (the same :func:`allocation_costs`) at any
  budget from the count table, in microseconds: the slider of the SPT page. A budget is met at
  the nearest grid threshold (grid points are < 1% apart in sensitive weights); the run's own
  allocation is available exactly via :func:`run_layout`.
* :func:`block_op_grid`, :func:`sensitive_shares` give the block × matrix heat-map and the
  shares of sensitive weights per depth and per operation (the SPT paper's figures).
* :func:`matrix_image` decodes one matrix's sensitivity image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..methods.spt import BUDGET_TOLERANCE, MATRIX_OPS, allocation_costs

VECTOR_OPS = ("norm1", "norm2", "norm")


@dataclass
class SensitivityMap:
    """One SPT run's stored sensitivity record (arrays from ``method.npz``)."""

    names: np.ndarray  # (U,) unit names
    blocks: np.ndarray  # (U,) block index, -1 for the final norm
    ops: np.ndarray  # (U,) q k v proj fc1 fc2 norm1 norm2 norm
    is_matrix: np.ndarray  # (U,) bool
    numel: np.ndarray  # (U,)
    rows: np.ndarray
    cols: np.ndarray
    structured_cost: np.ndarray  # (U,) cost of the run's structured module (or the vector)
    score_sum: np.ndarray  # (U,) Σ sensitivity over the unit
    grid_threshold: np.ndarray  # (J,) thresholds, descending
    grid_counts: np.ndarray  # (U, J) entries ≥ threshold per unit
    image_range: tuple[float, float]  # log10 range of the uint8 image codes
    images: dict[str, np.ndarray]  # matrix name → uint8 codes (0: zero sensitivity)
    alloc_counts: np.ndarray  # (U,) the run's own allocation
    alloc_structured: np.ndarray
    alloc_threshold: float
    target: int
    used: int
    cls_token: int
    alpha: float
    beta: float

    @classmethod
    def from_artifacts(cls, arrays: dict[str, np.ndarray]) -> SensitivityMap:
        missing = [k for k in ("grid/counts", "units/name", "allocation/count")
                   if k not in arrays]
        if missing:
            raise KeyError(f"not an SPT sensitivity record (missing {', '.join(missing)})")
        a = arrays
        lo, hi = (float(v) for v in a["image/log10_range"])
        alpha, beta = (float(v) for v in a["allocation/alpha_beta"])
        target, used = (int(v) for v in a["allocation/budget"])
        return cls(
            names=a["units/name"].astype(str), blocks=a["units/block"].astype(int),
            ops=a["units/op"].astype(str), is_matrix=a["units/is_matrix"].astype(bool),
            numel=a["units/numel"].astype(np.int64), rows=a["units/rows"].astype(np.int64),
            cols=a["units/cols"].astype(np.int64),
            structured_cost=a["units/structured_cost"].astype(np.int64),
            score_sum=a["units/score_sum"].astype(float),
            grid_threshold=a["grid/threshold"].astype(np.float32),
            grid_counts=a["grid/counts"].astype(np.int64), image_range=(lo, hi),
            images={k[len("image/"):]: v for k, v in a.items()
                    if k.startswith("image/") and k != "image/log10_range"},
            alloc_counts=a["allocation/count"].astype(np.int64),
            alloc_structured=a["allocation/structured"].astype(bool),
            alloc_threshold=float(a["allocation/threshold"]), target=target, used=used,
            cls_token=int(a["allocation/cls_token"]), alpha=alpha, beta=beta)

    @property
    def depth(self) -> int:
        return int(self.blocks.max()) + 1 if self.blocks.size else 0

    @property
    def scored_weights(self) -> int:
        return int(self.numel.sum())

    def matrix_names(self) -> list[str]:
        return [str(n) for n, m in zip(self.names, self.is_matrix) if m]


@dataclass
class Layout:
    """An allocation: what each unit gets, what it costs, and how close to the target."""

    target: int
    used: int
    reachable: bool
    threshold: float
    counts: np.ndarray  # (U,) sensitive entries per unit
    structured: np.ndarray  # (U,) bool
    costs: np.ndarray  # (U,) parameters spent per unit
    cls_token: int
    exact: bool  # the run's own allocation (True) or a grid re-allocation (False)

    def breakdown(self, smap: SensitivityMap) -> dict[str, int]:
        m, st = smap.is_matrix, self.structured
        return {"unstructured": int(self.costs[~st].sum()),
                "structured_matrices": int(self.costs[st & m].sum()),
                "structured_vectors": int(self.costs[st & ~m].sum()),
                "cls_token": self.cls_token, "total": self.used}

    @property
    def sensitive(self) -> int:
        return int(self.counts.sum())


def budget_curve(smap: SensitivityMap, alpha: float | None = None, beta: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(sensitive weights selected, budget used) along the grid, starting from nothing."""
    alpha = smap.alpha if alpha is None else alpha
    beta = smap.beta if beta is None else beta
    costs, _ = allocation_costs(smap.grid_counts, smap.numel, smap.structured_cost,
                                smap.is_matrix, alpha, beta)
    totals = smap.cls_token + costs.sum(axis=0)
    selected = smap.grid_counts.sum(axis=0)
    return (np.concatenate([[0], selected]).astype(np.int64),
            np.concatenate([[smap.cls_token], totals]).astype(np.int64))


def reachable_range(smap: SensitivityMap) -> tuple[int, int]:
    _, totals = budget_curve(smap)
    return int(totals.min()), int(totals.max())


def reallocate(smap: SensitivityMap, budget: int, *, alpha: float | None = None,
               beta: float | None = None, tolerance: float = BUDGET_TOLERANCE) -> Layout:
    """SPT's allocation at ``budget`` from the stored count table (no scores, no training).

    Picks the grid threshold whose budget is nearest the target (ties: the smaller); the
    result says whether that is within ``tolerance`` (else its ``used`` is the nearest
    reachable budget on the grid).
    """
    alpha = smap.alpha if alpha is None else alpha
    beta = smap.beta if beta is None else beta
    zero = np.zeros((smap.names.size, 1), dtype=np.int64)
    counts = np.concatenate([zero, smap.grid_counts], axis=1)
    costs, structured = allocation_costs(counts, smap.numel, smap.structured_cost,
                                         smap.is_matrix, alpha, beta)
    totals = smap.cls_token + costs.sum(axis=0)
    j = int(np.lexsort((totals, np.abs(totals - budget)))[0])
    used = int(totals[j])
    threshold = float("inf") if j == 0 else float(smap.grid_threshold[j - 1])
    return Layout(target=int(budget), used=used,
                  reachable=abs(used - budget) <= tolerance * budget, threshold=threshold,
                  counts=counts[:, j], structured=structured[:, j], costs=costs[:, j],
                  cls_token=smap.cls_token, exact=False)


def run_layout(smap: SensitivityMap) -> Layout:
    """The allocation the run actually trained (exact, from the full scores)."""
    costs, structured = allocation_costs(smap.alloc_counts, smap.numel, smap.structured_cost,
                                         smap.is_matrix, smap.alpha, smap.beta)
    return Layout(target=smap.target, used=smap.used,
                  reachable=abs(smap.used - smap.target) <= BUDGET_TOLERANCE * smap.target,
                  threshold=smap.alloc_threshold, counts=smap.alloc_counts,
                  structured=smap.alloc_structured, costs=costs, cls_token=smap.cls_token,
                  exact=True)


def block_op_grid(smap: SensitivityMap, layout: Layout) -> dict[str, Any]:
    """The block × matrix table of the heat-map: sensitive counts, sizes, structured cells."""
    depth, n_ops = smap.depth, len(MATRIX_OPS)
    counts = np.zeros((depth, n_ops), dtype=np.int64)
    numel = np.zeros((depth, n_ops), dtype=np.int64)
    structured = np.zeros((depth, n_ops), dtype=bool)
    costs = np.zeros((depth, n_ops), dtype=np.int64)
    for i in np.flatnonzero(smap.is_matrix):
        b, o = smap.blocks[i], MATRIX_OPS.index(smap.ops[i])
        counts[b, o] = layout.counts[i]
        numel[b, o] = smap.numel[i]
        structured[b, o] = layout.structured[i]
        costs[b, o] = layout.costs[i]
    return {"ops": list(MATRIX_OPS), "counts": counts, "numel": numel,
            "structured": structured, "costs": costs,
            "density": np.divide(counts, numel, out=np.zeros(counts.shape), where=numel > 0)}


def sensitive_shares(smap: SensitivityMap, layout: Layout) -> dict[str, Any]:
    """Share of the sensitive weights per depth and per operation (matrices and vectors).

    ``share`` is each group's part of all sensitive weights; ``density`` the part of the
    group's own weights that is sensitive.
    """
    total = max(layout.sensitive, 1)
    depth_labels = [f"block {b}" for b in range(smap.depth)] + (
        ["final norm"] if (smap.blocks < 0).any() else [])
    depth_keys = list(range(smap.depth)) + ([-1] if (smap.blocks < 0).any() else [])
    op_labels = [o for o in (*MATRIX_OPS, "norm1", "norm2", "norm") if o in set(smap.ops)]

    def group(keys, values):
        counts = np.array([layout.counts[values == k].sum() for k in keys], dtype=np.int64)
        sizes = np.array([smap.numel[values == k].sum() for k in keys], dtype=np.int64)
        return {"count": counts, "share": counts / total,
                "density": np.divide(counts, sizes, out=np.zeros(len(keys)), where=sizes > 0)}

    return {"depth": {"labels": depth_labels, **group(depth_keys, smap.blocks)},
            "op": {"labels": op_labels, **group(op_labels, smap.ops)}}


def matrix_image(smap: SensitivityMap, name: str) -> dict[str, Any]:
    """One matrix's pooled sensitivity as log10 values (NaN where zero), with its pooling."""
    if name not in smap.images:
        raise KeyError(f"no sensitivity image for {name!r}")
    codes = smap.images[name]
    lo, hi = smap.image_range
    log10 = np.where(codes > 0, lo + (codes.astype(float) - 1) / 254 * (hi - lo), np.nan)
    i = int(np.flatnonzero(smap.names == name)[0])
    rows, cols = int(smap.rows[i]), int(smap.cols[i])
    return {"log10": log10, "rows": rows, "cols": cols,
            "row_step": -(-rows // codes.shape[0]), "col_step": -(-cols // codes.shape[1]),
            "threshold_log10": float(np.log10(smap.alloc_threshold))
            if smap.alloc_threshold > 0 else None}


def structured_overlap(a: Layout, b: Layout, smap_a: SensitivityMap,
                       smap_b: SensitivityMap) -> float | None:
    """Jaccard overlap of the structured matrices of two layouts (same architecture)."""
    if smap_a.names.shape != smap_b.names.shape or (smap_a.names != smap_b.names).any():
        return None
    sa, sb = a.structured & smap_a.is_matrix, b.structured & smap_b.is_matrix
    union = int((sa | sb).sum())
    return float((sa & sb).sum() / union) if union else None
