"""E²VPT's prompt pruning, seen from finished runs, and where the attention to prompts goes.

The masks, the importance scores and the rewind rounds are computed by
:mod:`vpeft_viz.methods.e2vpt` during training and stored in the run's
``artifacts/method.npz``; this module reads them back (:class:`PruningRecord`), lays them
out per round, relates accuracy to the pruning ratio, picks the reference runs (VPT-deep,
LoRA) for the parameters-vs-accuracy view, and measures the attention mass on the
key-value and visual prompts of a rebuilt run (:func:`prompt_attention_mass`, on the
attention probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_METHODS = ("vpt-deep", "lora")


@dataclass
class PruningRecord:
    """One E²VPT run's stored masks, scores and rounds (rounds empty when it did not prune)."""

    token_mask: np.ndarray  # final (L_p,)
    piece_mask: np.ndarray  # final (L_p, 16)
    kv_tokens: int
    width: int
    depth: int
    params_after_pruning: int
    token_scores: np.ndarray | None = None
    piece_scores: np.ndarray | None = None
    token_scores_abs: np.ndarray | None = None
    piece_scores_abs: np.ndarray | None = None
    soft_token: np.ndarray | None = None
    soft_piece: np.ndarray | None = None
    mask_round_val_acc: float = float("nan")
    rounds: pd.DataFrame | None = None  # one row per rewind round
    round_token_masks: np.ndarray | None = None  # (R, L_p)
    round_piece_masks: np.ndarray | None = None  # (R, L_p, 16)
    selected: int | None = None

    @classmethod
    def from_artifacts(cls, arrays: dict[str, np.ndarray]) -> PruningRecord:
        missing = [k for k in ("token_mask", "piece_mask", "params_after_pruning")
                   if k not in arrays]
        if missing:
            raise KeyError(f"not an E²VPT record (missing {', '.join(missing)})")

        def opt(key: str) -> np.ndarray | None:
            return np.asarray(arrays[key], dtype=float) if key in arrays else None

        rec = cls(
            token_mask=np.asarray(arrays["token_mask"], dtype=float),
            piece_mask=np.asarray(arrays["piece_mask"], dtype=float),
            kv_tokens=int(arrays.get("kv_tokens", 0)), width=int(arrays.get("width", 0)),
            depth=int(arrays.get("depth", 0)),
            params_after_pruning=int(arrays["params_after_pruning"]),
            token_scores=opt("token_scores"), piece_scores=opt("piece_scores"),
            token_scores_abs=opt("token_scores_abs"), piece_scores_abs=opt("piece_scores_abs"),
            soft_token=opt("soft_token"), soft_piece=opt("soft_piece"),
            mask_round_val_acc=float(arrays.get("mask_round_val_acc", np.nan)))
        if "round_val_acc" in arrays:
            cols = ("tokens_pruned", "pieces_pruned", "val_acc", "best_epoch",
                    "prompt_entries_kept", "pruned_fraction", "params")
            rec.rounds = pd.DataFrame({c: np.asarray(arrays[f"round_{c}"]) for c in cols})
            rec.rounds.insert(0, "round", np.arange(1, len(rec.rounds) + 1))
            rec.round_token_masks = np.asarray(arrays["round_token_masks"], dtype=float)
            rec.round_piece_masks = np.asarray(arrays["round_piece_masks"], dtype=float)
            if "selected_round" in arrays:
                rec.selected = int(arrays["selected_round"])
        return rec

    @property
    def num_tokens(self) -> int:
        return int(self.token_mask.shape[0])

    @property
    def pruned(self) -> bool:
        return self.rounds is not None and len(self.rounds) > 0


def mask_grid(token_mask: np.ndarray, piece_mask: np.ndarray) -> np.ndarray:
    """(L_p × 16) kept (1) / pruned (0) per token and piece: a pruned token loses all pieces."""
    return (np.asarray(piece_mask) != 0) & (np.asarray(token_mask) != 0)[:, None]


def token_kept_by_round(rec: PruningRecord) -> np.ndarray:
    """(rounds × L_p) token masks, round 0 (mask training, nothing pruned) first."""
    first = np.ones((1, rec.num_tokens))
    if not rec.pruned:
        return first
    return np.concatenate([first, rec.round_token_masks != 0], axis=0).astype(float)


def pieces_kept_by_round(rec: PruningRecord) -> np.ndarray:
    """(rounds × L_p) number of pieces each token keeps, round 0 first."""
    first = np.full((1, rec.num_tokens), rec.piece_mask.shape[1], dtype=float)
    if not rec.pruned:
        return first
    kept = np.stack([mask_grid(t, p).sum(1) for t, p in
                     zip(rec.round_token_masks, rec.round_piece_masks)])
    return np.concatenate([first, kept], axis=0).astype(float)


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each score, 1 = pruned first (lowest, most negative), along the last axis."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(order.shape[-1]), order.shape), -1)
    return ranks + 1


def accuracy_vs_pruning(rec: PruningRecord, test_acc: float | None) -> pd.DataFrame:
    """One row per round: pruned fraction of the visual prompts, validation accuracy, and
    the test accuracy of the selected round only (test is evaluated once)."""
    rows = [{"round": 0, "label": "mask training (soft masks)", "pruned_fraction": 0.0,
             "val_acc": rec.mask_round_val_acc, "test_acc": np.nan, "selected": False}]
    if rec.pruned:
        for i, r in rec.rounds.iterrows():
            sel = rec.selected == i
            rows.append({"round": int(r["round"]),
                         "label": f"{int(r['tokens_pruned'])} tokens, "
                                  f"{int(r['pieces_pruned'])} pieces pruned",
                         "pruned_fraction": float(r["pruned_fraction"]),
                         "val_acc": float(r["val_acc"]),
                         "test_acc": float(test_acc) if sel and test_acc is not None else np.nan,
                         "selected": bool(sel)})
    return pd.DataFrame(rows)


def reference_points(runs: pd.DataFrame, task: str, backbone: str,
                     methods: tuple[str, ...] = ("e2vpt", *REFERENCE_METHODS)) -> pd.DataFrame:
    """Mean test accuracy and trainable parameters (head excluded; E²VPT after pruning) of
    the finished runs of ``methods`` on one task and backbone, one row per method and
    setting, with the seed count."""
    cols = ["method", "setting", "params", "test_acc", "test_acc_std", "seeds"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    sel = runs[(runs["task"] == task) & (runs["backbone"] == backbone)
               & runs["method"].isin(methods)]
    if sel.empty:
        return pd.DataFrame(columns=cols)
    g = sel.groupby(["method", "setting"], dropna=False)
    out = g.agg(params=("trainable_params_excl_head", "mean"), test_acc=("test_acc", "mean"),
                test_acc_std=("test_acc", "std"), seeds=("test_acc", "size")).reset_index()
    return out[cols]


def prompt_attention_mass(model: Any, images: Any, *, batch_size: int = 64) -> dict[str, Any]:
    """Attention mass that image tokens (CLS and patches) put on the key-value prompts, the
    visual prompts, the CLS token and the patches, per image, block and head.

    Returns arrays of shape (images, blocks, heads) under ``kv``, ``visual``, ``cls`` and
    ``patches`` (they sum to 1), plus the layout (prompt counts).
    """
    import torch

    from ..methods.e2vpt import prompt_layout
    from ..probes.attention import attention_maps

    layout = prompt_layout(model)
    kv, n_vis, n_prefix = layout["kv_tokens"], layout["visual_tokens"], layout["num_prefix"]
    parts: dict[str, list[np.ndarray]] = {"kv": [], "visual": [], "cls": [], "patches": []}
    for start in range(0, len(images), batch_size):
        maps = attention_maps(model, images[start:start + batch_size])
        per_block = {k: [] for k in parts}
        for m in maps:  # (B, H, queries, kv + queries)
            m = m.float()
            image_q = torch.cat([m[:, :, :n_prefix], m[:, :, n_prefix + n_vis:]], dim=2)
            mass = image_q.mean(2)  # (B, H, keys): averaged over image-token queries
            per_block["kv"].append(mass[..., :kv].sum(-1))
            per_block["cls"].append(mass[..., kv:kv + n_prefix].sum(-1))
            per_block["visual"].append(mass[..., kv + n_prefix:kv + n_prefix + n_vis].sum(-1))
            per_block["patches"].append(mass[..., kv + n_prefix + n_vis:].sum(-1))
        for k in parts:
            parts[k].append(torch.stack(per_block[k], dim=1).cpu().numpy())
    out: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
    out["layout"] = layout
    return out


def run_attention_mass(path: str | Path, n_images: int = 64) -> dict[str, Any]:
    """:func:`prompt_attention_mass` of a finished E²VPT run on its first test images,
    with the images (0..1, channels last, for display), labels and predictions."""
    import torch

    from ..runs.model import run_test_images
    from ..runs.store import Run
    from ..runs.weights import load_run_model

    trained = load_run_model(Run(Path(path), read_only=True))
    model = trained.model
    images, labels, classes = run_test_images(path, model, n_images, task=trained.task)
    with torch.no_grad():
        preds = model(images).argmax(1)
    out = prompt_attention_mass(model, images)
    shown = images - images.amin(dim=(1, 2, 3), keepdim=True)
    shown = shown / shown.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    out.update(images=shown.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
               predictions=preds.numpy(), class_names=classes)
    return out
