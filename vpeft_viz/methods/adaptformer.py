"""AdaptFormer: a bottleneck adapter in parallel with each block's MLP.

Chen et al., 2022, https://arxiv.org/abs/2205.13535. Per block,
``x ← x + mlp(norm2(x)) + s · up(relu(down(x)))``: the adapter reads the un-normalised
residual stream, ``down`` is Kaiming-initialised and ``up`` zero-initialised (identity at
step 0), s = 0.1. Not mergeable: the ReLU keeps the branch non-linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import param
from ._base import MethodConfig, PeftMethod
from ._layers import BlockWrapper, Bottleneck, vit_blocks
from ._registry import register_method


@dataclass
class AdaptFormerConfig(MethodConfig):
    rank: int = param(8, "Bottleneck width of the adapter (down-projection output size).",
                      min=1, max=4096)
    scale: float = param(0.1, "Fixed multiplier s on the adapter branch.", min=0.0, max=100.0)
    dropout: float = param(0.1, "Dropout inside the adapter, after the ReLU.", min=0.0, max=0.9)


class ParallelAdapterBlock(BlockWrapper):
    """A timm block whose MLP branch gets a scaled bottleneck adapter beside it."""

    def __init__(self, block, rank: int, scale: float, dropout: float, *, bias: bool = True):
        super().__init__(block)
        dim = block.norm2.normalized_shape[0]
        self.adapter = Bottleneck(dim, rank, bias=bias, act="relu", dropout=dropout)
        self.scale = scale

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return super().mlp_branch(x) + self.scale * self.adapter(x)


@register_method("adaptformer")
class AdaptFormer(PeftMethod):
    Config = AdaptFormerConfig
    title = "AdaptFormer"
    vit_b_counts = (({"rank": 8}, 156_768),)  # 12 · (768·r + r + r·768 + 768)
    summary = ("Add a small bottleneck network beside every MLP; its output is scaled "
               "and added to the residual stream.")
    paper = "https://arxiv.org/abs/2205.13535"

    def attach(self, model: nn.Module) -> None:
        c = self.config
        model.blocks = nn.Sequential(*[ParallelAdapterBlock(b, c.rank, c.scale, c.dropout)
                                       for b in vit_blocks(model)])
