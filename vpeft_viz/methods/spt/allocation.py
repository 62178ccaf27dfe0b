"""SPT step 2: global-threshold allocation of a parameter budget over the scored units.

See :mod:`vpeft_viz.methods.spt` for the method as a whole.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ...config import ConfigError
from .scoring import Unit, structured_cost

BUDGET_TOLERANCE = 0.02  # relative distance to the target a reachable budget may have


class BudgetError(ConfigError):
    """The parameter budget cannot be met within the tolerance; names the nearest ones."""


def allocation_costs(counts: np.ndarray, numel: np.ndarray, cost: np.ndarray,
                     is_matrix: np.ndarray, alpha: float, beta: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Parameters spent per unit, and whether it goes structured, given its sensitive count.

    ``counts`` is (units,) or (units, thresholds); the other arrays are per unit. A matrix
    goes structured at ``count ≥ cost/α`` (then it costs ``cost``), a vector at
    ``count ≥ dim/β`` (then it costs ``dim``); otherwise a unit costs its count.
    """
    counts = np.asarray(counts)
    extra = (slice(None),) + (None,) * (counts.ndim - 1)
    numel, cost, is_matrix = (np.asarray(a)[extra] for a in (numel, cost, is_matrix))
    whole = np.where(is_matrix, cost, numel)
    bar = np.where(is_matrix, cost / alpha, numel / beta)
    structured = (counts > 0) & (counts >= bar)
    return np.where(structured, whole, counts), structured


@dataclass
class Allocation:
    """Which units are structured, which entries are sparse-tuned, and what it costs."""

    target: int
    threshold: float
    cls_token: int
    counts: dict[str, int]  # sensitive entries per unit
    structured: dict[str, bool]
    costs: dict[str, int]  # parameters spent per unit
    indices: dict[str, np.ndarray]  # sparse units: flat indices inside the unit
    reachable: bool = True

    @property
    def used(self) -> int:
        return self.cls_token + sum(self.costs.values())

    def breakdown(self, units: list[Unit]) -> dict[str, int]:
        out = {"unstructured": 0, "structured_matrices": 0, "structured_vectors": 0,
               "cls_token": self.cls_token}
        for u in units:
            if self.structured[u.name]:
                out["structured_matrices" if u.is_matrix else "structured_vectors"] += \
                    self.costs[u.name]
            else:
                out["unstructured"] += self.costs[u.name]
        return out


def _float_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _bits_float(b: int) -> float:
    return float(np.array(b, dtype=np.int32).view(np.float32))


class SortedScores:
    """Every unit's scores sorted (ascending): how many lie above any threshold, by bisection.

    Sorting once (N log N) makes each allocation trial a binary search per unit, so the
    threshold search and the stored count table cost almost nothing afterwards.
    """

    def __init__(self, units: list[Unit], scores: dict[str, torch.Tensor]):
        self.units = units
        self.raw = [scores[u.name].reshape(-1).numpy().astype(np.float32, copy=False)
                    for u in units]
        self.sorted = [np.sort(a) for a in self.raw]

    def counts(self, threshold: float | np.ndarray) -> np.ndarray:
        """Entries ``≥ threshold`` per unit: (units,) for a scalar, (units, J) for J values."""
        t = np.asarray(threshold, dtype=np.float32)
        return np.stack([s.size - np.searchsorted(s, t, side="left") for s in self.sorted])

    def positive_range(self) -> tuple[float, float]:
        pos = [s[np.searchsorted(s, 0.0, side="right"):] for s in self.sorted]
        pos = [p for p in pos if p.size]
        if not pos:
            raise ValueError("every sensitivity score is zero: no gradient reached the backbone")
        return min(float(p[0]) for p in pos), max(float(p[-1]) for p in pos)

    def next_below(self, t: float) -> float | None:
        """The largest positive score strictly below ``t`` (None when there is none)."""
        best = None
        for s in self.sorted:
            i = np.searchsorted(s, np.float32(t), side="left") - 1
            if i >= 0 and s[i] > 0 and (best is None or s[i] > best):
                best = float(s[i])
        return best

    def kth_largest(self, ks: np.ndarray) -> np.ndarray:
        """The k-th largest positive score over all units, for every k in ``ks`` at once.

        A vectorised bisection over float32 bit patterns (no global sort of the scores).
        """
        bottom, top = self.positive_range()
        ks = np.asarray(ks, dtype=np.int64)
        lo = np.full(ks.shape, _float_bits(bottom), np.int64)
        hi = np.full(ks.shape, _float_bits(top), np.int64)
        while (lo < hi).any():
            mid = (lo + hi + 1) // 2
            enough = self.counts(mid.astype(np.int32).view(np.float32)).sum(0) >= ks
            lo, hi = np.where(enough, mid, lo), np.where(enough, hi, mid - 1)
        return lo.astype(np.int32).view(np.float32)

    def num_positive(self) -> int:
        return int(sum(s.size - np.searchsorted(s, 0.0, side="right") for s in self.sorted))


def allocate(units: list[Unit], scores: dict[str, torch.Tensor], *, budget: int,
             alpha: float, beta: float, kind: str, rank: int, cls_token: int,
             strict: bool = True, tolerance: float = BUDGET_TOLERANCE,
             table: SortedScores | None = None) -> Allocation:
    """Global-threshold allocation whose budget is nearest ``budget`` (see module docstring).

    The total is monotone in the threshold (a unit's cost never falls as its count grows),
    so the smallest threshold whose total fits the budget is bisected over the float32 bit
    patterns of the scores (exact); the next lower score gives the smallest total above it.
    Without ties or a structured module switching on in between, the budget is met exactly.
    ``strict``: a result further than ``tolerance`` from the target raises
    :class:`BudgetError` naming the nearest reachable budgets.
    """
    table = table or SortedScores(units, scores)
    numel = np.array([u.numel for u in units])
    cost = np.array([structured_cost(u, kind, rank) for u in units])
    is_matrix = np.array([u.is_matrix for u in units])

    def total_at(t: float) -> int:
        c, _ = allocation_costs(table.counts(t), numel, cost, is_matrix, alpha, beta)
        return cls_token + int(c.sum())

    bottom, top = table.positive_range()
    # smallest threshold with total <= budget; hi = just above every score selects nothing
    lo, hi = _float_bits(bottom), _float_bits(top) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if total_at(_bits_float(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    t_under = _bits_float(hi)
    choices = [(total_at(t_under), t_under)]
    t_over = table.next_below(t_under)
    if t_over is not None:
        choices.append((total_at(t_over), t_over))
    used, threshold = min(choices, key=lambda c: (abs(c[0] - budget), c[0]))
    reachable = abs(used - budget) <= tolerance * budget
    if strict and not reachable:
        near = sorted({c[0] for c in choices}, key=lambda v: abs(v - budget))
        others = f" (the other side: {near[1]:,})" if len(near) > 1 else ""
        raise BudgetError(
            f"SPT budget {budget:,} is not reachable within {tolerance:.0%}: the nearest "
            f"reachable budget is {near[0]:,}{others}, because a structured module "
            f"(α={alpha:g}, β={beta:g}, rank {rank}) switches on in between; set "
            f"budget={near[0]} or change alpha/rank")
    counts = table.counts(threshold)
    unit_cost, structured = allocation_costs(counts, numel, cost, is_matrix, alpha, beta)
    indices = {u.name: np.flatnonzero(raw >= np.float32(threshold)).astype(np.int64)
               for u, raw, st in zip(units, table.raw, structured) if not st}
    return Allocation(
        target=int(budget), threshold=float(threshold), cls_token=cls_token,
        counts={u.name: int(c) for u, c in zip(units, counts)},
        structured={u.name: bool(st) for u, st in zip(units, structured)},
        costs={u.name: int(c) for u, c in zip(units, unit_cost)},
        indices=indices, reachable=bool(reachable))


# -- compact JSON for index lists -----------------------------------------------------------
def encode_indices(idx: np.ndarray) -> str:
    """Sorted non-negative indices → base64(zlib(uint32 gaps)): a few bits per index."""
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    gaps = np.diff(idx, prepend=0).astype("<u4")
    return base64.b64encode(zlib.compress(gaps.tobytes(), 9)).decode("ascii")


def decode_indices(text: str) -> np.ndarray:
    gaps = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u4")
    return np.cumsum(gaps.astype(np.int64))
