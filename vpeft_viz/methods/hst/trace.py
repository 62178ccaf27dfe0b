"""What HST's views show, measured on a model carrying HST: the side network's feature maps
per stage, the meta tokens' norms per ViT layer, and the side blocks' cross-attention.

:func:`trace` records one batch; :func:`measure_test_split` is what a run stores after its
test evaluation (``artifacts/method.npz``): summaries over the whole test split and the full
records of its first :data:`SAMPLE_IMAGES` images. :mod:`vpeft_viz.analysis.hst` reads them
back, and can trace any other test image of a stored run again from its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .layout import SideLayout
from .method import hst_side, meta_blocks

SAMPLE_IMAGES = 8  # test images whose maps and attention a run stores


def layout_arrays(layout: SideLayout) -> dict[str, np.ndarray]:
    """The side network's layout as arrays (stored with a run, read by the view)."""
    return {
        "stage_layers": np.array([s.layers for s in layout.stages], dtype=np.int64),
        "stage_widths": np.array([s.width for s in layout.stages], dtype=np.int64),
        "stage_heads": np.array([s.heads for s in layout.stages], dtype=np.int64),
        "stage_grids": np.array([s.grid for s in layout.stages], dtype=np.int64),
        "vit_grid": np.array(layout.vit_grid, dtype=np.int64),
        "image_size": np.array(layout.image, dtype=np.int64),
    }


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, for every forward of ``model`` in the block: each ViT layer's meta-token and
    patch outputs (``meta``, ``patches``: batch × tokens × D) and each side stage's tokens
    before its final norm (``stages``) and its blocks' attention (``attn``: one batch × heads
    × side tokens × keys tensor per side block, stage by stage). Lists are reset per forward."""
    side = hst_side(model)
    rec: dict[str, list[torch.Tensor]] = {"meta": [], "patches": [], "stages": [], "attn": []}
    attns = [blk.attn for st in side.stages for blk in st.blocks]

    def on_block(module, _args, _out) -> None:
        if len(rec["meta"]) == len(model.blocks):  # a new forward: start again
            for v in rec.values():
                v.clear()
        rec["meta"].append(module.meta_out.detach())
        rec["patches"].append(module.patch_out.detach())

    def on_stage(module, _args, _out) -> None:
        rec["stages"].append(module.last_tokens)
        first = sum(len(s.blocks) for s in side.stages[:len(rec["stages"]) - 1])
        rec["attn"].extend(a.last_attn for a in attns[first:first + len(module.blocks)])

    hooks = [b.register_forward_hook(on_block) for b in meta_blocks(model)]
    hooks += [s.register_forward_hook(on_stage) for s in side.stages]
    for m in (*side.stages, *attns):
        m.record = True
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()
        for m in (*side.stages, *attns):
            m.record = False
        for s in side.stages:
            s.last_tokens = None
        for a in attns:
            a.last_attn = None


@torch.no_grad()
def trace(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """One eval-mode forward of ``images``, recorded: ``logits``, ``meta_norm`` and
    ``patch_norm`` (batch × layers: the meta token's norm after each ViT block, mean over
    meta tokens, and the mean patch-token norm), per stage ``tokens`` (batch × rows × cols ×
    width, before the stage's final norm) and ``attn`` (batch × blocks × heads × rows·cols ×
    keys; keys: the meta token(s), then the global token)."""
    was = model.training
    model.eval()
    try:
        with recording(model) as rec:
            logits = model(images)
    finally:
        model.train(was)
    layout = hst_side(model).layout
    tokens = [t.float().reshape(t.shape[0], *st.grid, -1).cpu().numpy()
              for t, st in zip(rec["stages"], layout.stages)]
    attn, a = [], 0
    for st in layout.stages:
        attn.append(torch.stack(rec["attn"][a:a + len(st.layers)], 1).float().cpu().numpy())
        a += len(st.layers)
    return {
        "logits": logits.float().cpu().numpy(),
        "meta_norm": torch.stack([m.float().norm(dim=-1).mean(1) for m in rec["meta"]], 1)
        .cpu().numpy(),
        "patch_norm": torch.stack([p.float().norm(dim=-1).mean(1) for p in rec["patches"]], 1)
        .cpu().numpy(),
        "tokens": tokens,
        "attn": attn,
    }


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """The first three principal components of feature maps (images × rows × cols × width),
    fitted over all their positions together, each scaled to [0, 1] between its 1st and 99th
    percentiles: (images × rows × cols × 3), comparable across the images given. Signs are
    fixed so each component's largest loading is positive."""
    n, h, w, c = tokens.shape
    x = tokens.reshape(-1, c).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    proj = x @ comps.T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    return rgb.reshape(n, h, w, 3).astype(np.float32)


def display_images(images: torch.Tensor, dataset: Any = None) -> np.ndarray:
    """uint8 (n, H, W, 3): the loader's normalisation undone when the dataset says what it
    was, else each image stretched to its own range."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    else:
        lo = x.amin((1, 2, 3), keepdim=True)
        x = (x - lo) / (x.amax((1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_arrays(t: dict[str, Any], num_meta: int) -> dict[str, np.ndarray]:
    """A trace's per-image records, as a run stores them: per stage ``stage{i}_norm`` (images
    × rows × cols: the token norm before the stage's final norm), ``stage{i}_pca`` (see
    :func:`pca_rgb`) and ``stage{i}_attn`` (images × blocks × heads × rows·cols × keys,
    float16); ``meta_norm``, ``patch_norm`` (images × layers)."""
    out: dict[str, np.ndarray] = {"meta_norm": t["meta_norm"].astype(np.float32),
                                  "patch_norm": t["patch_norm"].astype(np.float32)}
    for i, (tok, att) in enumerate(zip(t["tokens"], t["attn"], strict=True)):
        out[f"stage{i}_norm"] = np.linalg.norm(tok, axis=-1).astype(np.float32)
        out[f"stage{i}_pca"] = pca_rgb(tok)
        out[f"stage{i}_attn"] = att.astype(np.float16)
    out["num_meta"] = np.int64(num_meta)
    return out


@torch.no_grad()
def measure_test_split(model: nn.Module, loader: Iterable, *,
                       device: torch.device) -> dict[str, Any]:
    """Everything the HST view shows, on the test split in eval mode: labels and
    predictions; per ViT layer the mean meta-token and patch-token norms; per stage the
    mean token-norm map and each side block's attention share on the meta token(s) per head;
    and :func:`sample_arrays` of the first :data:`SAMPLE_IMAGES` test images, with the
    images."""
    side = hst_side(model)
    num_meta = meta_blocks(model)[0].num_meta
    per_stage = [len(s.blocks) for s in side.stages]
    model.eval()
    labels, preds, meta_sum, patch_sum = [], [], 0.0, 0.0
    norm_sum: list[np.ndarray | float] = [0.0] * len(per_stage)
    share_sum: list[np.ndarray | float] = [0.0] * len(per_stage)
    samples: list[dict[str, Any]] = []
    shown: list[np.ndarray] = []
    n = 0
    dataset = getattr(loader, "dataset", None)
    for images, y in loader:
        images = images.to(device)
        t = trace(model, images)
        labels.append(np.asarray(y.cpu()))
        preds.append(t["logits"].argmax(1))
        meta_sum = meta_sum + t["meta_norm"].sum(0)
        patch_sum = patch_sum + t["patch_norm"].sum(0)
        for i, (tok, att) in enumerate(zip(t["tokens"], t["attn"])):
            norm_sum[i] = norm_sum[i] + np.linalg.norm(tok, axis=-1).sum(0)
            share_sum[i] = share_sum[i] + att[..., :num_meta].sum(-1).mean(-1).sum(0)
        take = SAMPLE_IMAGES - sum(len(s) for s in shown)
        if take > 0:
            samples.append({"tokens": [x[:take] for x in t["tokens"]],
                            "attn": [x[:take] for x in t["attn"]],
                            "meta_norm": t["meta_norm"][:take],
                            "patch_norm": t["patch_norm"][:take]})
            shown.append(display_images(images[:take], dataset))
        n += images.shape[0]
    if not n:
        raise ValueError("cannot measure HST on an empty test split")
    joined = {"tokens": [np.concatenate([s["tokens"][i] for s in samples])
                         for i in range(len(per_stage))],
              "attn": [np.concatenate([s["attn"][i] for s in samples])
                       for i in range(len(per_stage))],
              "meta_norm": np.concatenate([s["meta_norm"] for s in samples]),
              "patch_norm": np.concatenate([s["patch_norm"] for s in samples])}
    out: dict[str, Any] = {f"sample_{k}": v for k, v in sample_arrays(joined, num_meta).items()}
    out.update({
        "num_meta": np.int64(num_meta),
        "sample_images": np.concatenate(shown),
        "labels": np.concatenate(labels).astype(np.int64),
        "preds": np.concatenate(preds).astype(np.int64),
        "meta_out_norm": (np.asarray(meta_sum) / n).astype(np.float32),
        "patch_out_norm": (np.asarray(patch_sum) / n).astype(np.float32),
    })
    for i in range(len(per_stage)):
        out[f"stage{i}_mean_norm"] = (np.asarray(norm_sum[i]) / n).astype(np.float32)
        out[f"stage{i}_meta_share"] = (np.asarray(share_sum[i]) / n).astype(np.float32)
    return out
