"""Training engine: schedule, evaluation, selection on validation, cancel, frozen weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.train import Callback, TrainConfig, evaluate, fit, flops_per_image, lr_factor


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def _separable(n=64, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.rand(n, 3, 32, 32, generator=g) * 0.2
    for c in range(classes):  # class c brightens one horizontal band
        images[labels == c, :, c * 6:(c + 1) * 6, :] += 0.8
    return TensorDataset(images, labels)


def test_evaluate_confusion_matches_predictions(tiny_vit, tiny_loader):
    res = evaluate(tiny_vit, tiny_loader, 5, device=torch.device("cpu"))
    images, labels = tiny_loader.dataset.tensors
    with torch.no_grad():
        pred = tiny_vit(images).argmax(1)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert np.array_equal(res.confusion, expected)
    assert res.acc == pytest.approx((pred == labels).float().mean().item())
    assert len(res.per_class_acc) == 5


def test_fit_learns_and_keeps_backbone_frozen(tiny_vit):
    ds = _separable()
    train = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(ds, batch_size=64)
    method = create_method("lora", {"rank": 4})
    frozen_before = {n: p.detach().clone() for n, p in tiny_vit.named_parameters()}
    attach_method(tiny_vit, method)
    cfg = TrainConfig(epochs=8, lr=3e-3, warmup_epochs=1, device="cpu")
    res = fit(tiny_vit, method, train, val, 5, cfg)
    assert len(res.history) == 8 and res.images_seen == 8 * 64
    assert res.best_val_acc >= 0.6, res.history  # chance is 0.2
    assert res.best_val_acc == max(r["val_acc"] for r in res.history)
    trainable = {n for n, p in tiny_vit.named_parameters() if p.requires_grad}
    for n, p in tiny_vit.named_parameters():
        key = n.replace(".base_layer", "")
        if n not in trainable and key in frozen_before:
            assert torch.equal(p, frozen_before[key]), f"frozen weight {n} changed"


def test_best_weights_restored(tiny_vit):
    ds = _separable()
    loader = DataLoader(ds, batch_size=16)
    method = create_method("linear")
    attach_method(tiny_vit, method)
    snapshots = []

    class Snap(Callback):
        def on_epoch(self, row):
            snapshots.append((row["val_acc"], copy.deepcopy(tiny_vit.head.state_dict())))

    res = fit(tiny_vit, method, loader, loader, 5, TrainConfig(epochs=4, lr=1e-1, device="cpu"),
              callbacks=[Snap()])
    best = snapshots[res.best_epoch - 1][1]
    assert torch.equal(tiny_vit.head.weight, best["weight"])


def test_cancel_stops_early(tiny_vit, tiny_loader):
    method = create_method("lora")
    attach_method(tiny_vit, method)

    class StopAfterOne(Callback):
        steps = 0

        def on_step(self, step, total, loss):
            self.steps = step

        def should_stop(self):
            return self.steps >= 1

    res = fit(tiny_vit, method, tiny_loader, tiny_loader, 5,
              TrainConfig(epochs=3, device="cpu"), callbacks=[StopAfterOne()])
    assert res.cancelled and res.history == [] and res.images_seen == 8


def test_nothing_trainable_is_an_error(tiny_vit, tiny_loader):
    tiny_vit.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(tiny_vit, create_method("linear"), tiny_loader, tiny_loader, 5,
            TrainConfig(epochs=1, device="cpu"))


def test_flops_counted_and_mode_restored(tiny_vit):
    tiny_vit.train()
    flops = flops_per_image(tiny_vit, torch.rand(2, 3, 32, 32))
    # 17 tokens, 2 blocks, width 48: qkv+proj+fc1+fc2 matmuls dominate, ~2·17·(4·48²+8·48²)·2
    assert 2 * 17 * 12 * 48 * 48 * 2 * 0.8 < flops < 2 * 17 * 12 * 48 * 48 * 2 * 1.6
    assert tiny_vit.training


def test_linear_probe_on_cached_features_matches_full_forward(tiny_vit, tiny_loader, monkeypatch):
    """The frozen-feature shortcut trains the same head as running the backbone each step."""
    import vpeft_viz.train as engine

    one_batch = DataLoader(tiny_loader.dataset, batch_size=16)  # order-free: a single batch
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu")
    heads = []
    for shortcut in (True, False):
        model = copy.deepcopy(tiny_vit)
        method = create_method("linear")
        attach_method(model, method)
        assert engine._frozen_features(model)
        if not shortcut:
            monkeypatch.setattr(engine, "_frozen_features", lambda m: False)
        res = fit(model, method, one_batch, one_batch, 5, cfg)
        heads.append((model.head.weight.detach().clone(), res.history[-1]["val_acc"]))
    assert torch.allclose(heads[0][0], heads[1][0], atol=1e-5)
    assert heads[0][1] == heads[1][1]


def test_shortcut_not_taken_when_backbone_trains_or_is_stochastic(tiny_vit):
    import vpeft_viz.train as engine

    with_lora = copy.deepcopy(tiny_vit)
    attach_method(with_lora, create_method("lora"))
    assert not engine._frozen_features(with_lora)
    attach_method(tiny_vit, create_method("linear"))
    assert engine._frozen_features(tiny_vit)
    tiny_vit.blocks[0].attn.attn_drop.p = 0.1  # dropout makes features differ per epoch
    assert not engine._frozen_features(tiny_vit)
