"""DyT: real skipping equals masking, the four-term loss by hand, the dispatcher's masks, FLOPs
from the tokens processed, and what a run measures on its test split (tiny random ViTs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.methods.dyt import (
    SAMPLE_IMAGES,
    dyt_blocks,
    dyt_loss,
    dyt_paths,
    flops_model,
    gumbel_sigmoid_hard,
    kept_vs_attention,
    measure_test_split,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def dyt_model(tiny_vit, **overrides):
    method = create_method("dyt", overrides)
    torch.manual_seed(0)
    attach_method(tiny_vit, method)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters and dispatchers that split the tokens
        for b in dyt_blocks(tiny_vit):
            b.adapter.up.weight.normal_(0, 0.1, generator=g)
            b.dispatcher.weight.normal_(0, 0.5, generator=g)
    return method, tiny_vit.eval()


def images(n=8, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_gathered_path_equals_masked_path(tiny_vit):
    _, model = dyt_model(tiny_vit)
    x = images(8)
    with dyt_paths(model, gather=True) as blocks:
        gathered = model(x)
        kept = torch.stack([b.last_mask.sum(-1) for b in blocks], 1)  # (B, L)
    with dyt_paths(model, gather=False):
        masked = model(x)
    # the batch really mixes images that keep different numbers of tokens, in every layer
    assert all(len(set(kept[:, i].tolist())) > 1 for i in range(kept.shape[1]))
    assert 0 < kept.sum() < kept.numel() * 16
    assert (gathered - masked).abs().max().item() <= 1e-5
    with dyt_paths(model, route="complete"):
        complete = model(x)
    assert (gathered - complete).abs().max().item() > 1e-3  # the skipping changes the output


def test_skipped_tokens_never_reach_the_mlp(tiny_vit):
    _, model = dyt_model(tiny_vit)
    seen: list[int] = []
    hooks = [b.base_layer.mlp.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
        for b in dyt_blocks(model)]
    x = images(4)
    with dyt_paths(model, gather=True) as blocks, torch.no_grad():
        model(x)
        kept = [int(b.last_mask.sum()) + x.shape[0] for b in blocks]  # + one CLS per image
    for h in hooks:
        h.remove()
    assert seen == kept


def test_cls_always_kept_and_eval_mask_is_probability_above_half(tiny_vit):
    _, model = dyt_model(tiny_vit)
    with torch.no_grad():
        for b in dyt_blocks(model):
            b.dispatcher.bias.fill_(-100.0)  # every patch token skipped
        x = images(2)
        with dyt_paths(model) as blocks:
            out = model(x)
        assert all(b.last_mask.sum() == 0 and b.last_mask.shape == (2, 16) for b in blocks)
        # CLS still went through every MLP: the result is not the MLP-free network
        for b in blocks:
            b.base_layer.mlp.fc2.bias.add_(1.0)
        with dyt_paths(model):
            assert (model(x) - out).abs().max() > 1e-3
        for b in dyt_blocks(model):
            b.dispatcher.bias.fill_(0.0)
        with dyt_paths(model) as blocks:
            model(x)
            for b in blocks:
                assert torch.equal(b.last_mask.bool(), b.last_prob > 0.5)


def test_gumbel_sigmoid_hard_statistics_and_straight_through():
    g = torch.Generator().manual_seed(0)
    logits = torch.full((200_000,), 2.0, requires_grad=True)
    m = gumbel_sigmoid_hard(logits, tau=5.0, generator=g)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    # logit + g1 − g2 is logistic(logit, 1): P(m = 1) = σ(logit) whatever τ
    assert abs(m.mean().item() - torch.sigmoid(torch.tensor(2.0)).item()) < 0.005
    m.sum().backward()
    assert logits.grad is not None and (logits.grad > 0).all()
    assert logits.grad.max() <= 0.25 / 5.0 + 1e-6  # σ' ≤ 1/4, times 1/τ: the soft gradient


def test_training_masks_follow_the_dispatcher(tiny_vit):
    _, model = dyt_model(tiny_vit)
    model.train()
    for bias, expected in ((30.0, 1.0), (-30.0, 0.0)):
        with torch.no_grad():
            for b in dyt_blocks(model):
                b.dispatcher.bias.fill_(bias)
        with torch.no_grad(), dyt_paths(model) as blocks:
            model(images(4))
        assert all(b.last_mask.mean().item() == expected for b in blocks)


def test_loss_terms_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    dyn, full = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 2])
    masks = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0, 0.0]],
                          [[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 1.0, 1.0]]])  # 8 of 16 → 0.5
    masks = torch.cat([masks, torch.ones_like(masks)], 1)  # second layer keeps all: 24/32
    loss, terms = dyt_loss(dyn, full, masks, labels, nn.CrossEntropyLoss(), r=0.3)

    def ce(z):
        return -np.mean([np.log(np.exp(z[i, y]) / np.exp(z[i]).sum()) for i, y in
                         enumerate(labels.tolist())])

    d, c = dyn.numpy().astype(np.float64), full.numpy().astype(np.float64)
    p_d = np.exp(d) / np.exp(d).sum(1, keepdims=True)
    p_c = np.exp(c) / np.exp(c).sum(1, keepdims=True)
    kl = np.sum(p_c * (np.log(p_c) - np.log(p_d))) / 4  # KL(complete ‖ dynamic), batchmean
    hand = {"ce": ce(d), "rate": 2 * (0.75 - 0.3) ** 2, "ce_complete": ce(c), "kl": kl}
    for k, v in hand.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert loss.item() == pytest.approx(sum(hand.values()), rel=1e-5)


def test_training_loss_uses_the_dynamic_and_the_complete_forward(tiny_vit):
    method, model = dyt_model(tiny_vit, r=0.2, dropout=0.0)
    model.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    loss, out = method.training_loss(model, x, y, nn.CrossEntropyLoss())
    torch.manual_seed(5)  # the same Gumbel draws, by hand
    with dyt_paths(model) as blocks:
        dyn = model(x)
        masks = torch.stack([b.last_mask for b in blocks], 1)
    with dyt_paths(model, route="complete"):
        full = model(x)
    expected = (F.cross_entropy(dyn, y) + 2 * (masks.mean() - 0.2) ** 2 + F.cross_entropy(full, y)
                + F.kl_div(F.log_softmax(dyn, -1), F.log_softmax(full, -1),
                           reduction="batchmean", log_target=True))
    assert torch.equal(out, dyn)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(b.dispatcher.weight.grad.abs().sum() > 0 for b in dyt_blocks(model))


def test_flops_per_image_from_the_tokens_processed(tiny_vit):
    from torch.utils.flop_counter import FlopCounterMode

    _, model = dyt_model(tiny_vit)
    x = images(6, seed=4)
    fm = flops_model(model, x[:1])
    assert fm.per_token == 2 * 2 * 48 * 192  # fc1 + fc2 matmuls for one token
    assert fm.complete > fm.fixed
    for i in range(1, 6):
        with dyt_paths(model) as blocks, torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x[i:i + 1])
        kept = sum(int(b.last_mask.sum()) for b in blocks)
        assert int(fm.of(np.array([kept]))[0]) == fc.get_total_flops()


def test_kept_vs_attention_overlap():
    masks = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    attn = torch.tensor([[[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]]])
    out = kept_vs_attention(masks, attn)
    assert out[0, 0].item() == 0.5 and torch.isnan(out[0, 1])  # top-2 = {0, 2}; kept {0, 1}


def test_measure_test_split_records_what_the_view_needs(tiny_vit):
    _, model = dyt_model(tiny_vit)
    n = 20
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(n, 3, 32, 32, generator=g),
                                      torch.arange(n) % 5), batch_size=8)
    art = measure_test_split(model, loader, device=CPU)
    depth, patches = 2, 16
    assert art["image_layer_rate"].shape == (n, depth)
    assert art["mean_mask"].shape == (depth, patches) and tuple(art["grid"]) == (4, 4)
    np.testing.assert_allclose(art["mean_mask"].mean(1), art["image_layer_rate"].mean(0),
                               atol=1e-6)
    assert art["labels"].tolist() == (torch.arange(n) % 5).tolist()
    assert art["flops_per_image"].shape == (n,)
    assert (art["flops_per_image"] < art["flops_complete"]).all()
    s = min(SAMPLE_IMAGES, n)
    assert art["sample_images"].shape == (s, 32, 32, 3) and art["sample_images"].dtype == np.uint8
    assert art["sample_masks"].shape == art["sample_probs"].shape == (s, depth, patches)
    assert art["sample_cls_attention"].shape == (s, depth, patches)
    np.testing.assert_array_equal(art["sample_masks"], art["sample_probs"] > 0.5)
    np.testing.assert_array_equal(art["sample_masks"].mean(-1),
                                  art["image_layer_rate"][:s])
    assert art["attention_overlap"].shape == art["attention_chance"].shape == (depth,)
    assert np.all((art["attention_overlap"] >= 0) & (art["attention_overlap"] <= 1))
    assert art["latency_b1_dispatch_ms"] > 0 and art["latency_batch_size"] == 8


def test_a_dyt_run_stores_its_test_split_measurements(tmp_path):
    from conftest import write_vtab_task

    from vpeft_viz.runs import RunStore
    from vpeft_viz.runs.execute import execute_run, make_run_config

    task = write_vtab_task(tmp_path / "colours", sizes=(16, 6, 20))
    cfg = make_run_config(method="dyt", data=str(task), pretrained=False,
                          method_config={"r": 0.3},
                          train={"epochs": 1, "batch_size": 8, "eval_batch_size": 8})
    run = RunStore(tmp_path / "store").create(cfg)
    summary = execute_run(run)
    art = run.load_artifact("method.npz")
    n_test, patches = 20, 64  # embedded backbone: 32 px images, 4 px patches
    assert art["image_layer_rate"].shape[0] == n_test == art["flops_per_image"].shape[0]
    depth = art["image_layer_rate"].shape[1]
    assert art["mean_mask"].shape == (depth, patches) and tuple(art["grid"]) == (8, 8)
    assert art["sample_masks"].shape == (SAMPLE_IMAGES, depth, patches)
    assert art["labels"].tolist() == [i % 3 for i in range(n_test)]
    assert (art["preds"] == art["labels"]).mean() == pytest.approx(summary["test_acc"])
    assert art["attention_overlap"].shape == (depth,)
