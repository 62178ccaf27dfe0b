"""Activation probes: how strongly each channel of the residual stream is used, per class.

:func:`class_channel_norms` reads the input of every block's ``norm2`` — the residual stream
right after the attention residual — with the prefix (CLS) tokens dropped, and for every
class c takes each channel's L2 norm over that class's images × tokens,
``n_c[j] = sqrt(Σ_{images of c, tokens} x_j²)``. The class-aware score (SCT's CAIS) is the
mean of ``n_c`` over the classes present; the plain score is the norm over all images. SCT
(:mod:`vpeft_viz.methods.sct`) selects its salient channels from it; views can call it on
any model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import vit_blocks

Progress = Callable[[int, int], None]


@dataclass
class ChannelNorms:
    """Per-block channel norms of the residual stream over labelled images (depth × width)."""

    class_aware: np.ndarray  # CAIS: mean over classes of each class's channel L2 norm
    plain: np.ndarray  # channel L2 norm over all images and tokens
    class_counts: np.ndarray  # images per class (index = label)

    @property
    def images(self) -> int:
        return int(self.class_counts.sum())


@torch.no_grad()
def class_channel_norms(model: nn.Module, loader: Iterable, *, device: torch.device | str = "cpu",
                     progress: Progress | None = None) -> ChannelNorms:
    """CAIS and plain channel norms at the input of every block's ``norm2``.

    Sums of squares are accumulated per class in float64, so the result does not depend on
    the order or batching of the images.
    """
    device = torch.device(device)
    blocks = vit_blocks(model)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    width = blocks[0].norm2.normalized_shape[0]
    sums = torch.zeros(len(blocks), 0, width, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.int64)
    current: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_m, args):
            current[i] = args[0][:, n_prefix:].detach().to(torch.float64).square().sum(1)
        return fn

    was_training = model.training
    model.eval()
    handles = [b.norm2.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    total = len(loader) if hasattr(loader, "__len__") else 0
    try:
        for step, (images, labels) in enumerate(loader, 1):
            labels = torch.as_tensor(labels).reshape(-1).long()
            model(images.to(device))
            need = int(labels.max()) + 1
            if need > counts.numel():
                sums = torch.cat([sums, sums.new_zeros(len(blocks), need - sums.shape[1],
                                                       width)], dim=1)
                counts = torch.cat([counts, counts.new_zeros(need - counts.numel())])
            counts += torch.bincount(labels, minlength=counts.numel())
            for i in range(len(blocks)):
                sums[i].index_add_(0, labels, current[i].cpu())
            if progress is not None:
                progress(step, total or step)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if counts.sum() == 0:
        raise ValueError("channel norms need at least one training image")
    present = counts > 0
    class_aware = sums[:, present].sqrt().mean(dim=1)
    plain = sums.sum(dim=1).sqrt()
    return ChannelNorms(class_aware.float().numpy(), plain.float().numpy(), counts.numpy())
