"""Curvature of the loss in a chosen parameter space, from Hessian-vector products.

The loss is the mean cross-entropy over a fixed list of batches, the model in eval mode.
``H v`` is computed by double backpropagation (Pearlmutter's trick: the gradient of
``∇L · v``), batch by batch, never forming H. On it:

* :func:`lanczos_extremes` — the largest and smallest Hessian eigenvalues by the Lanczos
  iteration with full reorthogonalisation (converges in far fewer products than power
  iteration when the top eigenvalues are close; the tridiagonal's Ritz values are checked
  every step and the iteration stops when the top one settles);
* :func:`hutchinson_trace` — ``tr H ≈ mean_k v_kᵀ H v_k`` over Rademacher vectors ``v_k``,
  with its standard error.

PyHessian does the same on older torch; it is not maintained for current releases, so the
few lines here are kept and tested against a dense Hessian instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .attention import unfused_attention
from .landscape import Batches, _wide

Progress = Callable[[int, int], None]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _split(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()
    return out


class HessianOperator:
    """``v ↦ H v`` for the mean loss over ``batches`` w.r.t. ``params`` (flat float64
    vectors in and out)."""

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], batches: Batches):
        self.model, self.params, self.batches = model, list(params), batches
        self.n = sum(int(y.numel()) for _, y in batches)
        self.dim = sum(p.numel() for p in self.params)
        if self.n == 0 or self.dim == 0:
            raise ValueError("the Hessian needs images and at least one parameter")
        self.products = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        vs = _split(v, self.params)
        acc = torch.zeros(self.dim, dtype=torch.float64, device=v.device)
        mode = self.model.training
        req = [p.requires_grad for p in self.params]
        self.model.eval()
        try:
            for p in self.params:
                p.requires_grad_(True)
            # the fused attention kernel has no double backward on every device
            with unfused_attention(self.model), torch.enable_grad():
                for x, y in self.batches:
                    loss = F.cross_entropy(_wide(self.model(x)), y, reduction="sum") / self.n
                    grads = torch.autograd.grad(loss, self.params, create_graph=True)
                    dot = sum((g * u).sum() for g, u in zip(grads, vs))
                    hv = torch.autograd.grad(dot, self.params)
                    acc += _flat([h.detach().double() for h in hv])
        finally:
            for p, r in zip(self.params, req):
                p.requires_grad_(r)
            self.model.train(mode)
        self.products += 1
        return acc


@dataclass
class Extremes:
    top: float  # largest eigenvalue
    bottom: float  # smallest eigenvalue (negative: the point is not a minimum in some direction)
    steps: int  # Hessian-vector products used
    converged: bool


def lanczos_extremes(op: HessianOperator, *, max_steps: int = 30, tol: float = 1e-4,
                     seed: int = 0, progress: Progress | None = None) -> Extremes:
    """Largest and smallest eigenvalues of ``op`` by Lanczos (full reorthogonalisation).

    Stops when the top Ritz value changes by less than ``tol`` (relative) between steps, or
    after ``max_steps`` products, or when the Krylov space is exhausted (exact then).
    """
    device = op.params[0].device
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(op.dim, generator=g, dtype=torch.float64).to(device)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    top = bottom = float("nan")
    steps = min(max_steps, op.dim)
    for k in range(steps):
        w = op(basis[-1])
        a = float(w @ basis[-1])
        alphas.append(a)
        w = w - a * basis[-1] - (betas[-1] * basis[-2] if betas else 0.0)
        for b in basis:  # full reorthogonalisation, twice is enough
            w -= (w @ b) * b
        for b in basis:
            w -= (w @ b) * b
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        ritz = np.linalg.eigvalsh(t)
        prev = top
        top, bottom = float(ritz[-1]), float(ritz[0])
        if progress:
            progress(k + 1, steps)
        beta = float(w.norm())
        exhausted = beta <= 1e-10 * max(1.0, abs(top))
        settled = k > 0 and abs(top - prev) <= tol * max(abs(top), 1e-12)
        if exhausted or settled:
            return Extremes(top, bottom, op.products, True)
        betas.append(beta)
        basis.append(w / beta)
    return Extremes(top, bottom, op.products, steps == op.dim)


def power_iteration(op: HessianOperator, *, iters: int = 100, tol: float = 1e-6,
                    seed: int = 0) -> float:
    """The eigenvalue of largest magnitude (a cross-check for :func:`lanczos_extremes`)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(op.dim, generator=g, dtype=torch.float64).to(op.params[0].device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = op(v)
        new = float(v @ hv)
        v = hv / hv.norm()
        if abs(new - lam) <= tol * max(abs(new), 1e-12):
            return new
        lam = new
    return lam


@dataclass
class TraceEstimate:
    trace: float
    stderr: float
    samples: list[float]


def hutchinson_trace(op: HessianOperator, *, samples: int = 10, seed: int = 0,
                     progress: Progress | None = None) -> TraceEstimate:
    """``mean vᵀHv`` over Rademacher ``v`` (unbiased for tr H), with its standard error."""
    g = torch.Generator().manual_seed(seed)
    device = op.params[0].device
    vals = []
    for k in range(samples):
        v = (torch.randint(0, 2, (op.dim,), generator=g) * 2 - 1).double().to(device)
        vals.append(float(v @ op(v)))
        if progress:
            progress(k + 1, samples)
    arr = np.asarray(vals)
    err = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return TraceEstimate(float(arr.mean()), err, vals)
