"""The ``hst`` method: its settings, how it rebuilds the ViT's forward, what a run stores."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...config import param
from .._base import MethodConfig, PeftMethod
from .._layers import vit_blocks
from .._registry import register_method
from .layout import MAX_STAGES, SideLayout, side_layout
from .modules import HSTSide, MetaBlock


@dataclass
class HSTConfig(MethodConfig):
    meta_tokens: int = param(1, "Meta tokens per ViT layer (the release's metaG_num).",
                             min=1, max=16)
    stages: int = param(0, "Side stages: 0 picks the largest divisor of the backbone's depth "
                        f"not above {MAX_STAGES} (4 on ViT-B, 3 on the embedded backbone); "
                        "otherwise a divisor of the depth.", min=0, max=MAX_STAGES)
    drop_path: float = param(0.1, "Stochastic depth of the side blocks, rising linearly to "
                             "this value (the release's VTAB scripts: 0.1).", min=0.0, max=0.9)


class HSTForward:
    """The forward of a ViT carrying HST (mixed into its class by :meth:`HST.attach`).

    Patch embedding, positions and the ViT blocks (each with its meta token) run as before;
    the side network reads the image and every block's meta and patch outputs, and the head
    reads the side network's pooled, batch-normalised features. The ViT's final norm and
    its CLS output are not used.
    """

    hst: HSTSide

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("HST does not take attention masks (its meta tokens would need "
                             "their own rows)")
        image = x
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        metas, patches = [], []
        for blk in self.blocks:
            x = blk(x)
            metas.append(blk.meta_out)
            patches.append(blk.patch_out)
            blk.meta_out = blk.patch_out = None  # no graph kept alive between forwards
        return self.hst(image, metas, patches)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.hst.pool(x))
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head on the side network's features (the pooling is HST's own)."""
        ref = self.hst.fc_norm.running_mean
        self.num_classes = num_classes
        self.head = (nn.Linear(self.hst.layout.out_features, num_classes, device=ref.device)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)


@functools.cache
def hst_class(base: type) -> type:
    """``base`` (a timm ViT class) with :class:`HSTForward`'s forward."""
    return type(f"HST{base.__name__}", (HSTForward, base), {"__module__": __name__})


def backbone_layout(model: nn.Module, stages: int = 0) -> SideLayout:
    """:func:`~.layout.side_layout` of a timm ViT, with clear errors for what HST cannot
    carry."""
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("HST needs a fixed input size; this backbone has dynamic_img_size")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise ValueError("HST needs every patch token in every layer; switch patch dropout off")
    return side_layout(depth=len(vit_blocks(model)), vit_grid=tuple(pe.grid_size),
                       image=tuple(pe.img_size), stages=stages)


def hst_side(model: nn.Module) -> HSTSide:
    side = getattr(model, "hst", None)
    if not isinstance(side, HSTSide):
        raise TypeError("the model carries no HST side network: attach the hst method first")
    return side


def meta_blocks(model: nn.Module) -> list[MetaBlock]:
    hst_side(model)
    return [b for b in model.blocks if isinstance(b, MetaBlock)]


@register_method("hst")
class HST(PeftMethod):
    Config = HSTConfig
    title = "HST"
    summary = ("Keep the ViT frozen and grow a small convolutional-transformer side network "
               "beside it, fed each layer's features and a learned meta token; the classifier "
               "reads the side network.")
    paper = "https://arxiv.org/abs/2310.05393"
    identity_at_init = False  # the head reads a new, randomly initialised side network
    mergeable = False
    view_page = "10_HST.py"
    cached_seeds = (0,)
    # 9,216 meta + 1,296 meta norms + 166,104 bridges + 36,864 block norms + 5,120 stem +
    # 83,496 downsampling + 462,312 side blocks + 432 stage norms (docs/methods.md, HST)
    vit_b_counts = (({}, 764_840), ({"meta_tokens": 2}, 774_056), ({"stages": 2}, 1_137_216))

    def __init__(self, config: HSTConfig | None = None):
        super().__init__(config)
        self.layout: SideLayout | None = None
        self._meta_init: list[torch.Tensor] = []

    def attach(self, model: nn.Module) -> None:
        if isinstance(model, HSTForward):
            raise ValueError("the model already carries HST")
        c = self.config
        layout = backbone_layout(model, c.stages)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        model.blocks = nn.Sequential(*[MetaBlock(b, c.meta_tokens, prefix)
                                       for b in vit_blocks(model)])
        model.hst = HSTSide(layout, vit_dim=model.embed_dim,
                            in_chans=model.patch_embed.proj.in_channels, drop_path=c.drop_path)
        model.__class__ = hst_class(type(model))
        model.num_features = model.head_hidden_size = layout.out_features
        model.reset_classifier(model.num_classes)
        self.layout = layout
        self._meta_init = [b.meta.detach().clone() for b in model.blocks]

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        """The meta tokens' norms per layer (trained, at init, and how far they moved) and
        the side network's layout."""
        from .trace import layout_arrays

        metas = [b.meta.detach().float().cpu() for b in meta_blocks(model)]
        out = layout_arrays(hst_side(model).layout)
        out["meta_param_norm"] = np.array([m.norm().item() for m in metas], dtype=np.float32)
        if len(self._meta_init) == len(metas):
            init = [m.float().cpu() for m in self._meta_init]
            out["meta_init_norm"] = np.array([m.norm().item() for m in init], dtype=np.float32)
            out["meta_shift_norm"] = np.array([(m - m0).norm().item()
                                               for m, m0 in zip(metas, init)], dtype=np.float32)
        return out

    def test_artifacts(self, model: nn.Module, loader: Iterable, *,
                       device: torch.device) -> dict[str, Any]:
        from .trace import measure_test_split

        return measure_test_split(model, loader, device=device)
