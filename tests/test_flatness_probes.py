"""Flatness probes: landscapes (centre = the trained loss exactly, weights restored) and
Hessian curvature (Lanczos, power iteration and Hutchinson against a dense Hessian)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from vpeft_viz.probes import hessian as hs
from vpeft_viz.probes import landscape as ls


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (12,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def test_symmetric_grid_has_an_exact_zero():
    g = ls.symmetric_grid(21, 1.0)
    assert g[10] == 0.0 and g[0] == -1.0 and g[-1] == 1.0 and len(g) == 21
    with pytest.raises(ValueError, match="odd"):
        ls.symmetric_grid(20, 1.0)


def test_filter_normalised_direction(tiny_vit):
    params = [tiny_vit.blocks[0].mlp.fc1.weight, tiny_vit.blocks[0].norm1.weight]
    d = ls.filter_normalised_direction(params, torch.Generator().manual_seed(0))
    w, v = params[0].detach(), d[0]
    assert torch.allclose(v.norm(dim=1), w.norm(dim=1), rtol=1e-5)
    assert torch.allclose(d[1].norm(), params[1].detach().norm(), rtol=1e-5)


def test_landscape_centre_is_the_trained_loss_and_weights_come_back(tiny_vit, batches):
    params = [p for n, p in tiny_vit.named_parameters() if n.startswith("blocks.1.")]
    before = [p.detach().clone() for p in params]
    trained = ls.loss_and_accuracy(tiny_vit.eval(), batches)
    g = torch.Generator().manual_seed(1)
    d1 = ls.filter_normalised_direction(params, g)
    d2 = ls.filter_normalised_direction(params, g)
    alphas = ls.symmetric_grid(5, 1.0)
    loss1, acc1 = ls.landscape_1d(tiny_vit, params, batches, d1, alphas)
    loss2, acc2 = ls.landscape_2d(tiny_vit, params, batches, d1, d2, alphas,
                                  ls.symmetric_grid(3, 0.5))
    assert loss1[2] == trained[0] and acc1[2] == trained[1]
    assert loss2[1, 2] == trained[0] and acc2[1, 2] == trained[1]
    assert loss2.shape == (3, 5)
    assert np.allclose(loss2[1], loss1)  # the β = 0 row is the 1-D cut along d1
    assert len(set(np.round(loss1, 6))) > 1, "moving the weights changed nothing"
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_weight_noise_grows_loss_and_restores(tiny_vit, batches):
    params = [p for n, p in tiny_vit.named_parameters() if n.startswith("blocks.")]
    before = [p.detach().clone() for p in params]
    trained = ls.loss_and_accuracy(tiny_vit.eval(), batches)
    out = ls.weight_noise(tiny_vit, params, batches, [0.0, 0.5, 2.0], draws=3)
    assert out["loss_mean"][0] == trained[0] and out["loss_std"][0] == 0.0
    assert out["loss_std"][2] > 0
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def _dense_hessian(model, names, batches):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    n = sum(int(y.numel()) for _, y in batches)

    def loss(flat):
        chunks = torch.split(flat, sizes)
        over = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        total = 0.0
        for x, y in batches:
            total = total + F.cross_entropy(functional_call(model, over, (x,)), y,
                                            reduction="sum")
        return total / n

    flat = torch.cat([params[k].detach().reshape(-1) for k in names])
    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture
def curvature_case(tiny_vit, batches):
    """A float64 tiny ViT; the space: one block's MLP output bias, the final norm's scale
    and the head's bias (101 weights), small enough for a dense Hessian."""
    model = tiny_vit.double().eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    b64 = [(x.double(), y) for x, y in batches]
    names = ["blocks.1.mlp.fc2.bias", "norm.weight", "head.bias"]
    with torch.no_grad():  # a curved, non-trivial point
        model.head.weight.mul_(20)
        model.blocks[1].mlp.fc2.bias.normal_(0, 0.5)
    params = [dict(model.named_parameters())[n] for n in names]
    dense = _dense_hessian(model, names, b64)
    return model, params, b64, dense


def test_hessian_vector_products_match_dense(curvature_case):
    model, params, batches, dense = curvature_case
    op = hs.HessianOperator(model, params, batches)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op(v), dense @ v, rtol=1e-8, atol=1e-10)


def test_top_eigenvalue_and_trace_against_dense(curvature_case):
    model, params, batches, dense = curvature_case
    eig = torch.linalg.eigvalsh(dense)
    op = hs.HessianOperator(model, params, batches)
    ext = hs.lanczos_extremes(op, max_steps=80, tol=1e-10)
    assert ext.top == pytest.approx(float(eig[-1]), rel=1e-3)
    assert ext.bottom >= float(eig[0]) - 1e-9  # a Ritz value: never below the spectrum
    assert ext.steps < op.dim, "Lanczos should not need the whole space"
    top_mag = float(eig.abs().max())
    assert abs(hs.power_iteration(op, iters=300, tol=1e-8)) == pytest.approx(top_mag, rel=1e-3)

    est = hs.hutchinson_trace(op, samples=100, seed=0)
    exact = float(dense.trace())
    assert abs(est.trace - exact) < 4 * est.stderr + 1e-9
    # each sample is exactly vᵀHv of the dense Hessian for the same Rademacher vector
    g = torch.Generator().manual_seed(0)
    v = (torch.randint(0, 2, (op.dim,), generator=g) * 2 - 1).double()
    assert est.samples[0] == pytest.approx(float(v @ dense @ v), rel=1e-9)
