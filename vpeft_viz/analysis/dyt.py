"""DyT's skipped tokens, seen from finished runs: rates, maps, costs and the r sweep.

A DyT run measures its trained model on the test split once (see
:meth:`vpeft_viz.methods.dyt.DyT.test_artifacts`) and stores the result in
``artifacts/method.npz``; this module turns that record into what the DyT page shows:

* :func:`layer_rates`, :func:`class_rates`: the share of patch tokens each layer's MLP
  processes, per layer (mean, spread) and per class;
* :func:`skipped_map`: which image regions are skipped most (1 − mean mask, per layer, as
  the patch grid);
* :func:`agreement_codes`: one image's kept tokens against the frozen model's
  top-CLS-attention tokens of the same count;
* :func:`r_sweep`: accuracy, FLOPs and measured latency of several DyT runs against their
  target rate r, with full fine-tuning and AdaptFormer runs of the same task as references.

Everything here is array arithmetic on stored records: no model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_METHODS = ("full", "adaptformer")
_REQUIRED = ("grid", "image_layer_rate", "labels", "preds", "mean_mask", "flops_per_image",
             "flops_complete", "attention_overlap", "attention_chance", "sample_images",
             "sample_masks", "sample_probs", "sample_cls_attention", "sample_flops")
# agreement_codes: what each patch token is for one layer of one image
AGREEMENT = ("neither", "top attention only", "kept only", "kept and top attention")


@dataclass
class TokenRecord:
    """One DyT run's test-split measurements (N test images, L layers, P patch tokens)."""

    grid: tuple[int, int]
    rate: np.ndarray  # (N, L) share of patch tokens each layer kept, per image
    labels: np.ndarray  # (N,)
    preds: np.ndarray  # (N,)
    mean_mask: np.ndarray  # (L, P) share of images keeping each token
    flops: np.ndarray  # (N,) FLOPs per image, from the tokens processed
    flops_complete: int  # FLOPs per image with no skipping
    overlap: np.ndarray  # (L,) kept ∩ top-CLS-attention, as a share of the kept tokens
    chance: np.ndarray  # (L,) the same for a random selection of as many tokens
    sample_images: np.ndarray  # (S, H, W, 3) uint8
    sample_masks: np.ndarray  # (S, L, P) bool
    sample_probs: np.ndarray  # (S, L, P) dispatcher probability σ(logit)
    sample_attention: np.ndarray  # (S, L, P) frozen model's CLS attention
    sample_flops: np.ndarray  # (S,)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_artifacts(cls, arrays: Mapping[str, np.ndarray]) -> TokenRecord:
        missing = [k for k in _REQUIRED if k not in arrays]
        if missing:
            raise KeyError(f"not a DyT token record (missing {', '.join(missing)})")
        grid = tuple(int(g) for g in np.asarray(arrays["grid"]).reshape(-1)[:2])
        rate = np.asarray(arrays["image_layer_rate"], dtype=float)
        mean_mask = np.asarray(arrays["mean_mask"], dtype=float)
        if rate.ndim != 2 or mean_mask.shape != (rate.shape[1], grid[0] * grid[1]):
            raise ValueError(f"inconsistent DyT record: rates {rate.shape}, mean mask "
                             f"{mean_mask.shape}, grid {grid}")
        latency = {k.removeprefix("latency_").removesuffix("_ms"): float(v)
                   for k, v in arrays.items() if k.startswith("latency_") and k.endswith("_ms")}
        if "latency_batch_size" in arrays:
            latency["batch_size"] = float(arrays["latency_batch_size"])
        return cls(
            grid=(grid[0], grid[1]), rate=rate,
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            preds=np.asarray(arrays["preds"], dtype=np.int64), mean_mask=mean_mask,
            flops=np.asarray(arrays["flops_per_image"], dtype=np.int64),
            flops_complete=int(arrays["flops_complete"]),
            overlap=np.asarray(arrays["attention_overlap"], dtype=float),
            chance=np.asarray(arrays["attention_chance"], dtype=float),
            sample_images=np.asarray(arrays["sample_images"], dtype=np.uint8),
            sample_masks=np.asarray(arrays["sample_masks"], dtype=bool),
            sample_probs=np.asarray(arrays["sample_probs"], dtype=float),
            sample_attention=np.asarray(arrays["sample_cls_attention"], dtype=float),
            sample_flops=np.asarray(arrays["sample_flops"], dtype=np.int64),
            latency_ms=latency)

    @property
    def depth(self) -> int:
        return int(self.rate.shape[1])

    @property
    def n_images(self) -> int:
        return int(self.rate.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.sample_masks.shape[0])

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean()) if self.n_images else math.nan

    @property
    def mean_rate(self) -> float:
        """Activation rate over layers, images and patch tokens (what the loss pulls to r)."""
        return float(self.rate.mean())

    @property
    def mean_flops(self) -> float:
        return float(self.flops.mean())

    @property
    def flop_reduction(self) -> float:
        """FLOPs without skipping over the mean FLOPs with it (1.25 = 20 % fewer)."""
        return self.flops_complete / self.mean_flops if self.mean_flops else math.nan


def layer_rates(rec: TokenRecord) -> dict[str, np.ndarray]:
    """Per layer: mean, standard deviation and 10th/90th percentiles of the per-image rate."""
    return {"mean": rec.rate.mean(0), "std": rec.rate.std(0),
            "p10": np.percentile(rec.rate, 10, axis=0),
            "p90": np.percentile(rec.rate, 90, axis=0)}


def class_rates(rec: TokenRecord, num_classes: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(classes × layers) mean activation rate of each class's test images (NaN for a class
    with none) and the images per class."""
    c = int(max(num_classes or 0, rec.labels.max(initial=-1) + 1))
    counts = np.bincount(rec.labels, minlength=c)
    sums = np.zeros((c, rec.depth))
    np.add.at(sums, rec.labels, rec.rate)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def skipped_map(rec: TokenRecord) -> np.ndarray:
    """(L + 1, gh, gw): share of test images whose layer skips each patch; the last slice is
    the mean over layers."""
    per_layer = (1.0 - rec.mean_mask).reshape(rec.depth, *rec.grid)
    return np.concatenate([per_layer, per_layer.mean(0, keepdims=True)])


def agreement_codes(mask: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """(L, P) codes into :data:`AGREEMENT` for one image: its kept tokens against the same
    number of tokens with the most CLS attention, layer by layer."""
    mask = np.asarray(mask, dtype=bool)
    k = mask.sum(-1, keepdims=True)
    rank = np.argsort(np.argsort(-np.asarray(attention), axis=-1, kind="stable"), axis=-1)
    top = rank < k
    return 2 * mask.astype(np.int64) + top.astype(np.int64)


def r_sweep(dyt_runs: Iterable[Mapping[str, Any]], table: pd.DataFrame, *, task: str,
            backbone: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DyT runs of one task and backbone against r, and the reference runs beside them.

    ``dyt_runs``: one mapping per DyT run with ``run_id``, ``r``, ``task``, ``backbone`` and
    its :class:`TokenRecord` under ``record``; ``table``: the run table
    (:func:`vpeft_viz.analysis.compare.load_runs`), for test accuracies and the references.
    Returns (DyT rows sorted by r, reference rows: method, mean test accuracy, FLOPs, runs).
    """
    acc = dict(zip(table["run_id"], table["test_acc"])) if len(table) else {}
    rows = []
    for run in dyt_runs:
        if run["task"] != task or run["backbone"] != backbone:
            continue
        rec: TokenRecord = run["record"]
        lat = rec.latency_ms
        rows.append({"run_id": run["run_id"], "r": float(run["r"]),
                     "test_acc": float(acc.get(run["run_id"], rec.accuracy)),
                     "activation_rate": rec.mean_rate, "flops": rec.mean_flops,
                     "flops_complete": float(rec.flops_complete),
                     "latency_b1_ms": lat.get("b1_dispatch", math.nan),
                     "latency_b1_complete_ms": lat.get("b1_complete", math.nan),
                     "latency_batch_ms": lat.get("batch_dispatch", math.nan),
                     "latency_batch_complete_ms": lat.get("batch_complete", math.nan),
                     "latency_batch_size": lat.get("batch_size", math.nan)})
    sweep = pd.DataFrame(rows, columns=["run_id", "r", "test_acc", "activation_rate", "flops",
                                        "flops_complete", "latency_b1_ms",
                                        "latency_b1_complete_ms", "latency_batch_ms",
                                        "latency_batch_complete_ms", "latency_batch_size"])
    sweep = sweep.sort_values(["r", "run_id"], kind="stable").reset_index(drop=True)
    refs = pd.DataFrame(columns=["method", "test_acc", "flops", "runs"])
    if len(table):
        same = table[(table["task"] == task) & (table["backbone"] == backbone)
                     & table["method"].isin(REFERENCE_METHODS)]
        if len(same):
            refs = (same.groupby("method", sort=False)
                    .agg(test_acc=("test_acc", "mean"), flops=("flops_per_image", "mean"),
                         runs=("run_id", "count")).reset_index())
    return sweep, refs
