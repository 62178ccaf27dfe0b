"""VPT: Visual Prompt Tuning (shallow and deep).

Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119 (KMnP/vpt). ``p`` learnable prompt
tokens are inserted right after the CLS token. Shallow: once, at the input of the first
block. Deep: every block gets its own ``p`` new prompts, replacing the previous block's
outputs at the prompt slots. Prompts are initialised uniformly with VPT's Xavier bound
``sqrt(6 / (3·patch² + dim))`` and pass through prompt dropout, 0.0 by default (the released
config default and demo commands). The prompt slots are removed after the last block, so
the head and any pooling see only the original tokens.

Prompt count: the paper searches p per task in {1, 5, 10, 50, 100, 200}; the default here
is p = 10 (E²VPT's visual-prompt count), because p = 50 nearly doubles the embedded
backbone's 65-token sequence. On ViT-B/16 VPT-deep trains 12·768·p weights (p = 10:
92,160; p = 50: 460,800) and VPT-shallow 768·p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import param
from ._base import MethodConfig, PeftMethod
from ._layers import BlockWrapper, vit_blocks
from ._registry import register_method


@dataclass
class VPTConfig(MethodConfig):
    num_tokens: int = param(
        10, "Prompt tokens p per prompted layer. The paper searches p per task in "
        "{1, 5, 10, 50, 100, 200}; 10 keeps the embedded backbone's sequence short.",
        min=1, max=1024)
    dropout: float = param(0.0, "Dropout applied to the prompt tokens (the release's "
                           "default: 0.0).", min=0.0, max=0.9)


class PromptedBlock(BlockWrapper):
    """Inserts (first prompted block) or replaces (later ones) the prompt slots.

    ``prompts`` is None for a block that only carries earlier prompts along (VPT-shallow).
    """

    def __init__(self, block, *, prompts: nn.Parameter | None, insert: bool, remove: bool,
                 num_prefix: int, num_tokens: int, dropout: float):
        super().__init__(block)
        self.prompts = prompts
        self.insert = insert
        self.remove = remove
        self.num_prefix = num_prefix
        self.num_tokens = num_tokens
        self.dropout = nn.Dropout(dropout)

    def before(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompts is None:
            return x
        n, p = self.num_prefix, self.num_tokens
        prompts = self.dropout(self.prompts).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, n:] if self.insert else x[:, n + p:]
        return torch.cat([x[:, :n], prompts.to(x.dtype), rest], dim=1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.remove:
            n, p = self.num_prefix, self.num_tokens
            x = torch.cat([x[:, :n], x[:, n + p:]], dim=1)
        return x


def _prompt(num_tokens: int, dim: int, patch: int) -> nn.Parameter:
    bound = math.sqrt(6.0 / float(3 * patch * patch + dim))
    return nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))


class _VPT(PeftMethod):
    deep: bool = False
    identity_at_init = False

    def attach(self, model: nn.Module) -> None:
        c = self.config
        blocks = vit_blocks(model)
        dim, patch = model.embed_dim, model.patch_embed.patch_size[0]
        wrapped = []
        for i, b in enumerate(blocks):
            has_prompts = self.deep or i == 0
            wrapped.append(PromptedBlock(
                b, prompts=_prompt(c.num_tokens, dim, patch) if has_prompts else None,
                insert=i == 0, remove=i == len(blocks) - 1, num_prefix=model.num_prefix_tokens,
                num_tokens=c.num_tokens, dropout=c.dropout))
        model.blocks = nn.Sequential(*wrapped)

    def artifacts(self, model: nn.Module) -> dict:
        return {f"prompts/{i}": b.prompts.detach().cpu().numpy()
                for i, b in enumerate(model.blocks)
                if isinstance(b, PromptedBlock) and b.prompts is not None}


@dataclass
class VPTShallowConfig(VPTConfig):
    """VPT-shallow: prompts at the input only."""


@dataclass
class VPTDeepConfig(VPTConfig):
    """VPT-deep: new prompts at every layer."""


@register_method("vpt-shallow")
class VPTShallow(_VPT):
    Config = VPTShallowConfig
    title = "VPT-shallow"
    cached_seeds = (0,)
    vit_b_counts = (({}, 7_680), ({"num_tokens": 50}, 38_400))  # 768 · p; default p = 10
    summary = "Prepend learnable prompt tokens to the input sequence of the frozen ViT."
    paper = "https://arxiv.org/abs/2203.12119"


@register_method("vpt-deep")
class VPTDeep(_VPT):
    Config = VPTDeepConfig
    title = "VPT-deep"
    cached_seeds = (0,)
    vit_b_counts = (({}, 92_160), ({"num_tokens": 50}, 460_800))  # 12 · 768 · p; default p = 10
    summary = "Give every transformer layer its own learnable prompt tokens."
    paper = "https://arxiv.org/abs/2203.12119"
    deep = True
