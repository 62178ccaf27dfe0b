"""SPT: sensitivity against a plain autograd reference, the allocation rule and its budgets,
exact counts on ViT-B/16, sparse gradients, merge, state and the stored record.

The registry-wide contract tests (shapes, trainable set, save/load, …) run SPT-LoRA and
SPT-Adapter from ``tests/test_methods.py``; this file checks what is specific to SPT.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import timm
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.analysis import sensitivity as sens
from vpeft_viz.methods import attach_method, count_parameters, create_method, spt, trainable_state
from vpeft_viz.methods._layers import vit_blocks

CPU = torch.device("cpu")
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)


def tiny(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**TINY).eval()


def data(n: int = 24, classes: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 32, 32, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


def reference_sensitivity(model: nn.Module, dataset: TensorDataset, *, batches: int,
                          batch_size: int, seed: int, drop_path: float = 0.1,
                          ) -> dict[str, torch.Tensor]:
    """The definition, written plainly as the release runs it: a ViT built with timm's own
    ``drop_path_rate`` (its stochastic-depth rule), the same weights, a fresh head with
    trunc-normal(0.02) weight and zero bias, train mode, s += (∂L/∂w)² per batch."""
    work = VisionTransformer(**TINY, drop_path_rate=drop_path)
    work.load_state_dict(model.state_dict())
    torch.manual_seed(seed)
    work.reset_classifier(work.num_classes)
    nn.init.trunc_normal_(work.head.weight, std=0.02)
    nn.init.zeros_(work.head.bias)
    work.train()
    total: dict[str, torch.Tensor] = {}
    images, labels = dataset.tensors
    for b in range(batches):
        x = images[b * batch_size:(b + 1) * batch_size]
        y = labels[b * batch_size:(b + 1) * batch_size]
        if len(x) == 0:
            break
        work.zero_grad()
        nn.functional.cross_entropy(work(x), y).backward()
        for name, p in work.named_parameters():
            total[name] = total.get(name, 0) + p.grad.detach() ** 2
    out = {}
    d = work.embed_dim
    for i in range(len(work.blocks)):
        pre = f"blocks.{i}"
        for j, op in enumerate("qkv"):
            out[f"{pre}.attn.{op}.weight"] = total[f"{pre}.attn.qkv.weight"][j * d:(j + 1) * d]
            out[f"{pre}.attn.{op}.bias"] = total[f"{pre}.attn.qkv.bias"][j * d:(j + 1) * d]
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{pre}.{name}.{p}"] = total[f"{pre}.{name}.{p}"]
    out["norm.weight"], out["norm.bias"] = total["norm.weight"], total["norm.bias"]
    return out


# -- sensitivity ----------------------------------------------------------------------------
def test_sensitivity_matches_plain_reference():
    model, ds = tiny(), data(24)
    shuffled = DataLoader(ds, batch_size=5, shuffle=True)  # prepare must use file order
    scores, info = spt.compute_sensitivity(model, shuffled, batches=3, batch_size=8, seed=7)
    expected = reference_sensitivity(model, ds, batches=3, batch_size=8, seed=7)
    assert set(scores) == set(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(scores[name], ref, rtol=1e-5, atol=1e-12, msg=name)
    assert (info.batches, info.batch_size, info.images, info.seed) == (3, 8, 24, 7)
    assert info.order == "file order"
    assert info.head_init == "trunc_normal(std=0.02) weight, zero bias"
    assert info.drop_path == 0.1 and info.drop_path_per_block == [0.0, 0.1]


def test_sensitivity_drop_path_is_active_and_changes_the_scores():
    """Drop-path really fires in the scoring pass (train mode): the scores differ from a pass
    without it, and match the reference without it when it is 0."""
    model, ds = tiny(), data(24)
    loader = DataLoader(ds, batch_size=8)
    with_dp, _ = spt.compute_sensitivity(model, loader, batches=3, batch_size=8, seed=3)
    without, info = spt.compute_sensitivity(model, loader, batches=3, batch_size=8, seed=3,
                                            drop_path=0.0)
    assert info.drop_path_per_block == [0.0, 0.0]
    key = "blocks.0.mlp.fc2.weight"
    assert not torch.allclose(with_dp[key], without[key])
    expected = reference_sensitivity(model, ds, batches=3, batch_size=8, seed=3, drop_path=0.0)
    torch.testing.assert_close(without[key], expected[key], rtol=1e-5, atol=1e-12)


def test_sensitivity_head_is_trunc_normal_not_timm_default():
    """With drop-path off, the only randomness is the head: the scores equal the reference's
    trunc-normal head and differ from a timm-default head (Kaiming uniform, uniform bias)."""
    model, ds = tiny(), data(16)
    got, _ = spt.compute_sensitivity(model, DataLoader(ds, batch_size=8), batches=2,
                                     batch_size=8, seed=5, drop_path=0.0)
    work = copy.deepcopy(model)
    torch.manual_seed(5)
    work.reset_classifier(work.num_classes)  # timm's default init, no trunc-normal
    work.train()
    x, y = ds.tensors
    timm_head = 0
    for b in range(2):
        work.zero_grad()
        nn.functional.cross_entropy(work(x[8 * b:8 * b + 8]), y[8 * b:8 * b + 8]).backward()
        timm_head = timm_head + work.blocks[1].mlp.fc2.weight.grad ** 2
    key = "blocks.1.mlp.fc2.weight"
    ref = reference_sensitivity(model, ds, batches=2, batch_size=8, seed=5, drop_path=0.0)
    torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-12)
    assert not torch.allclose(got[key], timm_head, rtol=1e-2)


def test_sensitivity_leaves_model_alone_and_counts_images():
    model, ds = tiny(), data(20)
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    _, info = spt.compute_sensitivity(model, DataLoader(ds, batch_size=4), batches=16,
                                      batch_size=32, seed=0)
    assert info.batches == 1 and info.images == 20  # fewer images than 16 × 32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_sensitivity_depends_on_seed_only_through_the_head():
    model, loader = tiny(), DataLoader(data(16), batch_size=8)
    a, _ = spt.compute_sensitivity(model, loader, batches=2, batch_size=8, seed=0)
    b, _ = spt.compute_sensitivity(model, loader, batches=2, batch_size=8, seed=0)
    c, _ = spt.compute_sensitivity(model, loader, batches=2, batch_size=8, seed=1)
    key = "blocks.1.mlp.fc2.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_units_cover_the_scored_weights():
    model = tiny()
    units = spt.scored_units(model)
    scored = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"}
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith("norm.") or any(f".{s}." in n for s in scored))
    assert sum(u.numel for u in units) == expected
    assert not any(u.name.startswith(("head", "cls_token", "pos_embed", "patch_embed"))
                   for u in units)
    assert [u.op for u in units if u.is_matrix][:6] == list(spt.MATRIX_OPS)


# -- allocation -----------------------------------------------------------------------------
def brute_force_totals(units, scores, *, alpha, beta, kind, rank, cls_token) -> list[int]:
    """Budget of every top-k selection, k = 0..N, by sorting all scores (the definition)."""
    flat = torch.cat([scores[u.name].reshape(-1) for u in units])
    owner = torch.cat([torch.full((u.numel,), i) for i, u in enumerate(units)])
    order = torch.argsort(flat, descending=True, stable=True)
    counts = np.zeros(len(units), dtype=np.int64)
    numel = np.array([u.numel for u in units])
    cost = np.array([spt.structured_cost(u, kind, rank) for u in units])
    is_matrix = np.array([u.is_matrix for u in units])

    def total() -> int:
        c, _ = spt.allocation_costs(counts, numel, cost, is_matrix, alpha, beta)
        return cls_token + int(c.sum())

    totals = [total()]
    for i in order.tolist():
        if flat[i] <= 0:
            break
        counts[owner[i]] += 1
        totals.append(total())
    return totals


@pytest.fixture(scope="module")
def tiny_scores():
    model = tiny()
    scores, _ = spt.compute_sensitivity(model, DataLoader(data(32), batch_size=8), batches=4,
                                        batch_size=8, seed=0)
    return model, spt.scored_units(model), scores


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_allocation_is_the_nearest_top_k_budget(kind, tiny_scores):
    model, units, scores = tiny_scores
    kw = dict(alpha=10.0, beta=5.0, kind=kind, rank=4, cls_token=48)
    totals = np.array(brute_force_totals(units, scores, **kw))
    assert (np.diff(totals) >= 0).all(), "the budget must grow with k"
    for budget in (100, 500, 1500, 3000, 8000, 20000):
        alloc = spt.allocate(units, scores, budget=budget, strict=False, **kw)
        best = totals[np.argmin(np.abs(totals - budget))]
        assert abs(alloc.used - budget) == abs(best - budget)
        assert alloc.used in totals
        assert alloc.used == sum(alloc.costs.values()) + 48


def test_reachable_budgets_are_met_within_two_percent(tiny_scores):
    model, units, scores = tiny_scores
    kw = dict(alpha=10.0, beta=5.0, kind="lora", rank=4, cls_token=48)
    totals = np.array(brute_force_totals(units, scores, **kw))
    met = 0
    for budget in np.unique(np.geomspace(60, totals[-1], 40).astype(int)):
        best = totals[np.argmin(np.abs(totals - budget))]
        if abs(best - budget) > 0.02 * budget:
            continue  # unreachable: checked below
        alloc = spt.allocate(units, scores, budget=int(budget), **kw)
        assert abs(alloc.used - budget) <= 0.02 * budget
        met += 1
    assert met >= 10


def test_unreachable_budget_names_the_nearest_reachable_one(tiny_scores):
    model, units, scores = tiny_scores
    kw = dict(alpha=10.0, beta=5.0, kind="lora", rank=4, cls_token=48)
    totals = np.array(brute_force_totals(units, scores, **kw))
    jump = int(np.argmax(np.diff(totals)))  # a structured module switching on
    lo, hi = int(totals[jump]), int(totals[jump + 1])
    assert hi - lo > 100
    budget = lo + (hi - lo) // 3  # nearer the lower side, > 2% from both
    with pytest.raises(spt.BudgetError, match=f"nearest reachable budget is {lo:,}") as err:
        spt.allocate(units, scores, budget=budget, **kw)
    assert f"{hi:,}" in str(err.value)
    assert spt.allocate(units, scores, budget=lo, **kw).used == lo


def test_structured_and_vector_rules(tiny_scores):
    model, units, scores = tiny_scores
    alloc = spt.allocate(units, scores, budget=6000, alpha=10.0, beta=5.0, kind="lora",
                         rank=4, cls_token=48, strict=False)
    for u in units:
        n = alloc.counts[u.name]
        if u.is_matrix:
            cost = spt.structured_cost(u, "lora", 4)
            assert alloc.structured[u.name] == (n >= cost / 10)
            assert alloc.costs[u.name] == (cost if alloc.structured[u.name] else n)
        else:
            assert alloc.structured[u.name] == (n >= u.numel / 5)
            assert alloc.costs[u.name] == (u.numel if alloc.structured[u.name] else n)
        if not alloc.structured[u.name]:
            idx = alloc.indices[u.name]
            s = scores[u.name].reshape(-1)
            assert len(idx) == n and (s[idx] >= alloc.threshold).all()
    assert any(alloc.structured[u.name] for u in units if u.is_matrix)


def test_index_encoding_round_trip():
    idx = np.array([0, 3, 4, 1000, 2**31 + 5])
    assert np.array_equal(spt.decode_indices(spt.encode_indices(idx)), idx)
    assert spt.decode_indices(spt.encode_indices(np.zeros(0, np.int64))).size == 0


# -- modules --------------------------------------------------------------------------------
def manual_state(model: nn.Module, structured: list[str], sparse: dict[str, list[int]],
                 whole: list[str]) -> dict:
    units = {}
    for name in structured + whole:
        units[name] = {"structured": True, "count": 1}
    for name, idx in sparse.items():
        units[name] = {"structured": False, "count": len(idx),
                       "indices": spt.encode_indices(np.array(idx))}
    return {"version": spt.STATE_VERSION, "units": units}


def test_vit_b_structured_costs_and_count():
    """docs/methods.md (SPT) on ViT-B/16: LoRA r=8 costs 12,288 on 768×768 and 30,720 on fc1/fc2;
    the adapter 768·8·2 + 8 + 768 on q and 3072·8·2 + 8 + 3072 on fc1; CLS adds 768."""
    torch.manual_seed(0)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              weight_init="skip").eval()
    units = {u.name: u for u in spt.scored_units(vit_b)}
    assert spt.structured_cost(units["blocks.0.attn.q.weight"], "lora", 8) == 12_288
    assert spt.structured_cost(units["blocks.0.mlp.fc1.weight"], "lora", 8) == 30_720
    assert spt.structured_cost(units["blocks.0.mlp.fc2.weight"], "lora", 8) == 30_720
    assert spt.structured_cost(units["blocks.0.attn.v.weight"], "adapter", 8) == 13_064
    assert spt.structured_cost(units["blocks.0.mlp.fc1.weight"], "adapter", 8) == 52_232
    assert sum(u.numel for u in units.values()) == 85_056_000  # ViT-B minus embeddings, CLS, head
    state = manual_state(vit_b, ["blocks.0.attn.q.weight", "blocks.3.mlp.fc1.weight"],
                         {"blocks.5.attn.v.weight": list(range(100)),
                          "blocks.5.attn.v.bias": [1, 2]}, ["blocks.2.norm1.weight"])
    for name, expected in (("spt-lora", 12_288 + 30_720), ("spt-adapter", 13_064 + 52_232)):
        model = copy.deepcopy(vit_b)
        method = create_method(name)
        method.load_state(state)
        attach_method(model, method)
        counts = count_parameters(model, method)
        assert counts["trainable_excl_head"] == expected + 100 + 2 + 768 + 768


def test_gradients_only_at_chosen_entries():
    model = tiny()
    chosen = [3, 50, 700]
    method = create_method("spt-lora")
    method.load_state(manual_state(model, ["blocks.0.attn.k.weight"],
                                   {"blocks.1.mlp.fc1.weight": chosen,
                                    "blocks.0.attn.v.bias": [5]}, ["blocks.1.norm2.bias"]))
    attach_method(model, method)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.mlp.fc1.base_layer.weight" not in names
    fc1 = vit_blocks(model)[1].mlp.fc1
    assert fc1.weight_delta.shape == (3,)
    model.train()
    x, y = data(4).tensors
    nn.functional.cross_entropy(model(x), y).backward()
    assert fc1.base_layer.weight.grad is None
    assert fc1.weight_delta.grad is not None and (fc1.weight_delta.grad != 0).all()
    # one optimiser step moves the effective weight at the chosen entries only
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    moved = (fc1.effective_weight() - fc1.base_layer.weight).reshape(-1).nonzero().reshape(-1)
    assert moved.tolist() == chosen
    qkv = vit_blocks(model)[0].attn.qkv
    assert (qkv.effective_bias() != qkv.base_layer.bias).nonzero().reshape(-1).tolist() == \
        [2 * 48 + 5]  # the v slice starts at 2·width


def test_spt_lora_merge_is_exact_with_every_kind_of_delta():
    model = tiny()
    plain = copy.deepcopy(model)
    method = create_method("spt-lora", {"sparse_layernorm": True})  # sparse LN deltas too
    method.load_state(manual_state(
        model, ["blocks.0.attn.q.weight", "blocks.0.attn.v.weight", "blocks.1.mlp.fc2.weight"],
        {"blocks.0.attn.k.weight": [1, 2, 3], "blocks.1.attn.proj.weight": [0, 47, 100],
         "blocks.0.norm1.weight": [4], "norm.bias": [0, 9]},
        ["blocks.1.mlp.fc1.bias", "blocks.0.norm2.weight"]))
    attach_method(model, method)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = data(4).tensors[0]
    with torch.no_grad():
        expected = model.eval()(x)
        merged = method.merge(copy.deepcopy(model)).eval()
        assert (merged(x) - expected).abs().max() < 1e-4
        plain.load_state_dict(merged.state_dict(), strict=True)
        assert (plain(x) - expected).abs().max() < 1e-4
        assert (plain.cls_token - model.cls_token).abs().max() > 1e-3  # the CLS delta folded


def test_layernorm_sparse_entries_are_counted_but_never_trained_by_default():
    """The release: sparse deltas only in linear layers; a LayerNorm vector tuned whole is
    trained; sparse LayerNorm entries count in the budget but stay frozen."""
    sparse = {"blocks.0.norm1.weight": [1, 4], "norm.bias": [0, 9, 11],
              "blocks.1.mlp.fc1.weight": [3, 50]}
    for flag, trained_ln in ((False, set()), (True, {"blocks.0.norm1", "norm"})):
        model = tiny()
        method = create_method("spt-lora", {"sparse_layernorm": flag})
        method.load_state(manual_state(model, [], sparse, ["blocks.1.norm2.weight"]))
        attach_method(model, method)
        tuned = {n for n, m in model.named_modules() if isinstance(m, spt.SPTLayerNorm)}
        assert tuned == trained_ln | {"blocks.1.norm2"}
        assert isinstance(model.get_submodule("blocks.1.norm2"), spt.SPTLayerNorm)
        if not flag:  # untouched: still timm's frozen LayerNorm
            assert not any(p.requires_grad for p in model.blocks[0].norm1.parameters())
            assert not any(p.requires_grad for p in model.norm.parameters())
        # the whole norm2 weight (48) trains; 2 + 3 sparse entries only with the flag
        ln_trained = sum(p.numel() for n in tuned
                         for p in model.get_submodule(n).parameters() if p.requires_grad)
        assert ln_trained == 48 + (5 if flag else 0)


def test_prepare_state_separates_counted_and_trained_layernorm_entries():
    model = tiny()
    loader = DataLoader(data(16), batch_size=8)
    kw = {"budget_fraction": 0.2, "sensitivity_batches": 1, "sensitivity_batch_size": 8}
    method = create_method("spt-lora", kw)
    method.prepare(model, loader, device=CPU)
    budget = method.state()["budget"]
    assert budget["frozen_layernorm"] > 0  # this budget selects sparse LayerNorm entries
    assert budget["trained"] == budget["used"] - budget["frozen_layernorm"]
    trained = copy.deepcopy(model)
    attach_method(trained, method)
    assert method.num_trainable(trained) == budget["trained"]
    opt_in = create_method("spt-lora", {**kw, "sparse_layernorm": True})
    opt_in.prepare(model, loader, device=CPU)
    b2 = opt_in.state()["budget"]
    assert b2["frozen_layernorm"] == 0 and b2["trained"] == b2["used"] == budget["used"]
    attach_method(model, opt_in)
    assert opt_in.num_trainable(model) == b2["used"]


def _perturb(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_version_1_state_rebuilds_the_modules_it_was_trained_with():
    """Runs stored before the modules followed the release trained sparse LayerNorm deltas
    and proj's adapter after proj: their state rebuilds exactly that, so weights load."""
    model = tiny()
    old = manual_state(model, ["blocks.0.attn.proj.weight"], {"blocks.0.norm1.weight": [1, 4]},
                       [])
    old["version"] = 1
    method = create_method("spt-adapter")
    method.load_state(old)
    attach_method(model, method)
    blk = vit_blocks(model)[0]
    assert isinstance(blk.norm1, spt.SPTLayerNorm) and blk.norm1.weight_delta.numel() == 2
    assert not blk.attn.proj.adapter_on_input


def test_structured_modules_have_drop_path_active_only_in_training():
    model = tiny()
    method = create_method("spt-lora", {"dropout": 0.0})
    method.load_state(manual_state(model, ["blocks.0.mlp.fc1.weight"], {}, []))
    attach_method(model, method)
    fc1 = vit_blocks(model)[0].mlp.fc1
    assert isinstance(fc1.drop_path, DropPath) and fc1.drop_path.drop_prob == 0.1
    _perturb(fc1)
    x = torch.randn(64, 5, 48)
    with torch.no_grad():
        base = fc1.base_layer(x)
        delta = (x @ fc1.lora_A["fc1"].T) @ fc1.lora_B["fc1"].T
        assert torch.allclose(fc1.eval()(x), base + delta, atol=1e-5)  # eval: no drop-path
        torch.manual_seed(0)
        out = fc1.train()(x)
    kept = [torch.allclose(out[i], base[i] + delta[i] / 0.9, atol=1e-5) for i in range(64)]
    dropped = [torch.allclose(out[i], base[i], atol=1e-6) for i in range(64)]
    assert all(k or d for k, d in zip(kept, dropped))  # per sample: whole delta or none
    assert any(dropped) and any(kept)
    off = create_method("spt-lora", {"drop_path": 0.0})
    off.load_state(manual_state(model, ["blocks.0.mlp.fc1.weight"], {}, []))
    plain = tiny()
    attach_method(plain, off)
    assert isinstance(vit_blocks(plain)[0].mlp.fc1.drop_path, nn.Identity)


def test_lora_on_proj_gets_the_undropped_input():
    """The release drops the input of q/k/v/fc1/fc2's LoRA (rate 0.1), not proj's."""
    model = tiny()
    method = create_method("spt-lora", {"dropout": 0.5, "drop_path": 0.0})
    method.load_state(manual_state(model, ["blocks.0.attn.proj.weight",
                                           "blocks.0.attn.q.weight"], {}, []))
    attach_method(model, method)
    blk = vit_blocks(model)[0]
    proj, qkv = blk.attn.proj, blk.attn.qkv
    assert proj.dropout.p == 0.0 and qkv.dropout.p == 0.5
    _perturb(proj)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        expected = proj.base_layer(x) + (x @ proj.lora_A["proj"].T) @ proj.lora_B["proj"].T
        assert torch.allclose(proj.train()(x), expected, atol=1e-5)  # training, yet no dropout


def test_adapter_on_proj_is_parallel_on_its_input_by_default():
    model = tiny()
    method = create_method("spt-adapter", {"drop_path": 0.0})
    assert method.config.proj_adapter == "parallel-input"
    method.load_state(manual_state(model, ["blocks.0.attn.proj.weight"], {}, []))
    attach_method(model, method)
    proj = vit_blocks(model)[0].attn.proj
    adapter = proj.adapters["proj"]
    assert adapter.down.bias.abs().max() > 0  # PyTorch's default init, not zero
    assert torch.equal(adapter.up.bias, torch.zeros(48))
    _perturb(proj)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        expected = proj.base_layer(x) + adapter(x)
        assert (proj.train()(x) - expected).abs().max() < 1e-6  # un-dropped input
    seq = create_method("spt-adapter", {"proj_adapter": "sequential-output", "drop_path": 0.0})
    seq.load_state(manual_state(model, ["blocks.0.attn.proj.weight"], {}, []))
    other = tiny()
    attach_method(other, seq)
    proj2 = vit_blocks(other)[0].attn.proj
    assert proj2.dropout.p == 0.1  # the earlier placement kept its input dropout
    _perturb(proj2)
    with torch.no_grad():
        y = proj2.base_layer(x)
        assert (proj2.eval()(x) - (y + proj2.adapters["proj"](y))).abs().max() < 1e-6


def test_adapter_is_sequential_on_the_slice_output():
    model = tiny()
    method = create_method("spt-adapter")
    method.load_state(manual_state(model, ["blocks.0.attn.v.weight"], {}, []))
    attach_method(model, method)
    qkv = vit_blocks(model)[0].attn.qkv
    adapter = qkv.adapters["v"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        base = qkv.base_layer(x)
        v = base[..., 96:]
        expected = torch.cat([base[..., :96], v + adapter(v)], dim=-1)
        assert (qkv.eval()(x) - expected).abs().max() < 1e-6


# -- the method end to end ------------------------------------------------------------------
def test_prepare_records_budget_state_and_rebuilds_exactly(tmp_path):
    model = tiny()
    loader = DataLoader(data(32), batch_size=8, shuffle=True)
    method = create_method("spt-lora", {"budget": None, "budget_fraction": 0.05,
                                        "sensitivity_batches": 2, "sensitivity_batch_size": 8})
    method.prepare(model, loader, device=CPU)
    state = method.state()
    assert state["sensitivity"]["images"] == 16 and state["sensitivity"]["seed"] == 0
    assert state["budget"]["auto"] and state["budget"]["target"] == round(
        0.05 * sum(u.numel for u in spt.scored_units(model)))
    text = json.dumps(state)
    trained = copy.deepcopy(model)
    attach_method(trained, method)
    assert method.num_trainable(trained) == state["budget"]["trained"]
    assert state["sensitivity"]["head_init"] == "trunc_normal(std=0.02) weight, zero bias"
    assert state["sensitivity"]["drop_path"] == 0.1
    assert sum(state["budget"][k] for k in ("unstructured", "structured_matrices",
                                            "structured_vectors", "cls_token")) == \
        state["budget"]["used"]
    again = create_method("spt-lora", method.config.to_dict())
    again.load_state(json.loads(text))
    rebuilt = copy.deepcopy(model)
    attach_method(rebuilt, again)
    a, b = trainable_state(trained), trainable_state(rebuilt)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for k in a:
        if k.endswith("_idx"):
            assert torch.equal(a[k], b[k]), k


def test_explicit_unreachable_budget_fails_in_prepare():
    model = tiny()
    loader = DataLoader(data(16), batch_size=8)
    method = create_method("spt-lora", {"budget": 10, "sensitivity_batches": 1,
                                        "sensitivity_batch_size": 8})
    with pytest.raises(spt.BudgetError, match="nearest reachable budget is 48"):
        method.prepare(model, loader, device=CPU)  # the CLS token alone costs 48


def test_stored_record_is_small_and_reallocates_like_the_method():
    """On the embedded architecture (random init): < 2 MB per run, and the view's grid
    re-allocation equals the method's exact allocation at the grid's budgets."""
    from vpeft_viz.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone(num_classes=10, pretrained=False)
    units = spt.scored_units(model)
    scores, info = spt.compute_sensitivity(model, DataLoader(data(16, classes=10)),
                                           batches=1, batch_size=16)
    table = spt.SortedScores(units, scores)
    kw = dict(alpha=10.0, beta=5.0, kind="lora", rank=8, cls_token=spt.cls_token_cost(model))
    budget = round(0.005 * sum(u.numel for u in units))  # the default budget_fraction
    alloc = spt.allocate(units, scores, budget=budget, strict=False, table=table, **kw)
    arts = {**spt.sensitivity_summary(table, "lora", 8),
            **spt.allocation_arrays(alloc, units, 10.0, 5.0)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arts)
    assert len(buf.getvalue()) < 2_000_000

    method = create_method("spt-lora")
    method.load_state(spt.allocation_state(alloc, units, info, auto=True))
    attach_method(model, method)
    assert method.num_trainable(model) == alloc.used

    smap = sens.SensitivityMap.from_artifacts(arts)
    own = sens.run_layout(smap)
    assert own.used == alloc.used and np.array_equal(own.costs, arts["allocation/cost"])
    _, totals = sens.budget_curve(smap)
    for budget in (totals[len(totals) // 3], totals[len(totals) // 2], totals[-200]):
        view = sens.reallocate(smap, int(budget))
        exact = spt.allocate(units, scores, budget=int(budget), table=table, **kw)
        assert view.used == exact.used == budget
        assert np.array_equal(view.structured,
                              np.array([exact.structured[u.name] for u in units]))
    grid = sens.block_op_grid(smap, own)
    assert grid["counts"].shape == (len(model.blocks), 6)
    shares = sens.sensitive_shares(smap, own)
    assert abs(shares["depth"]["share"].sum() - 1) < 1e-9
    assert abs(shares["op"]["share"].sum() - 1) < 1e-9
    image = sens.matrix_image(smap, "blocks.0.mlp.fc1.weight")
    rows, cols = image["log10"].shape
    assert max(rows, cols) <= spt.IMAGE_MAX_SIDE
    assert rows * image["row_step"] == 4 * model.embed_dim  # fc1: 4·width rows, pooled
