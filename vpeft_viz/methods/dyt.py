"""DyT: Dynamic Tuning, per-token skipping of each block's MLP with a parallel adapter.

Zhao et al., "Dynamic Tuning Towards Parameter and Inference Efficiency for ViT Adaptation",
NeurIPS 2024, https://arxiv.org/abs/2403.11808 (NUS-HPC-AI-Lab/Dynamic-Tuning, the released
"MLP dispatch" variant).

* **Dispatcher** (:class:`DynamicBlock`). After the attention residual, ``Linear(d→1)``
  (trunc-normal std 0.02, zero bias) scores every patch token; the prefix tokens (CLS, and
  any register tokens) are always kept. Training: ``m = σ((logit + g1 − g2)/τ)`` with two
  Gumbel(0, 1) draws and τ = 5, hardened at 0.5 with a straight-through estimator (the
  forward sees 0/1, the gradient is the soft one's). Inference: ``m = [σ(logit) > 0.5]``.
* **Block**: ``x ← x + m ⊙ mlp(norm2(x)) + adapter(x)``; attention sees every token. The
  adapter is AdaptFormer's bottleneck on the un-normalised stream of *all* tokens (down
  Kaiming-uniform(a=√5), ReLU, dropout 0.1 after the ReLU, up zero-init, zero biases, scale 1,
  no adapter LayerNorm).
* **Loss** (:func:`dyt_loss`): ``CE(dynamic) + 2·(mean(m) − r)² + CE(complete) +
  KL(complete.detach() ‖ dynamic)``, the KL written as the release writes it,
  ``kl_div(log_softmax(dynamic), log_softmax(complete.detach()), log_target=True)`` with
  ``batchmean`` and no temperature. ``mean(m)`` runs over all layers, the batch and the patch
  tokens (prefix tokens excluded); ``r`` is the target activation rate (default 0.5). The
  "complete" logits come from a second forward of the same network with every token through
  the MLP (the dispatcher is not evaluated there). The release's loss class also has a
  "token minimal" term; its VTAB recipe sets its weight to 0, so it is left out.
* **Real skipping.** The release's train/eval path only masks (MLP on every token, then × m)
  and skips for real only in a separate speed-test model. Here the eval path *is* the
  skipping path: the kept tokens of every image are gathered (flattened over the batch, so
  each image keeps its own set), sent through norm2 → MLP, and scattered back; skipped tokens
  never reach the MLP. ``gather=False`` (:func:`dyt_paths`) gives the masked path; both give
  the same logits (tested, ≤ 1e-5 in fp32). FLOPs per image are counted from the tokens each
  image actually sent through the MLPs (:func:`flops_model`).
* **Count** on ViT-B/16 (head excluded): per block ``(768 + 1)`` for the dispatcher plus
  ``768·k + k + k·768 + 768`` for the adapter of rank k, i.e. ``18,444·(k + 1)``: 165,996 at
  k = 8 (the release's argparse default, the default here) and 313,548 at k = 16 (what its
  VTAB script passes).
* Not the identity at init (the random dispatcher already skips about half of the MLP
  updates) and not mergeable (the skipping is data-dependent).

What a run stores beyond the weights (:meth:`DyT.test_artifacts`, measured on the test split
after training): per-image, per-layer activation rates with labels and predictions, the mean
mask as a patch grid, FLOPs per image, masks and dispatcher probabilities of the first
:data:`SAMPLE_IMAGES` test images (with the images, for overlays), the per-layer overlap of
the kept tokens with the frozen model's top-CLS-attention tokens, and in-run latencies of the
skipping and the non-skipping model. :mod:`vpeft_viz.analysis.dyt` reads them for the view.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import param
from ..probes.attention import attention_maps
from ._base import MethodConfig, PeftMethod
from ._layers import BlockWrapper, Bottleneck, vit_blocks
from ._registry import register_method

SAMPLE_IMAGES = 16  # test images whose masks and probabilities are stored for overlays
ATTENTION_IMAGES = 256  # test images of the kept-tokens vs CLS-attention comparison
ATTENTION_CHUNK = 8  # images per attention probe call (ViT-B: ~180 MB of maps)
RATE_WEIGHT = 2.0  # the release's token_loss_ratio
ROUTES = ("dispatch", "complete", "frozen")


@dataclass
class DyTConfig(MethodConfig):
    rank: int = param(8, "Bottleneck width of the adapter beside each MLP.", min=1, max=4096)
    r: float = param(0.5, "Target activation rate: the share of patch tokens each MLP should "
                     "process, pulled towards by the 2·(mean(m) − r)² loss term.",
                     min=0.01, max=1.0)
    tau: float = param(5.0, "Temperature τ of the Gumbel-sigmoid during training.",
                       min=0.01, max=100.0)
    dropout: float = param(0.1, "Dropout inside the adapter, after the ReLU.", min=0.0, max=0.9)


def gumbel_sigmoid_hard(logits: torch.Tensor, tau: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``σ((logits + g1 − g2)/τ)`` hardened at 0.5, straight-through: the forward value is
    0/1, the gradient is the soft sigmoid's."""
    def gumbel() -> torch.Tensor:
        u = torch.empty_like(logits).exponential_(generator=generator)
        return -u.log()

    soft = torch.sigmoid((logits + gumbel() - gumbel()) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class DynamicBlock(BlockWrapper):
    """A timm block whose MLP sees only the tokens its dispatcher keeps, plus an adapter.

    ``route`` picks the forward: ``"dispatch"`` (DyT), ``"complete"`` (every token through
    the MLP, the adapter on: the loss's second forward), ``"frozen"`` (the original block).
    ``gather`` picks how ``dispatch`` runs in eval mode: gather → MLP → scatter (True, real
    skipping) or the MLP on every token times the mask (False, the release's eval path).
    After a dispatch forward, ``last_mask`` (batch × patch tokens; with the straight-through
    gradient in training) and ``last_prob`` (σ(logit), detached) hold what it decided.
    """

    def __init__(self, block, rank: int, tau: float, dropout: float, num_prefix: int):
        super().__init__(block)
        dim = block.norm2.normalized_shape[0]
        self.dispatcher = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.dispatcher.weight, std=0.02)
        nn.init.zeros_(self.dispatcher.bias)
        self.adapter = Bottleneck(dim, rank, bias=True, act="relu", dropout=dropout)
        self.tau, self.num_prefix = tau, num_prefix
        self.route, self.gather = "dispatch", True
        self.last_mask: torch.Tensor | None = None
        self.last_prob: torch.Tensor | None = None

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.route == "frozen":
            return super().mlp_branch(x)
        adapted = self.adapter(x)
        if self.route == "complete":
            return super().mlp_branch(x) + adapted
        p = self.num_prefix
        logits = self.dispatcher(x[:, p:]).squeeze(-1).float()
        prob = torch.sigmoid(logits)
        mask = (gumbel_sigmoid_hard(logits, self.tau) if self.training
                else (prob > 0.5).float())
        self.last_mask, self.last_prob = mask, prob.detach()
        keep = torch.cat([mask.new_ones(mask.shape[0], p), mask], 1).to(x.dtype)
        if self.training or not self.gather:
            return keep.unsqueeze(-1) * super().mlp_branch(x) + adapted
        return self._gathered_mlp(x, keep.bool()) + adapted

    def _gathered_mlp(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The MLP branch on the kept tokens only, zero elsewhere (eval mode)."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        idx = keep.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros_like(flat)
        if idx.numel():
            y = super().mlp_branch(flat.index_select(0, idx)[None])[0]
            out.index_copy_(0, idx, y.to(out.dtype))  # autocast may run the MLP in bf16
        return out.view(b, n, d)


def dyt_blocks(model: nn.Module) -> list[DynamicBlock]:
    blocks = [b for b in getattr(model, "blocks", ()) if isinstance(b, DynamicBlock)]
    if not blocks:
        raise TypeError("the model has no DyT blocks: attach the dyt method first")
    return blocks


@contextlib.contextmanager
def dyt_paths(model: nn.Module, *, route: str = "dispatch", gather: bool = True
              ) -> Iterator[list[DynamicBlock]]:
    """Run the DyT blocks of ``model`` along ``route`` (see :class:`DynamicBlock`) for the
    duration; the previous settings are restored afterwards."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
    blocks = dyt_blocks(model)
    saved = [(b.route, b.gather) for b in blocks]
    for b in blocks:
        b.route, b.gather = route, gather
    try:
        yield blocks
    finally:
        for b, (r, g) in zip(blocks, saved):
            b.route, b.gather = r, g


def dyt_loss(dynamic: torch.Tensor, complete: torch.Tensor, masks: torch.Tensor,
             labels: torch.Tensor, criterion: nn.Module, r: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DyT's four-term loss; ``masks`` is (batch, layers, patch tokens). Returns the total and
    each term (``ce``, ``rate``, ``ce_complete``, ``kl``), the rate term already weighted."""
    dynamic, complete = dynamic.float(), complete.float()
    terms = {
        "ce": criterion(dynamic, labels),
        "rate": RATE_WEIGHT * (masks.float().mean() - r) ** 2,
        "ce_complete": criterion(complete, labels),
        "kl": F.kl_div(F.log_softmax(dynamic, -1), F.log_softmax(complete.detach(), -1),
                       reduction="batchmean", log_target=True),
    }
    return sum(terms.values()), terms


@register_method("dyt")
class DyT(PeftMethod):
    Config = DyTConfig
    title = "DyT"
    view_page = "6_DyT.py"
    cached_seeds = (0,)
    cached_variants = (("r0.3", {"r": 0.3}, ("count",)),)  # a second target for the r views
    vit_b_counts = (({}, 165_996), ({"rank": 16}, 313_548))  # 18,444 · (rank + 1)
    summary = ("Let a tiny scorer in every block decide which image patches go through the "
               "MLP (the rest skip it), with a small adapter beside the MLP on all of them.")
    paper = "https://arxiv.org/abs/2403.11808"
    identity_at_init = False

    def attach(self, model: nn.Module) -> None:
        c = self.config
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        model.blocks = nn.Sequential(*[DynamicBlock(b, c.rank, c.tau, c.dropout, prefix)
                                       for b in vit_blocks(model)])

    def training_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = dyt_blocks(model)
        with dyt_paths(model, route="dispatch"):
            dynamic = model(images)
        masks = torch.stack([b.last_mask for b in blocks], 1)
        with dyt_paths(model, route="complete"):
            complete = model(images)
        loss, _ = dyt_loss(dynamic, complete, masks, labels, criterion, self.config.r)
        return loss, dynamic

    def test_artifacts(self, model: nn.Module, loader: Iterable, *,
                       device: torch.device) -> dict[str, Any]:
        return measure_test_split(model, loader, device=device)


# -- measurements on the test split -----------------------------------------------------------
@dataclass
class FlopModel:
    """FLOPs of one image as ``fixed + per_token · (patch tokens sent through MLPs)``.

    ``per_token`` is one token's MLP (fc1 + fc2 matmuls); ``fixed`` is everything else (patch
    embedding, attention on all tokens, adapters, dispatchers, prefix tokens' MLPs, head),
    both counted by torch's FLOP counter; ``complete`` is the model with no skipping.
    """

    fixed: int
    per_token: int
    complete: int

    def of(self, kept_tokens: np.ndarray) -> np.ndarray:
        return self.fixed + self.per_token * np.asarray(kept_tokens, dtype=np.int64)


def _counted_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_model(model: nn.Module, image: torch.Tensor) -> FlopModel:
    """Calibrate :class:`FlopModel` on one image (eval mode, skipping path)."""
    blocks = dyt_blocks(model)
    was = model.training
    model.eval()
    try:
        base = blocks[0].base_layer
        d = base.norm2.normalized_shape[0]
        per_token = _counted_flops(lambda: base.mlp(image.new_zeros(1, 1, d)))
        with dyt_paths(model, route="dispatch", gather=True):
            measured = _counted_flops(lambda: model(image[:1]))
            kept = sum(int(b.last_mask.sum()) for b in blocks)
        with dyt_paths(model, route="complete"):
            complete = _counted_flops(lambda: model(image[:1]))
    finally:
        model.train(was)
    return FlopModel(fixed=measured - per_token * kept, per_token=per_token, complete=complete)


def _display_images(images: torch.Tensor, dataset: Any) -> np.ndarray:
    """uint8 (n, H, W, 3) for overlays: undo the loader's normalisation when it is known,
    else stretch each channel to its own range (the normalisation is per-channel affine)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    else:
        lo = x.amin((2, 3), keepdim=True)
        x = (x - lo) / (x.amax((2, 3), keepdim=True) - lo).clamp_min(1e-12)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _median_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def cls_attention(model: nn.Module, images: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(batch, layers, patch tokens): the CLS token's attention to each patch token, averaged
    over heads, in the *frozen* model (adapters and dispatchers bypassed)."""
    out = []
    with dyt_paths(model, route="frozen"):
        for chunk in images.split(ATTENTION_CHUNK):  # full maps of every layer: keep it small
            maps = attention_maps(model, chunk)
            out.append(torch.stack([a[:, :, 0, num_prefix:].mean(1) for a in maps], 1))
    return torch.cat(out)


def kept_vs_attention(masks: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Per image and layer, the share of kept tokens that are among the same number of
    top-CLS-attention tokens: (batch, layers), NaN where a layer kept nothing. Chance level
    for a random selection of k of P tokens is k/P."""
    k = masks.sum(-1).long()
    rank = attention.argsort(-1, descending=True).argsort(-1)  # 0 = most attended
    top = rank < k.unsqueeze(-1)
    hits = (top & masks.bool()).sum(-1).float()
    return torch.where(k > 0, hits / k.clamp_min(1).float(), torch.full_like(hits, math.nan))


@torch.no_grad()
def measure_test_split(model: nn.Module, loader: Iterable, *,
                       device: torch.device) -> dict[str, Any]:
    """Everything the DyT view shows, measured on the test split in eval mode."""
    blocks = dyt_blocks(model)
    p = blocks[0].num_prefix
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    model.eval()
    rates, labels, preds, kept_all = [], [], [], []
    mask_sum: torch.Tensor | None = None
    sample: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "masks", "probs", "attn")}
    overlaps: list[torch.Tensor] = []
    n_seen = 0
    first_batch: torch.Tensor | None = None
    dataset = getattr(loader, "dataset", None)
    for images, y in loader:
        images = images.to(device)
        first_batch = images if first_batch is None else first_batch
        with dyt_paths(model, route="dispatch", gather=True):
            logits = model(images)
        masks = torch.stack([b.last_mask for b in blocks], 1)  # (B, L, P)
        probs = torch.stack([b.last_prob for b in blocks], 1)
        kept = masks.sum(-1)
        rates.append((kept / masks.shape[-1]).cpu())
        kept_all.append(kept.sum(-1).long().cpu())
        labels.append(y.cpu())
        preds.append(logits.argmax(1).cpu())
        mask_sum = masks.sum(0) if mask_sum is None else mask_sum + masks.sum(0)
        take = max(0, SAMPLE_IMAGES - n_seen)
        need_attn = max(0, ATTENTION_IMAGES - n_seen)
        if need_attn:
            att = cls_attention(model, images[:need_attn], p)
            overlaps.append(kept_vs_attention(masks[:need_attn], att).cpu())
            if take:
                sample["attn"].append(att[:take].cpu().numpy())
        if take:
            sample["images"].append(_display_images(images[:take], dataset))
            sample["masks"].append(masks[:take].bool().cpu().numpy())
            sample["probs"].append(probs[:take].cpu().numpy())
        n_seen += images.shape[0]
    if first_batch is None:
        raise ValueError("cannot measure DyT on an empty test split")
    flops = flops_model(model, first_batch[:1])
    kept_tokens = torch.cat(kept_all).numpy()
    overlap = torch.cat(overlaps)
    n_sample = sum(len(a) for a in sample["images"])
    out: dict[str, Any] = {
        "grid": np.array(grid, dtype=np.int64),
        "num_prefix": np.int64(p),
        "image_layer_rate": torch.cat(rates).numpy().astype(np.float32),  # (N, L)
        "labels": torch.cat(labels).numpy().astype(np.int64),
        "preds": torch.cat(preds).numpy().astype(np.int64),
        "mean_mask": (mask_sum / n_seen).cpu().numpy().astype(np.float32),  # (L, P)
        "flops_per_image": flops.of(kept_tokens),
        "flops_complete": np.int64(flops.complete),
        "flops_fixed": np.int64(flops.fixed),
        "flops_per_token": np.int64(flops.per_token),
        "attention_overlap": np.nanmean(overlap.numpy(), 0).astype(np.float32),  # (L,)
        # a random pick of k of P tokens overlaps k/P of the top k on average
        "attention_chance": torch.cat(rates)[:overlap.shape[0]].mean(0).numpy(),
        "sample_images": np.concatenate(sample["images"]),
        "sample_masks": np.concatenate(sample["masks"]),
        "sample_probs": np.concatenate(sample["probs"]).astype(np.float32),
        "sample_cls_attention": np.concatenate(sample["attn"]).astype(np.float32),
        "sample_flops": flops.of(kept_tokens[:n_sample]),
    }
    out.update(latencies(model, first_batch))
    return out


def latencies(model: nn.Module, batch: torch.Tensor, reps: int = 5) -> dict[str, np.ndarray]:
    """Median forward times (ms) of the skipping and the non-skipping (complete) model, at
    batch 1 and at up to 64 images of ``batch``; measured in the run, as noisy as its machine."""
    batch = batch[:64]
    out = {}
    for name, size in (("b1", 1), ("batch", batch.shape[0])):
        x = batch[:size]
        for route in ("dispatch", "complete"):
            with dyt_paths(model, route=route, gather=True):
                ms = _median_ms(lambda x=x: model(x), reps)
            out[f"latency_{name}_{route}_ms"] = np.float64(ms)
    out["latency_batch_size"] = np.int64(batch.shape[0])
    return out

