"""Loss landscapes and weight-noise robustness in a chosen parameter space.

A *space* is a list of the model's parameters (a method's own weights, or every weight for
full fine-tuning). Every measurement here moves those parameters, evaluates the model on a
fixed list of batches in eval mode, and puts the parameters back exactly as they were.

* Directions are *filter-normalised* (Li et al., 2018, https://arxiv.org/abs/1712.09913):
  a Gaussian direction is rescaled, filter by filter (each row of a matrix; a whole vector
  for 1-D parameters), to the norm of the matching filter of the trained weights, so a step
  of 1 means "as large as the weights themselves" in every layer and landscapes of models
  with differently scaled weights can be compared.
* Grids are symmetric with an exact 0 in the middle, so the centre point is the trained
  model itself (same weights, same batches, same loss, bit for bit).
* Noise robustness: each tensor gets Gaussian noise with standard deviation
  ``σ_rel · rms(tensor)``, averaged over several draws.
* ``amp``: evaluate under ``torch.autocast`` with that dtype (bf16: about 3× faster on CPUs
  with AMX/AVX-512 BF16, see docs/lowbit-flatness.md). Every point of a landscape, its centre
  included, is then evaluated the same way, so the centre is still exactly the trained
  model's loss *in that precision*.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]
Direction = list[torch.Tensor]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (half-precision models), float64 kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@contextlib.contextmanager
def evaluating(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Eval mode and a copy of ``params``' values; both restored on exit. Yields the copy."""
    mode = model.training
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train(mode)


def _amp(device: torch.device, amp: torch.dtype | None):
    return (torch.autocast(device.type, dtype=amp) if amp is not None
            else contextlib.nullcontext())


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, batches: Batches, *,
                      amp: torch.dtype | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all images of ``batches`` (model as it is)."""
    total, correct, n = 0.0, 0, 0
    for x, y in batches:
        with _amp(x.device, amp):
            logits = model(x)
        total += float(F.cross_entropy(_wide(logits), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.numel())
    if n == 0:
        raise ValueError("no images to evaluate the landscape on")
    return total / n, correct / n


def symmetric_grid(points: int, radius: float) -> np.ndarray:
    """``points`` (odd) values from −radius to radius with an exact 0 in the middle."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"a landscape grid needs an odd number of points ≥ 3, got {points}")
    half = points // 2
    return np.arange(-half, half + 1, dtype=np.float64) * (radius / half)


def filter_normalised_direction(params: Sequence[torch.Tensor],
                                generator: torch.Generator) -> Direction:
    """A Gaussian direction rescaled filter by filter to the weights' filter norms."""
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        if p.dim() <= 1:
            d.mul_(p.detach().norm() / (d.norm() + 1e-12))
        else:
            rows_p = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            rows_d = d.reshape(p.shape[0], -1).norm(dim=1)
            d.mul_((rows_p / (rows_d + 1e-12)).view(-1, *([1] * (p.dim() - 1))))
        out.append(d)
    return out


def _place(params: Sequence[torch.Tensor], origin: Sequence[torch.Tensor],
           steps: Sequence[tuple[float, Direction]]) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            v = origin[i].clone()
            for a, d in steps:
                if a != 0.0:
                    v.add_(d[i], alpha=a)
            p.copy_(v)


def landscape_1d(model: nn.Module, params: Sequence[torch.Tensor], batches: Batches,
                 direction: Direction, alphas: np.ndarray, *,
                 progress: Progress | None = None,
                 amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``θ + α d`` for each α."""
    loss, acc = np.zeros(len(alphas)), np.zeros(len(alphas))
    with evaluating(model, params) as origin:
        for i, a in enumerate(alphas):
            _place(params, origin, [(float(a), direction)])
            loss[i], acc[i] = loss_and_accuracy(model, batches, amp=amp)
            if progress:
                progress(i + 1, len(alphas))
    return loss, acc


def landscape_2d(model: nn.Module, params: Sequence[torch.Tensor], batches: Batches,
                 d1: Direction, d2: Direction, alphas: np.ndarray, betas: np.ndarray, *,
                 progress: Progress | None = None,
                 amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``θ + α d1 + β d2``: arrays of shape (len(betas), len(alphas))."""
    shape = (len(betas), len(alphas))
    loss, acc = np.zeros(shape), np.zeros(shape)
    total = shape[0] * shape[1]
    with evaluating(model, params) as origin:
        for j, b in enumerate(betas):
            for i, a in enumerate(alphas):
                _place(params, origin, [(float(a), d1), (float(b), d2)])
                loss[j, i], acc[j, i] = loss_and_accuracy(model, batches, amp=amp)
                if progress:
                    progress(j * shape[1] + i + 1, total)
    return loss, acc


def weight_noise(model: nn.Module, params: Sequence[torch.Tensor], batches: Batches,
                 sigmas: Sequence[float], *, draws: int = 5, seed: int = 0,
                 progress: Progress | None = None,
                 amp: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Loss and accuracy under ``θ + σ·rms(θ)·ε`` per tensor: mean and std over ``draws``."""
    g = torch.Generator().manual_seed(seed)
    losses = np.zeros((len(sigmas), draws))
    accs = np.zeros((len(sigmas), draws))
    total = len(sigmas) * draws
    with evaluating(model, params) as origin:
        rms = [o.float().pow(2).mean().sqrt() for o in origin]
        for i, s in enumerate(sigmas):
            for k in range(draws):
                with torch.no_grad():
                    for p, o, r in zip(params, origin, rms):
                        eps = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                        p.copy_(o + eps * (float(s) * r).to(p.dtype))
                losses[i, k], accs[i, k] = loss_and_accuracy(model, batches, amp=amp)
                if progress:
                    progress(i * draws + k + 1, total)
    return {"loss_mean": losses.mean(1), "loss_std": losses.std(1),
            "acc_mean": accs.mean(1), "acc_std": accs.std(1)}
