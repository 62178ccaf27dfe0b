"""Attention probes: the attention probabilities of every block, for maps and rollout.

timm computes attention with a fused kernel that never materialises the attention matrix.
:func:`unfused_attention` is the one place in the project that switches it off (per module,
for the duration, restored afterwards), so analyses read attention without touching timm's
global setting or monkeypatching ``forward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from timm.models.vision_transformer import Attention


@contextlib.contextmanager
def unfused_attention(model: torch.nn.Module) -> Iterator[list[Attention]]:
    """Compute attention explicitly (softmax materialised) so it can be hooked.

    timm's ``Attention`` reads ``fused_attn`` at every forward; it is switched off on each
    attention module for the duration and restored afterwards. Yields the modules.
    """
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield mods
    finally:
        for m, s in zip(mods, saved):
            m.fused_attn = s


@torch.no_grad()
def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block: a list of (batch, heads, tokens, tokens)."""
    maps: list[torch.Tensor] = []
    with unfused_attention(model) as mods:
        hooks = [m.attn_drop.register_forward_hook(lambda _m, inp, _o: maps.append(inp[0].detach()))
                 for m in mods]
        try:
            model(images)
        finally:
            for h in hooks:
                h.remove()
    return maps


def attention_rollout(maps: list[torch.Tensor], *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020, https://arxiv.org/abs/2005.00928): how much
    each token at the output draws from each token entering the first block, (B, T, T).

    Per block, the heads' mean attention is mixed with the identity for the residual path,
    ``residual · I + (1 − residual) · A``, its rows renormalised, and the blocks multiplied
    (last block on the left). Keys that are not tokens of the sequence — key-value prompts
    joined in front of the keys (E²VPT) — carry nothing of the image on to the next block:
    their columns are dropped before renormalising.
    """
    if not maps:
        raise ValueError("attention rollout needs the maps of at least one block")
    out: torch.Tensor | None = None
    for m in maps:
        a = m.float().mean(1)  # (B, queries, keys)
        q = a.shape[-2]
        a = a[..., a.shape[-1] - q:]  # the sequence's own tokens as keys
        a = residual * torch.eye(q, dtype=a.dtype, device=a.device) + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


@torch.no_grad()
def cls_rollout(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout of the CLS token (of the mean patch token, for a ViT without one) onto the
    patch tokens entering the first block, (B, patches), and the share it puts on the other
    tokens there (prefix tokens and prompts), (B,)."""
    patches_n = int(model.patch_embed.num_patches)
    roll = attention_rollout(attention_maps(model, images))
    row = roll[:, 0] if getattr(model, "cls_token", None) is not None else \
        roll[:, roll.shape[1] - patches_n:].mean(1)
    patches = row[:, row.shape[-1] - patches_n:]
    return patches, 1.0 - patches.sum(-1)
