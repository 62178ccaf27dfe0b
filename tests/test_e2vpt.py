"""E²VPT: key-value prompts in attention, the shared token/piece masks, the pruning rule,
rewind, and a run that records masks, scores and per-round accuracies.

The registry-wide contract (shapes, which parameters train, save/load, the ViT-B counts)
is in tests/test_methods.py; this file checks what only E²VPT does, against independent
computations (VPT-deep, a model built without the pruned token, explicit attention).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.methods._layers import vit_blocks
from vpeft_viz.methods.e2vpt import (
    KVPromptAttention,
    candidate_counts,
    init_prompts,
    kept_prompt_entries,
    prompt_layout,
    prune_masks,
    select_round,
)
from vpeft_viz.probes.attention import attention_maps, unfused_attention

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def images(model, n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, *model.patch_embed.img_size,
                      generator=torch.Generator().manual_seed(7))


def e2vpt(model, **overrides):
    method = create_method("e2vpt", overrides)
    attach_method(model, method)
    model.eval()
    return method


@torch.no_grad()
def perturb(model, std: float = 0.3) -> None:
    """Move prompts and head away from their init so comparisons are not trivial."""
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_vit_b_count_printed_by_params():
    out = subprocess.run(
        [sys.executable, "-m", "vpeft_viz", "params", "--backbone", "vit_base_patch16_224",
         "--method", "e2vpt", "--json"], capture_output=True, text=True, check=True).stdout
    counts = json.loads(out[out.index("{"):])
    assert counts["trainable_excl_head"] == 138_240 == 9_216 * (5 + 10)


def test_all_ones_masks_leave_the_unpruned_model_unchanged(make_tiny_vit):
    """With no key-value prompts and masks at 1, E²VPT is VPT-deep with the same prompts
    (an independent implementation), in eval and, with dropout off, in train mode."""
    base = make_tiny_vit()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    method = e2vpt(ours, kv_tokens=0, num_tokens=4, dropout=0.0)
    vpt = create_method("vpt-deep", {"num_tokens": 4, "dropout": 0.0})
    attach_method(ref, vpt)
    perturb(ours)
    with torch.no_grad():
        for a, b in zip(ours.blocks, ref.blocks):
            b.prompts.copy_(a.prompts)
        ref.head.load_state_dict(ours.head.state_dict())
    x = images(ours)
    assert torch.equal(ours.e2vpt_masks.token, torch.ones(4))
    with torch.no_grad():
        assert (ours(x) - ref.eval()(x)).abs().max() < 1e-5
    # soft masks at 1 (the mask-training round) change nothing either
    ours.e2vpt_masks.start_training()
    with torch.no_grad():
        assert (ours.train()(x) - ref.train()(x)).abs().max() < 1e-5
    assert method.num_trainable(ours) == 2 * 4 * ours.embed_dim


def test_kv_prompts_join_keys_and_values_after_projection(make_tiny_vit):
    model = make_tiny_vit()
    e2vpt(model, kv_tokens=3)
    perturb(model)
    wrapper = vit_blocks(model)[0].attn
    assert isinstance(wrapper, KVPromptAttention)
    a, p = wrapper.base_layer, wrapper.prompts
    assert p.shape == (a.num_heads, 3, a.head_dim)
    x = torch.randn(2, 9, model.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v = a.qkv(x).reshape(2, 9, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        k = torch.cat([p.expand(2, -1, -1, -1), k], 2)
        v = torch.cat([p.expand(2, -1, -1, -1), v], 2)
        probs = (q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)).softmax(-1)
        expected = a.proj((probs @ v).transpose(1, 2).reshape(2, 9, -1))
        fused = wrapper(x)
        with unfused_attention(model):
            explicit = wrapper(x)
    assert (fused - expected).abs().max() < 1e-5 and (explicit - expected).abs().max() < 1e-5
    # queries unchanged: the output keeps the input's length
    assert fused.shape == x.shape


def test_kv_prompt_init_bound(make_tiny_vit):
    model = make_tiny_vit()
    e2vpt(model, kv_tokens=5)
    p = vit_blocks(model)[0].attn.prompts
    bound = math.sqrt(6 / (p.shape[2] * 5))
    assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound


def test_visual_prompt_bound_is_vpts_and_0_0625_on_vit_b16():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=768, depth=1, num_heads=12,
                              num_classes=0)
    e2vpt(model, kv_tokens=1, num_tokens=64)
    p = model.blocks[0].prompts
    assert p.abs().max() <= 0.0625 and p.abs().max() > 0.06  # √(6/(3·16² + 768))


def test_attention_maps_show_kv_and_visual_prompts(make_tiny_vit):
    model = make_tiny_vit()
    e2vpt(model, kv_tokens=2, num_tokens=3)
    x = images(model, 2)
    maps = attention_maps(model, x)
    n = model.patch_embed.num_patches + model.num_prefix_tokens + 3
    assert [m.shape for m in maps] == [(2, model.blocks[0].base_layer.attn.base_layer.num_heads,
                                        n, n + 2)] * len(model.blocks)
    assert torch.allclose(maps[0].sum(-1), torch.ones(()))
    assert prompt_layout(model) == {"kv_tokens": 2, "visual_tokens": 3, "num_prefix": 1}


def test_a_zero_token_mask_removes_that_token(make_tiny_vit):
    base = make_tiny_vit()
    pruned, smaller = copy.deepcopy(base), copy.deepcopy(base)
    e2vpt(pruned, num_tokens=4, kv_tokens=2)
    perturb(pruned)
    token, piece = np.ones(4), np.ones((4, 16))
    token[1] = 0.0
    pruned.e2vpt_masks.set(token, piece)
    e2vpt(smaller, num_tokens=3, kv_tokens=2)
    with torch.no_grad():
        for a, b in zip(pruned.blocks, smaller.blocks):
            b.prompts.copy_(a.prompts[[0, 2, 3]])
            b.base_layer.attn.prompts.copy_(a.base_layer.attn.prompts)
        smaller.head.load_state_dict(pruned.head.state_dict())
    x = images(pruned)
    with torch.no_grad():
        assert (pruned(x) - smaller(x)).abs().max() < 1e-5
        # and it is not the same as merely zeroing the token's values
        pruned.e2vpt_masks.token.fill_(1.0)
        for b in pruned.blocks:
            b.prompts[1].zero_()
        assert (pruned(x) - smaller(x)).abs().max() > 1e-4


def test_a_zero_piece_mask_zeroes_dims_j_plus_16k(make_tiny_vit):
    base = make_tiny_vit()
    masked, removed = copy.deepcopy(base), copy.deepcopy(base)
    e2vpt(masked, num_tokens=3)
    perturb(masked)
    e2vpt(removed, num_tokens=3)
    removed.load_state_dict(masked.state_dict())
    x = images(masked)
    with torch.no_grad():
        unpruned = masked(x)
    piece = np.ones((3, 16))
    piece[2, 5] = 0.0
    masked.e2vpt_masks.set(np.ones(3), piece)
    with torch.no_grad():
        for b in removed.blocks:
            b.prompts[2, 5::16] = 0.0
        assert (masked(x) - removed(x)).abs().max() < 1e-6
        assert (masked(x) - unpruned).abs().max() > 1e-5
    width = masked.embed_dim
    assert kept_prompt_entries(np.ones(3), piece, width) == 3 * width - len(range(5, width, 16))


def test_pruning_rule():
    token_scores = np.array([0.3, -0.5, 0.1, -0.2])
    piece_scores = np.tile(np.arange(16, dtype=float), (4, 1))
    piece_scores[0, 15] = -9.0
    token, piece = prune_masks(token_scores, piece_scores, 2, 3)
    assert token.tolist() == [1, 0, 1, 0]  # the most negative scores go first
    assert piece[1].sum() == piece[3].sum() == 0  # a pruned token has no pieces
    assert piece[0].tolist() == [0, 0] + [1] * 13 + [0]  # ranked within the token
    assert (piece[[0, 2]].sum(1) == 13).all()  # the same number in every kept token
    # at least one token and four pieces are kept; pairs merged by the limits appear once
    assert candidate_counts(10, (0.95, 0.99), (0.9, 0.0)) == [(9, 12), (9, 0)]
    rounds = [{"val_acc": 0.5, "prompt_entries_kept": 100},
              {"val_acc": 0.5, "prompt_entries_kept": 60},
              {"val_acc": 0.4, "prompt_entries_kept": 10}]
    assert select_round(rounds) == 1  # ties → more pruning


def test_rewind_original_restores_init_and_fresh_is_seeded(make_tiny_vit):
    model = make_tiny_vit()
    e2vpt(model, rewind_init="original", seed=5)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "prompts" in n}
    perturb(model)
    init_prompts(model, 5)
    assert all(torch.equal(p, init[n]) for n, p in model.named_parameters() if n in init)
    init_prompts(model, 6)
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if n in init}
    assert all(not torch.equal(fresh[n], init[n]) for n in init)
    perturb(model)
    init_prompts(model, 6)
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters() if n in init)


class FakeFit:
    """Stands in for the run engine: a few SGD steps on random data, so gradients reach the
    masks, and a validation 'accuracy' per round."""

    def __init__(self, model, accs):
        self.model, self.accs, self.calls, self.starts = model, list(accs), [], []

    def __call__(self, *, round_index=0, rounds=1, label=""):
        from vpeft_viz.train import FitResult

        self.calls.append((round_index, rounds, label))
        self.starts.append({n: p.detach().clone() for n, p in self.model.named_parameters()
                            if p.requires_grad})
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        g = torch.Generator().manual_seed(round_index)
        self.model.train()
        for _ in range(3):
            x = torch.rand(4, 3, *self.model.patch_embed.img_size, generator=g)
            loss = nn.functional.cross_entropy(self.model(x), torch.arange(4) % 4)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return FitResult(best_epoch=1, best_val_acc=self.accs[round_index])


@pytest.mark.parametrize("rewind_init", ["fresh", "original"])
def test_train_rounds_prunes_rewinds_and_selects_on_validation(make_tiny_vit, rewind_init):
    model = make_tiny_vit()
    method = e2vpt(model, num_tokens=5, token_fractions="0.2,0.4", piece_fractions="0.5",
                   rewind_init=rewind_init, seed=3)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit = FakeFit(model, [0.9, 0.6, 0.6])
    method.train_rounds(model, fit)
    assert [c[:2] for c in fit.calls] == [(0, 3), (1, 3), (2, 3)]
    for start in fit.starts[1:]:  # every rewind starts from the initial head ...
        assert all(torch.equal(start[n], init[n]) for n in start if n.startswith("head."))
        prompts = [n for n in start if "prompts" in n]
        same = [torch.equal(start[n], init[n]) for n in prompts]
        # ... and from the original prompts, or a fresh draw of them
        assert all(same) if rewind_init == "original" else not any(same)
    arts = method.artifacts(model)
    assert arts["round_tokens_pruned"].tolist() == [1, 2]
    assert arts["round_pieces_pruned"].tolist() == [8, 8]
    assert arts["round_val_acc"].tolist() == [0.6, 0.6]
    assert int(arts["selected_round"]) == 1  # tie: the round that prunes more
    assert np.array_equal(arts["token_mask"], arts["round_token_masks"][1])
    assert model.e2vpt_masks.token.sum() == 3
    assert arts["token_scores"].shape == (5,) and arts["piece_scores"].shape == (5, 16)
    assert np.abs(arts["token_scores"]).sum() > 0 and int(arts["score_batches"]) == 3
    assert (arts["token_scores_abs"] >= np.abs(arts["token_scores"])).all()
    width = model.embed_dim
    expected = 2 * (3 * width // 2) + 2 * 5 * width  # kept prompts + key-value prompts
    assert arts["params_after_pruning"] == method.num_trainable(model) == expected
    assert model.e2vpt_masks.token_soft is None  # masks frozen after round 0


def test_no_pruning_is_one_plain_round(make_tiny_vit):
    model = make_tiny_vit()
    method = e2vpt(model, prune=False)
    fit = FakeFit(model, [0.7])
    method.train_rounds(model, fit)
    assert fit.calls == [(0, 1, "")]
    assert model.e2vpt_masks.token.sum() == method.config.num_tokens
    assert "round_val_acc" not in method.artifacts(model)


def test_run_records_masks_scores_and_rounds(vtab_task, tmp_path):
    from vpeft_viz.runs.execute import execute_run, make_run_config
    from vpeft_viz.runs.store import RunStore

    cfg = make_run_config(method="e2vpt", data=str(vtab_task), pretrained=False,
                          method_config={"num_tokens": 4, "kv_tokens": 2,
                                         "piece_fractions": "0.25,0.5"},
                          train={"epochs": 2, "batch_size": 8, "warmup_epochs": 0})
    run = RunStore(tmp_path / "store").create(cfg)
    summary = execute_run(run)
    assert summary["rounds"] == 3 and 0.0 <= summary["test_acc"] <= 1.0
    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    arts = run.load_artifact("method.npz")
    for key in ("token_mask", "piece_mask", "token_scores", "piece_scores",
                "round_val_acc", "round_token_masks", "round_piece_masks", "selected_round"):
        assert key in arts, key
    best = int(arts["selected_round"])
    assert summary["val_acc"] == pytest.approx(float(arts["round_val_acc"][best]))
    assert summary["trainable_params_excl_head"] == int(arts["params_after_pruning"])
    assert summary["trainable_params_excl_head"] < 6 * 128 * (4 + 2)


def test_run_test_images_name_classes_as_the_run_did():
    """The views' test images carry the class names the run's eval.json uses (the embedded
    count task's classes are '1'…'6', not the indices)."""
    import json
    from pathlib import Path

    from vpeft_viz.runs.model import run_test_images
    from vpeft_viz.runs.store import Run
    from vpeft_viz.runs.weights import load_run_model

    path = Path(__file__).resolve().parents[1] / "cached_runs" / "count-vpt-deep-s0"
    if not (path / "weights.safetensors").is_file():
        pytest.skip("shipped count-vpt-deep-s0 run not present")
    trained = load_run_model(Run(path, read_only=True))
    _, labels, names = run_test_images(path, trained.model, 2, task=trained.task)
    assert names == json.loads((path / "artifacts" / "eval.json").read_text())["class_names"]
    assert names[0] == "1" and len(labels) == 2
