"""Token representations of every layer of a timm ViT, and the network above a layer.

What the Inside page (docs/inside.md) measures on a tuned model and on its frozen backbone:

* :func:`layer_tokens`: the tokens of every *layer* for a batch of images, where the layers
  are the embedding (the tokens entering the first block: patch embedding plus position),
  each block's output, and the final norm (what the head reads). Only the image's own tokens
  are kept: the prefix tokens (CLS, registers) and the patch tokens. Prompt tokens that a
  method puts between them (VPT, E²VPT) are dropped, so a tuned model and its frozen
  backbone are compared token by token, on the same positions.
* :func:`summary_token`: one vector per image and layer (the CLS token; the mean patch
  token for a ViT without one), for linear probes and 2-D embeddings.
* :func:`block_input` and :func:`forward_above`: the whole sequence entering a block
  (prompts included) and the network above it, so a layer attribution integrates the
  gradient of exactly the function the layer feeds.

The tokens are read with forward hooks on the model's own modules (``blocks[i]`` is whatever
a method made of the block, so its prompts and adapters are in); :func:`model_lock` keeps two
threads (two dashboard sessions sharing one cached model) from hooking the same model at once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Exclusive use of ``model`` for the duration (hooks and attention switches are set on
    the model itself, so concurrent measurements on a shared model would see each other's)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield


def layer_names(model: nn.Module) -> list[str]:
    """``["embedding", "block 1", ..., "block L", "final norm"]``."""
    return ["embedding", *[f"block {i + 1}" for i in range(len(model.blocks))], "final norm"]


def num_patches(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches)


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """Rows and columns of the patch tokens (``patch_embed.grid_size``)."""
    h, w = model.patch_embed.grid_size
    return int(h), int(w)


def image_tokens(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The prefix and patch tokens of a sequence (B, T, D): any tokens between them (prompts
    inserted after the prefix) are dropped."""
    n, p = model.num_prefix_tokens, num_patches(model)
    if x.shape[1] == n + p:
        return x
    if x.shape[1] < n + p:
        raise ValueError(f"a sequence of {x.shape[1]} tokens is shorter than the "
                         f"{n} prefix + {p} patch tokens of the model")
    return torch.cat([x[:, :n], x[:, x.shape[1] - p:]], dim=1)


def summary_token(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(B, D): the CLS token of image tokens (B, prefix + patches, D); the mean patch token
    when the model has no class token."""
    if getattr(model, "cls_token", None) is not None:
        return tokens[:, 0]
    return tokens[:, model.num_prefix_tokens:].mean(1)


@torch.no_grad()
def layer_tokens(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Image tokens (B, prefix + patches, D) of every layer of :func:`layer_names`, in order,
    from one forward pass of ``model.forward_features``."""
    out: list[torch.Tensor] = []
    blocks = list(model.blocks)
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: out.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _i, o: out.append(o)) for b in blocks]
    hooks.append(model.norm.register_forward_hook(lambda _m, _i, o: out.append(o)))
    with model_lock(model):
        try:
            model.forward_features(images)
        finally:
            for h in hooks:
                h.remove()
    if len(out) != len(blocks) + 2:
        raise RuntimeError(f"expected {len(blocks) + 2} layers from one forward pass, got "
                           f"{len(out)} (is the model's norm or a block called twice?)")
    return [image_tokens(t.detach(), model) for t in out]


@torch.no_grad()
def block_input(model: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """The whole sequence entering ``model.blocks[block]`` (1 ≤ block < depth): the output of
    the block below, prompts included."""
    depth = len(model.blocks)
    if not 1 <= block < depth:
        raise ValueError(f"block must be in [1, {depth - 1}] (the input of a block above the "
                         f"first); got {block}")
    ((rest, prefix),) = model.forward_intermediates(
        images, indices=[block - 1], return_prefix_tokens=True, stop_early=True,
        output_fmt="NLC", intermediates_only=True)
    return torch.cat([prefix, rest], dim=1) if prefix is not None else rest


def forward_above(model: nn.Module, block: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the network above ``block`` given the sequence entering it: the remaining
    blocks, the final norm and the head (timm's ``forward_head``)."""
    x = tokens
    for b in list(model.blocks)[block:]:
        x = b(x)
    return model.forward_head(model.norm(x))
