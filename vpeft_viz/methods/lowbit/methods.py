"""Bi-AdaptFormer and Bi-LoRA: adapters whose weights are quantised to 1–8 bits.

Jie et al., "Revisiting the Parameter Efficiency of Adapters from the Perspective of
Precision Redundancy", ICCV 2023, https://arxiv.org/abs/2307.16867.

* **Bi-AdaptFormer**: per block, ``x ← x + mlp(norm2(x)) + s · up(dropout(relu(down(x))))``
  on the un-normalised residual stream, both projections bias-free and quantised
  (:class:`~vpeft_viz.methods.lowbit.quant.QLinear`), hidden width 32. ``down`` has
  PyTorch's default Linear init; ``up`` is trunc-normal (std 1e-3, clipped to ±2e-3), so a
  quantised adapter is not the identity at step 0 — at 32 bits ``up`` is zero and the
  adapter is a plain fp32 one.
* **Bi-LoRA**: per block, two rank-32 branches ``s · up(dropout(down(h)))`` on the query and
  the value, fed the attention input ``h = norm1(x)``, no activation, same init and
  quantisation.

Counts on ViT-B/16: 12·2·768·32 = 589,824 (Bi-AdaptFormer) and 12·2·2·768·32 = 1,179,648
(Bi-LoRA) weights; at 1 bit they are stored in 73,920 and 147,840 bytes (codes + μ, σ per
matrix; :meth:`LowBitMethod.stored_bytes`). A run writes them in that packed form
(:meth:`LowBitMethod.pack_weights`) and reads them back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...config import param
from .._base import MethodConfig, PeftMethod, PeftModule
from .._layers import BlockWrapper, vit_blocks
from .._registry import register_method
from . import quant
from .quant import BITS, QLinear

SCALES = (0.01, 0.1, 1.0, 10.0)
VIEW_PAGE = "7_Flatness.py"
HIST_BINS = 80


def _bits_help() -> str:
    return ("Bits per adapter weight: 1, 2, 4 or 8 quantise each matrix to a fixed normal "
            "codebook; 32 is a plain fp32 adapter.")


@dataclass
class BiAdaptFormerConfig(MethodConfig):
    bits: int = param(1, _bits_help(), choices=BITS)
    rank: int = param(32, "Hidden width of the adapter.", min=1, max=4096)
    scale: float = param(1.0, "Fixed multiplier s on the adapter branch (searched per task "
                         "in the paper).", choices=SCALES)
    dropout: float = param(0.1, "Dropout on the hidden layer, after the ReLU.", min=0.0, max=0.9)


@dataclass
class BiLoRAConfig(MethodConfig):
    bits: int = param(1, _bits_help(), choices=BITS)
    rank: int = param(32, "Rank of each query/value branch.", min=1, max=4096)
    scale: float = param(1.0, "Fixed multiplier s on both branches (searched per task in the "
                         "paper).", choices=SCALES)
    dropout: float = param(0.1, "Dropout between the two projections.", min=0.0, max=0.9)


class LowBitBranch(nn.Module):
    """``up(dropout(act(down(x))))`` with both projections quantised and bias-free."""

    def __init__(self, dim: int, rank: int, bits: int, *, relu: bool, dropout: float):
        super().__init__()
        self.down = QLinear(dim, rank, bits)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.up = QLinear(rank, dim, bits)
        if bits == 32:
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.trunc_normal_(self.up.weight, std=1e-3, a=-2e-3, b=2e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class BiAdapterBlock(BlockWrapper):
    """A timm block with a scaled low-bit adapter beside its MLP branch."""

    def __init__(self, block, c: BiAdaptFormerConfig):
        super().__init__(block)
        dim = block.norm2.normalized_shape[0]
        self.adapter = LowBitBranch(dim, c.rank, c.bits, relu=True, dropout=c.dropout)
        self.scale = c.scale

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return super().mlp_branch(x) + self.scale * self.adapter(x)


class BiLoRAQKV(PeftModule):
    """Wraps a fused qkv linear; adds ``s · branch(h)`` to its query and value slices."""

    def __init__(self, base: nn.Linear, c: BiLoRAConfig):
        super().__init__()
        if base.out_features != 3 * base.in_features:
            raise TypeError(f"expected a fused qkv linear (d → 3d), got {base}")
        self.base_layer = base
        dim = base.in_features
        self.scale = c.scale
        self.lora_q = LowBitBranch(dim, c.rank, c.bits, relu=False, dropout=c.dropout)
        self.lora_v = LowBitBranch(dim, c.rank, c.bits, relu=False, dropout=c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.base_layer(x).chunk(3, dim=-1)
        return torch.cat([q + self.scale * self.lora_q(x), k,
                          v + self.scale * self.lora_v(x)], dim=-1)


class LowBitMethod(PeftMethod):
    """What both low-bit methods share: packed storage of their quantised matrices."""

    view_page = VIEW_PAGE
    cached_seeds = (0,)
    identity_at_init = False  # the default (1 bit) quantises a non-zero up-projection
    default_lr = 1e-3

    def quantised_layers(self, model: nn.Module) -> list[tuple[str, QLinear]]:
        """Every quantised matrix, in module order (the packed file's order)."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]

    def stored_bytes(self, model: nn.Module) -> int:
        bits = self.config.bits
        return sum(quant.payload_bytes(m.weight.numel(), bits)
                   for _, m in self.quantised_layers(model))

    def pack_weights(self, model: nn.Module) -> tuple[bytes, set[str]]:
        layers = self.quantised_layers(model)
        return quant.pack_matrices(layers), {f"{n}.weight" for n, _ in layers}

    def load_packed_weights(self, model: nn.Module, data: bytes) -> None:
        layers = self.quantised_layers(model)
        bits, matrices = quant.unpack_matrices(data, [n for n, _ in layers])
        if bits != self.config.bits:
            raise ValueError(f"packed file holds {bits}-bit weights, the run's method "
                             f"{self.config.bits}-bit")
        for (name, layer), m in zip(layers, matrices):
            if (m.rows, m.cols) != tuple(layer.weight.shape):
                raise ValueError(f"{name}: packed shape {(m.rows, m.cols)}, model "
                                 f"{tuple(layer.weight.shape)}")
            if bits == 32:
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(m.data).view_as(layer.weight))
            else:
                layer.load_codes(torch.from_numpy(m.data), m.mu, m.sigma)

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        """For the weight-histogram view: each matrix's standardised latent weights
        ``(w − μ)/(σ + 1e-5)`` as a histogram on [−4, 4], and the codebook they snap to."""
        layers = [(n, m) for n, m in self.quantised_layers(model) if not m.frozen]
        if not layers:
            return {}
        edges = np.linspace(-4.0, 4.0, HIST_BINS + 1)
        counts = []
        for _, m in layers:
            w = m.weight.detach().float().cpu()
            z = ((w - w.mean()) / (w.std() + quant.EPS)).numpy().ravel()
            counts.append(np.histogram(np.clip(z, -4.0, 4.0), bins=edges)[0])
        bits = self.config.bits
        return {"bits": np.asarray(bits), "hist_edges": edges,
                "hist_counts": np.stack(counts).astype(np.int64),
                "matrix_names": np.asarray([n for n, _ in layers]),
                "codebook": (np.zeros(0) if bits == 32 else quant.codebook(bits).numpy())}


@register_method("bi-adaptformer")
class BiAdaptFormer(LowBitMethod):
    Config = BiAdaptFormerConfig
    title = "Bi-AdaptFormer"
    # Two more bit widths on one task, for the Flatness page's bits-vs-storage frontier.
    cached_variants = (("b2", {"bits": 2}, ("digits",)), ("b32", {"bits": 32}, ("digits",)))
    summary = ("AdaptFormer's bottleneck adapter with every weight quantised to 1–8 bits and "
               "stored packed: the adapter of a task fits in a few kilobytes.")
    paper = "https://arxiv.org/abs/2307.16867"
    vit_b_counts = (({}, 589_824),)  # 12 · 2 · 768 · 32

    def attach(self, model: nn.Module) -> None:
        model.blocks = nn.Sequential(*[BiAdapterBlock(b, self.config)
                                       for b in vit_blocks(model)])


@register_method("bi-lora")
class BiLoRA(LowBitMethod):
    Config = BiLoRAConfig
    title = "Bi-LoRA"
    summary = ("Low-rank query/value updates with every weight quantised to 1–8 bits and "
               "stored packed.")
    paper = "https://arxiv.org/abs/2307.16867"
    vit_b_counts = (({}, 1_179_648),)  # 12 · 2 · 2 · 768 · 32

    def attach(self, model: nn.Module) -> None:
        for block in vit_blocks(model):
            block.attn.qkv = BiLoRAQKV(block.attn.qkv, self.config)
