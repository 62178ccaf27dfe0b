"""SSF: Scaling & Shifting your Features.

Lian et al., NeurIPS 2022, https://arxiv.org/abs/2210.08823 (dongzelian/SSF). After an
operation with output y: ``y ← γ ⊙ y + β`` per channel, γ ~ N(1, 0.02²), β ~ N(0, 0.02²)
(so not exactly the identity at init). Inserted in every block after norm1, qkv, proj, fc1
(before GELU), fc2 and norm2, plus after the patch embedding and the final norm.

Merge is exact (the official repository does not ship it): after a linear or convolution
``W' = diag(γ) W, b' = γ ⊙ b + β``; after a LayerNorm the same fold into its affine.

Two placements differ from the release (dongzelian/SSF ``models/vision_transformer.py``) on
backbones other than the plain ViT-B/16 (where both agree, 205,824 parameters):

* *Patch-embedding norm.* With a LayerNorm inside ``patch_embed`` the release inserts two
  SSFs, after the projection and after that norm; here there is one, after the norm
  (``patch_embed.norm``; an Identity on plain ViTs, so there it is the projection's output).
  The release's extra SSF (2·dim more parameters) is not built: inside timm's PatchEmbed the
  projection's output is channels-first (B, C, H, W) and may stay so (``flatten=False``),
  which the channels-last ScaleShift does not handle.
* *Average-pooled ViTs* (``global_pool='avg'``: ``norm`` is an Identity and ``fc_norm``
  normalises after pooling). The release's final SSF sits after the Identity ``norm``, on
  the tokens, before pooling and before ``fc_norm``; here it follows ``fc_norm``, so γ, β
  fold into that LayerNorm's affine and the merge stays exact (a scale before a LayerNorm
  does not fold into it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import param
from ._base import MethodConfig, NotMergeableError, PeftMethod, PeftModule, replace_module
from ._layers import vit_blocks
from ._registry import register_method

BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm2")


@dataclass
class SSFConfig(MethodConfig):
    init_std: float = param(0.02, "Std of the N(1, σ²) scale and N(0, σ²) shift initialisation "
                            "(0 makes SSF exactly the identity at init).", min=0.0, max=1.0)


class ScaleShift(PeftModule):
    """``base(x) * scale + shift`` over the last (channel) dimension."""

    def __init__(self, base: nn.Module, dim: int, init_std: float):
        super().__init__()
        self.base_layer = base
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale + self.shift


def _out_dim(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0]
    raise TypeError(f"SSF cannot follow a {type(m).__name__}")


def _fold_target(model: nn.Module, name: str, ss: ScaleShift) -> nn.Module:
    """The module γ, β fold into, or NotMergeableError naming the site and the reason.

    A plain timm model of the same architecture must take the merged weights as they are,
    so a site whose target lacks an affine or a bias (``qkv_bias=False``, a LayerNorm
    without affine) cannot be merged: the shift β would need a parameter it does not have.
    """
    base = ss.base_layer
    if isinstance(base, nn.Identity):
        if name != "patch_embed.norm":  # e.g. `norm` of a ViT built with final_norm=False
            raise NotMergeableError(
                f"SSF after {name} follows an Identity with no weights to fold into; "
                "use the unmerged model")
        base = model.patch_embed.proj
    if isinstance(base, nn.LayerNorm) and not base.elementwise_affine:
        raise NotMergeableError(f"SSF after {name}: the LayerNorm has no affine parameters "
                                "to fold into; use the unmerged model")
    if not isinstance(base, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
        raise NotMergeableError(f"SSF after {name}: cannot fold into a {type(base).__name__}")
    if base.bias is None:
        raise NotMergeableError(
            f"SSF after {name}: the shift needs a bias there, but the backbone has none "
            "(built with bias=False, e.g. qkv_bias=False), so the merged weights would not "
            "load into the same architecture; use the unmerged model")
    return base


def _fold(ss: ScaleShift, target: nn.Module) -> None:
    """Fold γ, β into ``target`` (Linear, Conv2d or LayerNorm with weight and bias) in place."""
    g, b = ss.scale.detach(), ss.shift.detach()
    with torch.no_grad():
        w = target.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        new_w = w * g.view(shape)
        new_b = target.bias * g + b
        if not (torch.isfinite(new_w).all() and torch.isfinite(new_b).all()):
            raise ValueError("SSF merge produced non-finite weights")
        w.copy_(new_w)
        target.bias.copy_(new_b)


@register_method("ssf")
class SSF(PeftMethod):
    Config = SSFConfig
    title = "SSF"
    vit_b_counts = (({}, 205_824),)  # 12 · 2 · (768+2304+768+3072+768+768) + 2 · 1536
    summary = ("Learn a per-channel scale and shift after every operation; they fold back "
               "into the weights, so inference costs nothing extra.")
    paper = "https://arxiv.org/abs/2210.08823"
    identity_at_init = False
    mergeable = True

    def sites(self, model: nn.Module) -> list[str]:
        """Module names SSF follows, in forward order."""
        names = ["patch_embed.norm"]
        for i, _ in enumerate(vit_blocks(model)):
            names += [f"blocks.{i}.{s}" for s in BLOCK_SITES]
        # Average-pooled ViTs leave `norm` an Identity and normalise after pooling (fc_norm):
        # follow that LayerNorm instead, so the factors still fold into an affine.
        pooled_norm = isinstance(model.norm, nn.Identity) and isinstance(
            getattr(model, "fc_norm", None), nn.LayerNorm)
        return names + ["fc_norm" if pooled_norm else "norm"]

    def attach(self, model: nn.Module) -> None:
        std = self.config.init_std
        embed_dim = model.embed_dim
        for name in self.sites(model):
            base = model.get_submodule(name)
            dim = embed_dim if isinstance(base, nn.Identity) else _out_dim(base)
            replace_module(model, name, ScaleShift(base, dim, std))

    def merge(self, model: nn.Module) -> nn.Module:
        sites = [(name, m) for name, m in model.named_modules() if isinstance(m, ScaleShift)]
        # Every site is checked before any weight changes, so a refusal leaves `model` intact.
        targets = [_fold_target(model, name, m) for name, m in sites]
        for (name, m), target in zip(sites, targets):
            _fold(m, target)
            replace_module(model, name, m.base_layer)
        return model

    def artifacts(self, model: nn.Module) -> dict:
        """γ and β per site, for the scale/shift distribution views."""
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, ScaleShift):
                out[f"scale/{name}"] = m.scale.detach().cpu().numpy()
                out[f"shift/{name}"] = m.shift.detach().cpu().numpy()
        return out
