"""HST's side network, seen from finished runs: feature maps per stage, meta-token norms per
ViT layer, and the side blocks' cross-attention on the meta token.

An HST run stores (see :mod:`vpeft_viz.methods.hst.trace`) the side network's layout, the
meta tokens' norms, summaries over its test split and the full traces of its first test
images in ``artifacts/method.npz``; :class:`SideRecord` reads them back and the functions
below lay them out for the HST page. :func:`run_trace` traces any other test image again from
the run's stored weights (when the run has them: shipped runs of a large side network may
not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_REQUIRED = ("stage_layers", "stage_widths", "stage_heads", "stage_grids", "vit_grid",
             "meta_param_norm", "meta_out_norm", "patch_out_norm", "labels", "preds",
             "num_meta", "sample_images", "sample_meta_norm", "sample_patch_norm")
_PER_STAGE = ("stage{i}_mean_norm", "stage{i}_meta_share", "sample_stage{i}_norm",
              "sample_stage{i}_pca", "sample_stage{i}_attn")


@dataclass
class ImageTrace:
    """Traces of some test images: per stage the token-norm maps (images × rows × cols),
    their first three principal components as colours (… × 3) and the side blocks' attention
    (images × blocks × heads × rows·cols × keys); per ViT layer the meta token's norm and
    the mean patch-token norm (images × layers)."""

    images: np.ndarray  # (S, H, W, 3) uint8
    norms: list[np.ndarray]
    pcas: list[np.ndarray]
    attn: list[np.ndarray]
    meta_norm: np.ndarray
    patch_norm: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])


@dataclass
class SideRecord:
    """One HST run's stored side-network record (L ViT layers, S stages)."""

    stage_layers: list[tuple[int, ...]]
    widths: list[int]
    heads: list[int]
    grids: list[tuple[int, int]]
    vit_grid: tuple[int, int]
    num_meta: int
    labels: np.ndarray  # (N,) test split
    preds: np.ndarray  # (N,)
    meta_param_norm: np.ndarray  # (L,) the learned meta tokens (block inputs)
    meta_init_norm: np.ndarray | None  # (L,) the same at initialisation
    meta_shift_norm: np.ndarray | None  # (L,) ‖trained − initial‖
    meta_out_norm: np.ndarray  # (L,) meta token after its block, mean over test images
    patch_out_norm: np.ndarray  # (L,) mean patch-token norm after the block
    mean_norm: list[np.ndarray]  # per stage (rows × cols), mean over test images
    meta_share: list[np.ndarray]  # per stage (blocks × heads) attention on the meta token(s)
    samples: ImageTrace

    @classmethod
    def from_artifacts(cls, arrays: Mapping[str, np.ndarray]) -> SideRecord:
        missing = [k for k in _REQUIRED if k not in arrays]
        if missing:
            raise KeyError(f"not an HST record (missing {', '.join(missing)})")
        layers = np.asarray(arrays["stage_layers"], dtype=np.int64)
        n_stages = layers.shape[0]
        keys = [k.format(i=i) for i in range(n_stages) for k in _PER_STAGE]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise KeyError(f"not an HST record (missing {', '.join(missing[:3])})")
        grids = [(int(g[0]), int(g[1])) for g in np.asarray(arrays["stage_grids"])]
        depth = int(layers.size)

        def opt(key: str) -> np.ndarray | None:
            return np.asarray(arrays[key], dtype=float) if key in arrays else None

        rec = cls(
            stage_layers=[tuple(int(v) for v in row) for row in layers],
            widths=[int(w) for w in arrays["stage_widths"]],
            heads=[int(h) for h in arrays["stage_heads"]], grids=grids,
            vit_grid=tuple(int(g) for g in np.asarray(arrays["vit_grid"])[:2]),
            num_meta=int(arrays["num_meta"]),
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            preds=np.asarray(arrays["preds"], dtype=np.int64),
            meta_param_norm=np.asarray(arrays["meta_param_norm"], dtype=float),
            meta_init_norm=opt("meta_init_norm"), meta_shift_norm=opt("meta_shift_norm"),
            meta_out_norm=np.asarray(arrays["meta_out_norm"], dtype=float),
            patch_out_norm=np.asarray(arrays["patch_out_norm"], dtype=float),
            mean_norm=[np.asarray(arrays[f"stage{i}_mean_norm"], dtype=float)
                       for i in range(n_stages)],
            meta_share=[np.asarray(arrays[f"stage{i}_meta_share"], dtype=float)
                        for i in range(n_stages)],
            samples=ImageTrace(
                images=np.asarray(arrays["sample_images"], dtype=np.uint8),
                norms=[np.asarray(arrays[f"sample_stage{i}_norm"], dtype=float)
                       for i in range(n_stages)],
                pcas=[np.asarray(arrays[f"sample_stage{i}_pca"], dtype=float)
                      for i in range(n_stages)],
                attn=[np.asarray(arrays[f"sample_stage{i}_attn"], dtype=float)
                      for i in range(n_stages)],
                meta_norm=np.asarray(arrays["sample_meta_norm"], dtype=float),
                patch_norm=np.asarray(arrays["sample_patch_norm"], dtype=float)))
        rec.check(depth)
        return rec

    def check(self, depth: int) -> None:
        """Refuse a record whose parts do not fit together (a clear error, not a broken
        figure)."""
        per_layer = (self.meta_param_norm, self.meta_out_norm, self.patch_out_norm)
        if any(a.shape != (depth,) for a in per_layer):
            raise ValueError(f"inconsistent HST record: {depth} layers in the layout, norms of "
                             f"shapes {[a.shape for a in per_layer]}")
        for i, (g, lay, h) in enumerate(zip(self.grids, self.stage_layers, self.heads)):
            want = (len(lay), h, g[0] * g[1], self.num_meta + 1)
            got = self.samples.attn[i].shape[1:]
            if got != want or self.samples.norms[i].shape[1:] != g:
                raise ValueError(f"inconsistent HST record: stage {i} attention {got}, "
                                 f"expected (…, {', '.join(map(str, want))})")

    @property
    def depth(self) -> int:
        return int(self.meta_param_norm.shape[0])

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean()) if len(self.labels) else math.nan

    def stage_of_layer(self) -> np.ndarray:
        out = np.zeros(self.depth, dtype=np.int64)
        for i, layers in enumerate(self.stage_layers):
            out[list(layers)] = i
        return out


def layer_table(rec: SideRecord) -> pd.DataFrame:
    """One row per ViT layer: its stage, the meta token's norm after the block against the
    mean patch-token norm there (test-split means), and the learned token's norm, at init
    and its shift in training."""
    nan = np.full(rec.depth, np.nan)
    df = pd.DataFrame({
        "layer": np.arange(rec.depth), "stage": rec.stage_of_layer() + 1,
        "meta_out_norm": rec.meta_out_norm, "patch_out_norm": rec.patch_out_norm,
        "meta_token_norm": rec.meta_param_norm,
        "meta_init_norm": rec.meta_init_norm if rec.meta_init_norm is not None else nan,
        "meta_shift_norm": rec.meta_shift_norm if rec.meta_shift_norm is not None else nan})
    with np.errstate(divide="ignore", invalid="ignore"):
        df["out_vs_patches"] = df["meta_out_norm"] / df["patch_out_norm"]
    return df


def block_table(rec: SideRecord) -> pd.DataFrame:
    """One row per side block: stage, block, the ViT layer feeding it, and its attention
    share on the meta token(s) over the test split (mean, lowest and highest head)."""
    rows = []
    for i, (layers, share) in enumerate(zip(rec.stage_layers, rec.meta_share)):
        for j, layer in enumerate(layers):
            rows.append({"stage": i + 1, "block": j + 1, "layer": int(layer),
                         "meta_share": float(share[j].mean()),
                         "min_head": float(share[j].min()), "max_head": float(share[j].max()),
                         "heads": int(share.shape[1])})
    return pd.DataFrame(rows, columns=["stage", "block", "layer", "meta_share", "min_head",
                                       "max_head", "heads"])


def meta_attention_maps(attn: np.ndarray, grid: tuple[int, int], num_meta: int,
                        head: int | None = None) -> np.ndarray:
    """(blocks × rows × cols): each side token's attention on the meta token(s) (the rest
    goes to the global token), for one image's stage attention (blocks × heads × P × keys);
    mean over heads, or one ``head``."""
    share = np.asarray(attn, dtype=float)[..., :num_meta].sum(-1)  # blocks × heads × P
    share = share.mean(1) if head is None else share[:, head]
    return share.reshape(share.shape[0], *grid)


def run_trace(path: str | Path, index: int) -> dict[str, Any]:
    """Test image ``index`` of a finished HST run traced again from its stored weights: an
    :class:`ImageTrace` of that one image (its principal components fitted on it alone),
    its label and prediction, and the class names."""
    from types import SimpleNamespace

    import torch

    from ..backbones import input_stats
    from ..data.dataset import resolve_normalization
    from ..methods.hst.trace import display_images, sample_arrays, trace
    from ..runs.model import run_test_images
    from ..runs.store import Run
    from ..runs.weights import load_run_model

    if index < 0:
        raise ValueError(f"test image index must be ≥ 0, got {index}")
    trained = load_run_model(Run(Path(path), read_only=True))
    images, labels, names = run_test_images(path, trained.model, index + 1, task=trained.task)
    if images.shape[0] <= index:
        raise ValueError(f"the run's test split has {images.shape[0]} images; no image {index}")
    x = images[index:index + 1]
    with torch.no_grad():
        t = trace(trained.model, x)
    arrays = sample_arrays(t, int(trained.model.blocks[0].num_meta))
    mean, std = resolve_normalization(trained.config["data"].get("normalization", "backbone"),
                                      *input_stats(trained.model))  # as run_test_images did
    n = len(t["tokens"])
    return {"trace": ImageTrace(
        images=display_images(x, SimpleNamespace(mean=mean, std=std)),
        norms=[arrays[f"stage{i}_norm"] for i in range(n)],
        pcas=[arrays[f"stage{i}_pca"] for i in range(n)],
        attn=[arrays[f"stage{i}_attn"].astype(float) for i in range(n)],
        meta_norm=arrays["meta_norm"], patch_norm=arrays["patch_norm"]),
        "label": int(labels[index]), "pred": int(t["logits"].argmax(1)[0]),
        "class_names": names}
