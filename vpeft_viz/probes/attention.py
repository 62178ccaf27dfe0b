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
