"""SCT: Salient Channel Tuning.

Zhao et al., IJCV 2024, https://arxiv.org/abs/2309.08513 (showlab/SCT,
``train_model_sct.py::getSalientChannels``).

* **Selection** (:func:`vpeft_viz.probes.activations.class_channel_norms`). The frozen
  pretrained model sees every training image once (eval mode, no augmentation). At the input
  of each block's ``norm2`` — the residual stream right after the attention residual — the
  prefix tokens are dropped and, for every class c, each channel's L2 norm over that
  class's images × tokens is taken: ``n_c[j] = sqrt(Σ_{images of c, tokens} x_j²)``. The
  class-aware importance (CAIS) is the mean of ``n_c`` over the classes; the top K channels
  per block are kept (K = 96 of 768, 1/8 of the width, by default). The *plain* score
  ``sqrt(Σ_{all images, tokens} x_j²)`` is kept too, for the class-aware vs plain comparison
  view. Three choices differ from the release (``getSalientChannels``), on purpose:

  - *Images*: the run's training split only (train800 on a VTAB-1k task). The release scores
    train800val200 (1,000 images) because it trains on those and picks its checkpoint on
    the test set; here the validation split selects the checkpoint, so it must not inform
    the channel choice either.
  - *Tokens*: all ``num_prefix_tokens`` prefix tokens are dropped (CLS and any register or
    distillation tokens); the release drops only token 0. Identical on a plain ViT (one
    prefix token).
  - *Ties*: :func:`top_channels` is a stable top-K, so it always returns exactly K channels
    (equal scores: the lower index wins). The release keeps the channels strictly above the
    (K+1)-th largest score, so a tie at that boundary returns fewer than K.
* **Module** (:class:`SalientChannelBlock`). After the attention residual,
  ``x[..., S] ← x[..., S] + s · (W x[..., S] + b)`` with a K×K linear (trunc-normal std 0.02,
  zero bias): 12·(96² + 96) = 111,744 parameters on ViT-B/16. s = 1 by default, which is
  the released code: its scaled line (``scale · …``) is commented out in showlab/SCT
  ``models/vision_transformer_sct.py``, so no scale is applied there, although its per-task
  configs still carry a ``scale`` value. Any other s is this project's extension. Not the
  identity at init (W is random) and not mergeable (a K×K matmul per block stays).

Where the maths lives: the channel norms are the activation probe
:func:`vpeft_viz.probes.activations.class_channel_norms`; the top-K selection is here;
:mod:`vpeft_viz.analysis.saliency` compares stored selections for the views (overlap between
tasks, class-aware vs plain selection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import param
from ..probes.activations import ChannelNorms, class_channel_norms
from ._base import MethodConfig, PeftMethod
from ._layers import BlockWrapper, vit_blocks
from ._registry import register_method

Progress = Callable[[int, int], None]


@dataclass
class SCTConfig(MethodConfig):
    k: int | None = param(None, "Salient channels K tuned per block; empty: 1/8 of the width "
                          "(96 on ViT-B/16).", min=1, max=65536)
    scale: float = param(1.0, "Multiplier s on the K×K update. 1 is the released code (its "
                         "scaled line is commented out); other values are an extension.",
                         min=0.0, max=100.0)
    seed: int = param(0, "Seed of the K×K layers' initialisation.", min=0, max=2**31 - 1)


def top_channels(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring channels of each row, sorted by index.

    Always exactly ``k`` (ties: the lower index wins), so every block gets the same K×K
    layer; the release's strict threshold would return fewer on a tie at the boundary.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1)


def default_k(width: int) -> int:
    return max(1, width // 8)


class SalientChannelBlock(BlockWrapper):
    """A timm block that updates its salient channels after the attention residual."""

    def __init__(self, block, channels: torch.Tensor, scale: float):
        super().__init__(block)
        k = channels.numel()
        self.register_buffer("channels", channels.long())
        self.scale = scale
        self.adapt = nn.Linear(k, k)
        nn.init.trunc_normal_(self.adapt.weight, std=0.02)
        nn.init.zeros_(self.adapt.bias)

    def after_attn(self, x: torch.Tensor) -> torch.Tensor:
        picked = x.index_select(-1, self.channels)
        return x.index_add(-1, self.channels, self.adapt(picked).to(x.dtype), alpha=self.scale)


@register_method("sct")
class SCT(PeftMethod):
    Config = SCTConfig
    title = "SCT"
    view_page = "5_SCT.py"
    cached_seeds = (0,)
    vit_b_counts = (({}, 111_744),)  # K = 768/8 = 96: 12 · (96² + 96)
    summary = ("Find the channels each block uses most for the task's classes and train a "
               "small K×K layer that mixes only those channels.")
    paper = "https://arxiv.org/abs/2309.08513"
    identity_at_init = False
    needs_data = True

    def __init__(self, config: SCTConfig | None = None):
        super().__init__(config)
        self.channels: list[list[int]] | None = None
        self.saliency: ChannelNorms | None = None

    def resolve_k(self, width: int) -> int:
        k = self.config.k if self.config.k is not None else default_k(width)
        if k > width:
            raise ValueError(f"sct.k = {k} exceeds the model width {width}")
        return k

    def prepare(self, model: nn.Module, loader, *, device: torch.device, progress=None) -> None:
        width = vit_blocks(model)[0].norm2.normalized_shape[0]
        k = self.resolve_k(width)
        self.saliency = class_channel_norms(model, loader, device=device, progress=progress)
        self.channels = top_channels(self.saliency.class_aware, k).tolist()

    def state(self) -> dict[str, Any]:
        if self.channels is None:
            return {}
        out: dict[str, Any] = {"channels": self.channels}
        if self.saliency is not None:
            out["images"] = self.saliency.images
            out["classes"] = int((self.saliency.class_counts > 0).sum())
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.channels = [list(map(int, c)) for c in state["channels"]]

    def counting_state(self, model: nn.Module) -> dict[str, Any]:
        """Any K channels per block give the same count: the first K stand in."""
        blocks = vit_blocks(model)
        k = self.resolve_k(blocks[0].norm2.normalized_shape[0])
        return {"channels": [list(range(k)) for _ in blocks]}

    def attach(self, model: nn.Module) -> None:
        if self.channels is None:
            raise RuntimeError("sct needs prepare() (or load_state()) before attach")
        blocks = vit_blocks(model)
        if len(self.channels) != len(blocks):
            raise ValueError(f"sct state has {len(self.channels)} blocks, model {len(blocks)}")
        width = blocks[0].norm2.normalized_shape[0]
        device = blocks[0].norm2.weight.device
        wrapped = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            for b, chans in zip(blocks, self.channels):
                idx = torch.tensor(chans, dtype=torch.long)
                distinct = idx.unique().numel() == idx.numel()
                if idx.numel() == 0 or int(idx.max()) >= width or not distinct:
                    raise ValueError(f"sct channels must be distinct indices below {width}")
                wrapped.append(SalientChannelBlock(b, idx, self.config.scale).to(device))
        model.blocks = nn.Sequential(*wrapped)

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.channels is not None:
            out["channels"] = np.array(self.channels, dtype=np.int64)
        if self.saliency is not None:
            out["scores_class_aware"] = self.saliency.class_aware
            out["scores_plain"] = self.saliency.plain
            out["class_counts"] = self.saliency.class_counts
        return out
