"""HST's modules: the meta-token block wrapper and the hierarchical side network.

Initialisation follows the release (AFeng-x/HST): linears trunc-normal std 0.02 with zero
biases, LayerNorms 1/0, convolutions N(0, 2/fan_out) with zero biases, meta tokens Xavier
uniform. LayerNorm epsilons as there: 1e-6 in the side blocks and after each stage, 1e-5
in the stem, the downsampling convolutions and the per-layer meta-token norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import nn
from torch.nn import functional as F

from .._base import PeftModule
from .._layers import BlockWrapper
from .layout import SideLayout


def init_side(module: nn.Module) -> None:
    """The release's initialisation of its side modules (see the module docstring)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SideBatchNorm2d(PeftModule, nn.BatchNorm2d):
    """The stem's BatchNorm, a PEFT module of its own so that a run stores its running
    statistics (``trainable_state`` keeps PEFT modules' own buffers)."""


class SideBatchNorm1d(PeftModule, nn.BatchNorm1d):
    """The BatchNorm before the head (no affine in the release). A training batch of one
    image (the last, short batch of a split) is normalised with the running statistics
    instead of failing; the release drops such batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


class MetaBlock(BlockWrapper):
    """A timm block with HST's meta token(s) prepended before the CLS token.

    The block's own LayerNorms (norm1, norm2) train with the method. After the block the
    meta token is read out (``meta_out``, batch × meta × width) with the patch tokens
    (``patch_out``: prefix tokens and meta excluded), and the rest goes on without it.
    """

    def __init__(self, block: nn.Module, num_meta: int, num_prefix: int):
        super().__init__(block)
        dim = block.norm1.normalized_shape[0]
        self.meta = nn.Parameter(torch.empty(1, num_meta, dim))
        nn.init.xavier_uniform_(self.meta)
        self.num_meta, self.num_prefix = num_meta, num_prefix
        self.meta_out: torch.Tensor | None = None
        self.patch_out: torch.Tensor | None = None

    def peft_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().peft_parameters()
        for norm in ("norm1", "norm2"):
            for pname, p in getattr(self.base_layer, norm).named_parameters():
                yield f"base_layer.{norm}.{pname}", p

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        n = self.num_meta
        x = torch.cat([self.meta.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        self.meta_out, self.patch_out = x[:, :n], x[:, n + self.num_prefix:]
        return x[:, n:]


class CrossAttention(nn.Module):
    """Side tokens (queries) attend to a few key/value tokens (meta + global); with
    ``record`` set, the attention probabilities of the last forward are kept in
    ``last_attn`` (batch × heads × queries × keys)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"side width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record = False
        self.last_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k = self.k(kv).reshape(b, -1, h, c // h).transpose(1, 2)
        v = self.v(kv).reshape(b, -1, h, c // h).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        if self.record:
            self.last_attn = attn.detach()
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class SideBlock(nn.Module):
    """``x ← x + attn(norm1(x), [meta; global]);  x ← x + vit;  x ← x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), kv))
        x = x + vit
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """conv3×3 (no bias) → BatchNorm → ReLU → conv k×k / k → LayerNorm, to stage 1's grid
    (release: stride 2 and k = 2, 224 px → 56×56)."""

    def __init__(self, in_chans: int, dim: int, stride: tuple[int, int],
                 kernel: tuple[int, int]):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, dim, 3, stride, padding=1, bias=False), SideBatchNorm2d(dim),
            nn.ReLU(inplace=True), nn.Conv2d(dim, dim, kernel, kernel))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.conv(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class Downsample(nn.Module):
    """conv3×3 / 2, padding 1 → LayerNorm: from one stage's map to the next stage's grid."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, 2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


def bridge_to_grid(bridge: nn.Linear, tokens: torch.Tensor, vit_grid: tuple[int, int],
                   grid: tuple[int, int]) -> torch.Tensor:
    """``bridge`` of the ViT's patch tokens (batch × P × D), bilinearly resized from the ViT
    grid to ``grid``: batch × (rows·cols) × width.

    The release resizes the D-wide features, then bridges; a linear map commutes with
    bilinear resizing (its weights sum to 1, so the bias passes unchanged), so bridging the
    P tokens first is the same function at a fraction of the cost (tested).
    """
    b = tokens.shape[0]
    x = bridge(tokens)
    if tuple(grid) == tuple(vit_grid):
        return x
    x = x.transpose(1, 2).reshape(b, -1, *vit_grid)
    x = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class SideStage(nn.Module):
    """One stage: its embedding (stem or downsampling), the bridge Linear(D → w) shared by
    its layers' meta tokens and patch features, one LayerNorm per layer for the bridged meta
    token, one side block per layer, and the stage's final LayerNorm.

    With ``record`` set, ``last_tokens`` keeps the stage's output before that final norm."""

    def __init__(self, embed: nn.Module, vit_dim: int, width: int, heads: int, layers: int,
                 drop_path: Sequence[float], vit_grid: tuple[int, int]):
        super().__init__()
        self.embed = embed
        self.bridge = nn.Linear(vit_dim, width)
        self.meta_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.blocks = nn.ModuleList(SideBlock(width, heads, drop_path=drop_path[j])
                                    for j in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.vit_grid = tuple(vit_grid)
        self.record = False
        self.last_tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, metas: Sequence[torch.Tensor],
                patches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.embed(x)
        for blk, norm, meta, feat in zip(self.blocks, self.meta_norms, metas, patches,
                                         strict=True):
            vit = bridge_to_grid(self.bridge, feat, self.vit_grid, grid)
            kv = torch.cat([norm(self.bridge(meta)), vit.mean(1, keepdim=True)], 1)
            x = blk(x, kv, vit)
        if self.record:
            self.last_tokens = x.detach()
        return self.norm(x), grid


class HSTSide(PeftModule):
    """The hierarchical side network: stages fed by consecutive ViT layers, then mean-pool and
    a BatchNorm without affine (:meth:`pool`); the classifier head reads what that gives."""

    def __init__(self, layout: SideLayout, *, vit_dim: int, in_chans: int,
                 drop_path: float = 0.0):
        super().__init__()
        self.layout = layout
        dpr = torch.linspace(0, drop_path, layout.depth).tolist()
        stages, prev, cur = [], None, 0
        for st in layout.stages:
            embed = (Stem(in_chans, st.width, layout.stem_stride, layout.stem_kernel)
                     if prev is None else Downsample(prev, st.width))
            stages.append(SideStage(embed, vit_dim, st.width, st.heads, len(st.layers),
                                    dpr[cur:cur + len(st.layers)], layout.vit_grid))
            prev, cur = st.width, cur + len(st.layers)
        self.stages = nn.ModuleList(stages)
        self.fc_norm = SideBatchNorm1d(layout.out_features, affine=False, eps=1e-6)
        init_side(self)

    def forward(self, image: torch.Tensor, metas: Sequence[torch.Tensor],
                patches: Sequence[torch.Tensor]) -> torch.Tensor:
        """The last stage's tokens (batch × rows·cols × width), after its norm."""
        x = image
        for i, (stage, st) in enumerate(zip(self.stages, self.layout.stages)):
            tokens, (h, w) = stage(x, [metas[j] for j in st.layers],
                                   [patches[j] for j in st.layers])
            if i < len(self.stages) - 1:
                x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return tokens

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(tokens.mean(1))
