"""LoRA on the query and value projections of timm's fused ``qkv`` linear.

Hu et al., 2021, https://arxiv.org/abs/2106.09685. A frozen weight ``W`` gets a trainable
low-rank delta ``(alpha / r) · B A`` with ``A ∈ R^{r×d}`` (Kaiming-uniform) and
``B ∈ R^{d×r}`` (zero), so the model is unchanged at step 0. timm fuses q, k and v into one
``qkv`` linear (d → 3d); wrapping it whole would adapt k too (HF PEFT issue #691), so the
delta is added to the chosen output slices only. Merge is exact: ``W[slice] += (alpha/r) B A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import param
from ._base import MethodConfig, PeftMethod, PeftModule, replace_module
from ._layers import vit_blocks
from ._registry import register_method

SLICES = "qkv"


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = param(8, "Rank r of the update B·A: trainable weights grow linearly with it.",
                      min=1, max=1024)
    alpha: float = param(8.0, "Scale numerator: the update is multiplied by alpha / rank.",
                         min=0.0, max=1e4)
    dropout: float = param(0.0, "Dropout on the LoRA branch's input during training.",
                           min=0.0, max=0.9)
    targets: str = param("qv", "Which slices of the fused qkv projection get an update "
                         "(the paper's choice, counted in docs/methods.md, is q and v).",
                         choices=("qv", "q", "v", "qkv"))


class LoRAQKV(PeftModule):
    """Wraps a fused qkv ``nn.Linear`` and adds low-rank deltas to chosen output slices."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, targets: str):
        super().__init__()
        if base.out_features != 3 * base.in_features:
            raise TypeError(f"expected a fused qkv linear (d → 3d), got {base}")
        self.base_layer = base
        self.dim = base.in_features
        self.targets = targets
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in targets:
            a = nn.Parameter(torch.empty(rank, self.dim))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[t] = a
            self.lora_B[t] = nn.Parameter(torch.zeros(self.dim, rank))

    def delta_weight(self, target: str) -> torch.Tensor:
        return self.scaling * self.lora_B[target] @ self.lora_A[target]

    def down_projections(self, h: torch.Tensor) -> list[torch.Tensor]:
        """``h A_t^T`` for each target, in ``targets`` order (VeLoRA overrides it to keep
        less of ``h`` for the weight gradients)."""
        return [h @ self.lora_A[t].T for t in self.targets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        downs = self.down_projections(self.dropout(x))
        parts = list(out.split(self.dim, dim=-1))
        for t, d in zip(self.targets, downs):
            i = SLICES.index(t)
            parts[i] = parts[i] + self.scaling * d @ self.lora_B[t].T
        return torch.cat(parts, dim=-1)

    def merged(self) -> nn.Linear:
        """The base linear with the deltas folded in (a new module; base left untouched)."""
        lin = nn.Linear(self.dim, 3 * self.dim, bias=self.base_layer.bias is not None)
        lin = lin.to(self.base_layer.weight.device, self.base_layer.weight.dtype)
        with torch.no_grad():
            w = self.base_layer.weight.clone()
            for t in self.targets:
                i = SLICES.index(t)
                w[i * self.dim:(i + 1) * self.dim] += self.delta_weight(t)
            if not torch.isfinite(w).all():
                raise ValueError("LoRA merge produced non-finite weights")
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(self.base_layer.bias)
        return lin


@register_method("lora")
class LoRA(PeftMethod):
    Config = LoRAConfig
    title = "LoRA"
    vit_b_counts = (({"rank": 8}, 294_912),)  # 12 · 2 · (768·r + r·768)
    summary = ("Add a trainable low-rank update B·A beside the frozen query and value "
               "projections; it folds back into the weights after training.")
    paper = "https://arxiv.org/abs/2106.09685"
    mergeable = True

    def attach(self, model: nn.Module) -> None:
        c = self.config
        for block in vit_blocks(model):
            block.attn.qkv = LoRAQKV(block.attn.qkv, c.rank, c.alpha, c.dropout, c.targets)

    def merge(self, model: nn.Module) -> nn.Module:
        for name, m in list(model.named_modules()):
            if isinstance(m, LoRAQKV):
                replace_module(model, name, m.merged())
        return model
