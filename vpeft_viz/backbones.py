"""Backbones: any timm ViT by name, a local checkpoint, or the embedded default.

* ``create_backbone("vit_base_patch16_224", pretrained=True)`` downloads through timm's hub
  when the network allows (and fails with a clear message when it does not);
* ``create_backbone(name, checkpoint="weights.safetensors")`` loads a local file offline
  (safetensors, or a torch file read with ``weights_only=True``);
* ``create_backbone()`` is the embedded default: a small ViT registered with timm whose
  weights ship with the project (see ``vpeft_viz/weights/MODEL_CARD.md``).

Attention weights are read by :mod:`vpeft_viz.probes.attention` (the one place that switches
timm's fused attention off).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .weights import (  # noqa: F401  (WEIGHTS_DIR re-exported for the Train page)
    EMBEDDED_BACKBONE,
    EMBEDDED_WEIGHTS,
    WEIGHTS_DIR,
)

# Architecture of the embedded default, sized for live CPU runs (64 patch tokens + CLS).
EMBEDDED_ARCH = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                     mlp_ratio=4.0, global_pool="token")
# Pixel statistics the embedded backbone was pretrained with (plain [0, 1] pixels, centred).
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.25, 0.25, 0.25)


# timm modules whose models are ``VisionTransformer``s (plain, hybrid-embedding, DeiT).
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")
HUB_HOST = ("huggingface.co", 443)


class BackboneError(RuntimeError):
    """A backbone cannot be created or its weights cannot be loaded."""


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), for name suggestions."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@functools.cache
def vit_names() -> tuple[str, ...]:
    """Every timm model name this lab can fine-tune: timm's ViTs and the embedded default."""
    names = {n for n in timm.list_models() if timm.models.is_model_in_modules(n, VIT_MODULES)}
    return tuple(sorted(names | {EMBEDDED_BACKBONE}))


def close_names(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` names nearest to a typo by edit distance (``vit_base_patch16_244`` →
    ``vit_base_patch16_224``), only those a few edits away."""
    limit = max(2, len(name) // 4)
    scored = sorted((edit_distance(name, c), c) for c in names if abs(len(c) - len(name)) <= limit)
    return [c for d, c in scored[:n] if d <= limit]


def check_backbone_name(name: str) -> None:
    """Refuse, before any run exists, a name timm does not know or a model that is no ViT."""
    if name in vit_names():
        return
    if timm.models.is_model(name):
        raise BackboneError(f"{name!r} is a timm model but not a VisionTransformer: only timm "
                            "ViTs are supported (vit_*, deit_*), e.g. vit_small_patch16_224")
    close = close_names(name, vit_names())
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise BackboneError(f"unknown timm model {name!r}{hint}")


def check_checkpoint(path: str | Path) -> None:
    """Refuse an unreadable weights file before any run exists (the whole file is read)."""
    read_state_dict(path)


def weights_fingerprint(path: str | Path) -> str:
    """``sha256:<first 16 hex>`` of a weights file's bytes (cached per path, size and mtime)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    st = path.stat()
    return _fingerprint(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def backbone_weights_id(name: str, *, pretrained: bool,
                        checkpoint: str | Path | None) -> str | None:
    """Which weights a backbone starts from: the fingerprint of a local checkpoint or of the
    embedded weights file; None for random init and for hub weights (named by timm's tag)."""
    if checkpoint is not None:
        return weights_fingerprint(checkpoint)
    if pretrained and name == EMBEDDED_BACKBONE and EMBEDDED_WEIGHTS.is_file():
        return weights_fingerprint(EMBEDDED_WEIGHTS)
    return None


def hub_weights_cached(name: str) -> bool:
    """Whether the hub weights of ``name`` are already on this machine (no download needed)."""
    if name == EMBEDDED_BACKBONE:
        return EMBEDDED_WEIGHTS.is_file()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # no pretrained config: nothing to fetch, nothing cached
        return False
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()
    return False


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """Whether the weights hub can be reached now (False when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


@register_model
def vit_tiny_patch4_32_vpeft(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default ViT (128 wide, 6 deep, 4 heads, 4 px patches on 32 px images)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    model = VisionTransformer(**{**EMBEDDED_ARCH, **kwargs})
    model.pretrained_cfg = {"mean": EMBEDDED_MEAN, "std": EMBEDDED_STD,
                            "input_size": (3, 32, 32), "architecture": EMBEDDED_BACKBONE}
    if pretrained:
        load_weights(model, EMBEDDED_WEIGHTS)
    return model


def create_backbone(name: str | None = None, *, num_classes: int = 0, pretrained: bool = True,
                    checkpoint: str | Path | None = None) -> VisionTransformer:
    """Build a timm ViT with a fresh ``num_classes`` head (0: no head).

    ``pretrained`` loads the hub weights (or the shipped weights for the embedded default);
    ``checkpoint`` loads a local file instead and never touches the network.
    """
    name = name or EMBEDDED_BACKBONE
    check_backbone_name(name)
    use_hub = pretrained and checkpoint is None
    if name == EMBEDDED_BACKBONE and use_hub and not EMBEDDED_WEIGHTS.exists():
        raise BackboneError(f"embedded weights missing at {EMBEDDED_WEIGHTS}; regenerate them "
                            "with `python -m vpeft_viz pretrain`")
    try:
        model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes)
    except BackboneError:
        raise
    except Exception as e:  # hub/network failures surface as many exception types
        if use_hub:
            raise BackboneError(
                f"could not download pretrained weights for {name!r} ({type(e).__name__}: {e}); "
                "offline, pass a local checkpoint file instead") from e
        raise
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"{name!r} is a {type(model).__name__}; only timm ViTs are supported")
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "module"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load backbone weights from a file; the classifier head is never taken from it."""
    state = read_state_dict(path)
    head_keys = {f"head.{k}" for k in model.head.state_dict()} | {"head.weight", "head.bias"}
    state = {k: v for k, v in state.items() if k not in head_keys}
    model_keys = set(model.state_dict()) - head_keys
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit {type(model).__name__}: "
            f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
    dtype = next(model.parameters()).dtype
    for k, v in state.items():
        if v.shape != model.state_dict()[k].shape:
            raise BackboneError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, "
                                f"model expects {tuple(model.state_dict()[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)


def input_stats(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone was pretrained with (ImageNet's for hub ViTs)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return tuple(mean), tuple(std)


def image_size(model: VisionTransformer) -> int:
    return int(model.patch_embed.img_size[0])


def vit_blocks(model: torch.nn.Module) -> list[Block]:
    """The transformer blocks of a timm ViT, with a clear error for other architectures.

    A block a method wrapped (anything holding the original in ``base_layer``) is unwrapped,
    so methods and probes see the same timm blocks.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks: only timm ViTs are supported")
    out = []
    for i, b in enumerate(blocks):
        base = getattr(b, "base_layer", b)
        if not isinstance(base, Block):
            raise TypeError(
                f"block {i} is a {type(base).__name__}; methods support timm's "
                "vision_transformer.Block (pre-norm attention + MLP)"
            )
        out.append(base)
    return out
