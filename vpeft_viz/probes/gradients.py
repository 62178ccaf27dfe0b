"""Gradient probes: how strongly a task's loss pulls on each weight.

:func:`squared_gradients` sums, over mini-batches, the square of each named parameter's
mini-batch gradient — the diagonal of the empirical Fisher, and by a first-order Taylor
expansion the loss drop one gradient step on a weight alone would bring. SPT's sensitivity
(:mod:`vpeft_viz.methods.spt.scoring`) is this probe on a freshly headed copy of the
backbone; views can call it on any model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Progress = Callable[[int, int], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) → mean loss


@dataclass
class GradientStats:
    """What the probe saw: batches and images differentiated, and their mean loss."""

    batches: int
    images: int
    mean_loss: float


def squared_gradients(model: nn.Module, batches: Iterable, params: Sequence[str], *,
                      max_batches: int | None = None, device: torch.device | str = "cpu",
                      loss_fn: LossFn = F.cross_entropy,
                      progress: Progress | None = None, total: int | None = None,
                      what: str = "gradient probe",
                      ) -> tuple[dict[str, torch.Tensor], GradientStats]:
    """``Σ_batches g²`` of each parameter named in ``params`` (float32, on the model's device).

    The model is used as it is — its mode (train/eval), its head and the random state that
    drives its dropout are the caller's choice; only ``requires_grad`` flags change: the named
    parameters get a gradient, nothing else does. ``batches`` yields ``(images, labels)``;
    each batch's mean loss is differentiated on its own. A non-finite loss raises, naming the
    batch (``what`` names the measurement in the message).
    """
    device = torch.device(device)
    model.requires_grad_(False)
    tensors = {k: model.get_parameter(k) for k in params}
    for p in tensors.values():
        p.requires_grad_(True)
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in tensors.items()}
    loss_sum, seen, images = 0.0, 0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), torch.as_tensor(y).to(device)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise ValueError(f"{what}: the loss of batch {i} is {loss.item()}; check the "
                             "backbone weights and the input normalisation")
        grads = torch.autograd.grad(loss, list(tensors.values()))
        for k, g in zip(tensors, grads):
            acc[k].add_(g.detach().float().square())
        loss_sum += loss.item()
        seen += 1
        images += int(y.numel())
        if progress is not None:
            progress(seen, total or seen)
    if seen == 0:
        raise ValueError(f"{what} needs at least one training batch")
    return acc, GradientStats(batches=seen, images=images, mean_loss=loss_sum / seen)
