"""Cost of a fine-tuned model: the PPT trade-off score, parameter shares, readable sizes.

PPT (performance-parameter trade-off) comes from V-PETL Bench (Xin et al., "V-PETL Bench: A
Unified Visual Parameter-Efficient Transfer Learning Benchmark", NeurIPS 2024 Datasets and
Benchmarks, https://github.com/synbol/Parameter-Efficient-Transfer-Learning-Benchmark):

    PPT = acc × exp(−log10(P / C + 1)),   C = 10⁷,  P = trainable parameters.

It keeps the accuracy's unit (a fraction in, a fraction out) and discounts it smoothly as the
trainable parameters grow: P ≪ C leaves the accuracy almost untouched, P = 9·10⁷ (about a full
ViT-B fine-tune) multiplies it by e⁻¹.
"""

from __future__ import annotations

import math

import numpy as np

PPT_C = 1e7


def ppt_score(acc: float | np.ndarray, trainable_params: float | np.ndarray,
              c: float = PPT_C) -> float | np.ndarray:
    """V-PETL Bench's PPT score for accuracy ``acc`` at ``trainable_params`` parameters."""
    p = np.asarray(trainable_params, dtype=float)
    out = np.asarray(acc, dtype=float) * np.exp(-np.log10(p / c + 1.0))
    return float(out) if out.ndim == 0 else out


def percent_of_backbone(trainable_params: float, backbone_params: float) -> float:
    """Trainable parameters as a percentage of the backbone's (head excluded) parameters."""
    if not backbone_params or math.isnan(backbone_params):
        return float("nan")
    return 100.0 * trainable_params / backbone_params


def human_count(n: float | None) -> str:
    """1234 → '1.23k', 2_500_000 → '2.50M'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def human_bytes(n: float | None) -> str:
    """Bytes in binary units: 1536 → '1.5 KiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f} B"
