"""Building blocks shared by several methods."""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..backbones import vit_blocks  # noqa: F401  (re-exported for the methods)
from ._base import PeftModule


class BlockWrapper(PeftModule):
    """Runs a timm ``Block``'s two residual branches with hooks between them.

    Only the block's public submodules are used (norm1, attn, ls1, drop_path1, norm2, mlp,
    ls2, drop_path2), so timm's attention code runs unchanged. Subclasses override:

    * ``before(x)``     — edit the token sequence entering the block (prompts);
    * ``after_attn(x)`` — edit the residual stream after the attention residual (SCT);
    * ``mlp_branch(x)`` — the MLP residual branch, given the un-normalised stream
      (AdaptFormer, DyT).
    """

    def __init__(self, block: Block):
        super().__init__()
        self.base_layer = block

    def before(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_attn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return b.drop_path2(b.ls2(b.mlp(b.norm2(x))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b = self.base_layer
        x = self.before(x)
        attn = b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + b.drop_path1(b.ls1(attn))
        x = self.after_attn(x)
        return x + self.mlp_branch(x)


class Bottleneck(nn.Module):
    """``up(act(down(x)))``: the adapter used by AdaptFormer, DyT and low-bit adapters.

    ``down`` is Kaiming-uniform initialised and ``up`` zero-initialised, so the branch
    outputs exactly zero at step 0. Both biases start at zero unless ``zero_down_bias`` is
    False: then ``down``'s bias keeps PyTorch's default uniform init (SPT's released adapter
    leaves it so; its output is still zero at step 0, because ``up`` is zero).
    """

    def __init__(self, dim: int, rank: int, *, bias: bool = True, act: str = "relu",
                 dropout: float = 0.0, zero_down_bias: bool = True):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=bias)
        self.act = nn.ReLU() if act == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(rank, dim, bias=bias)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        if bias:
            if zero_down_bias:
                nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))
