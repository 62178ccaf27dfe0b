"""HST: the ViT-B count by component, the derived layouts, what trains, the forward against an
independent re-implementation of the release's, the stored BatchNorm statistics and a run
rebuilt exactly, and the records its view reads."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from vpeft_viz.methods import (
    attach_method,
    count_parameters,
    create_method,
    head_parameters,
    trainable_state,
)
from vpeft_viz.methods.hst import HSTSide, bridge_to_grid, side_layout
from vpeft_viz.methods.hst.trace import measure_test_split, pca_rgb, trace

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def attached(model: nn.Module, **settings) -> nn.Module:
    torch.manual_seed(0)
    method = create_method("hst", settings)
    attach_method(model, method)
    return method


def perturb_all(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere HST trains, and in the BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


# -- the count on ViT-B/16, by component ---------------------------------------------------------
COMPONENTS = {  # docs/methods.md, HST
    "meta tokens": (lambda n: n.endswith(".meta"), 12 * 768),
    "block LayerNorms": (lambda n: ".base_layer.norm" in n, 24 * 2 * 768),
    "bridges": (lambda n: ".bridge." in n, 769 * (32 + 48 + 64 + 72)),
    "meta-token LayerNorms": (lambda n: ".meta_norms." in n, 3 * 2 * (32 + 48 + 64 + 72)),
    "stem": (lambda n: n.startswith("hst.stages.0.embed."),
             27 * 32 + 2 * 32 + 4 * 32 * 32 + 32 + 2 * 32),
    "downsampling": (lambda n: ".embed." in n and not n.startswith("hst.stages.0."),
                     sum(9 * a * b + b + 2 * b for a, b in ((32, 48), (48, 64), (64, 72)))),
    "side blocks": (lambda n: ".blocks." in n and n.startswith("hst."),
                    sum(3 * (12 * w * w + 13 * w) for w in (32, 48, 64, 72))),
    "stage norms": (lambda n: n.startswith("hst.stages.") and ".norm." in n
                    and ".blocks." not in n and ".embed." not in n, 2 * (32 + 48 + 64 + 72)),
}


def test_vit_b_count_by_component_and_layout():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    method = attached(model)
    names = [n for n, _ in method.trainable_parameters(model)]
    sizes = dict(model.named_parameters())
    found = {k: sum(sizes[n].numel() for n in names if match(n))
             for k, (match, _) in COMPONENTS.items()}
    assert found == {k: want for k, (_, want) in COMPONENTS.items()}
    assert sum(found.values()) == 764_840 == count_parameters(model, method)["trainable"]
    covered = {n for n in names if any(match(n) for match, _ in COMPONENTS.values())}
    assert covered == set(names)

    layout = model.hst.layout
    assert [s.layers for s in layout.stages] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    assert [s.width for s in layout.stages] == [32, 48, 64, 72]
    assert [s.heads for s in layout.stages] == [2, 4, 8, 12]
    assert [s.grid for s in layout.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert layout.stem_stride == (2, 2) and layout.stem_kernel == (2, 2)

    model.reset_classifier(10)  # the head reads the 72 side features
    assert (model.head.in_features, model.head.out_features) == (72, 10)
    assert count_parameters(model, method)["trainable"] == 764_840 + 73 * 10
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 10)


@pytest.mark.parametrize(("depth", "grid", "image", "layers", "grids", "widths", "stem"), [
    (6, 8, 32, [(0, 1), (2, 3), (4, 5)], [16, 8, 4], [48, 64, 72], (2, 1)),  # embedded
    (2, 4, 32, [(0,), (1,)], [4, 2], [64, 72], (2, 4)),  # the tiny test ViT
    (3, 4, 32, [(0,), (1,), (2,)], [8, 4, 2], [48, 64, 72], (2, 2)),
    (24, 14, 224, [tuple(range(6 * i, 6 * i + 6)) for i in range(4)], [56, 28, 14, 7],
     [32, 48, 64, 72], (2, 2)),  # ViT-L/16: 6 layers per stage
    (7, 7, 224, [tuple(range(7))], [3], [72], (2, 32)),  # a prime depth: one stage at ½×
])
def test_layout_is_derived_from_the_backbone(depth, grid, image, layers, grids, widths, stem):
    layout = side_layout(depth=depth, vit_grid=(grid, grid), image=(image, image))
    assert [s.layers for s in layout.stages] == layers
    assert [s.grid for s in layout.stages] == [(g, g) for g in grids]
    assert [s.width for s in layout.stages] == widths
    assert (layout.stem_stride[0], layout.stem_kernel[0]) == stem
    assert layout.out_features == 72


def test_stages_setting_must_divide_the_depth(make_tiny_vit):
    with pytest.raises(ValueError, match=r"hst\.stages=4 .* 6 blocks.*1, 2, 3"):
        side_layout(depth=6, vit_grid=(8, 8), image=(32, 32), stages=4)
    layout = side_layout(depth=6, vit_grid=(8, 8), image=(32, 32), stages=2)
    assert [s.layers for s in layout.stages] == [(0, 1, 2), (3, 4, 5)]
    with pytest.raises(ValueError, match="hst.stages"):
        attached(make_tiny_vit(depth=3), stages=2)


# -- what trains, what is unused ----------------------------------------------------------------
def test_trained_parameters_and_unused_final_norm(tiny_vit):
    method = attached(tiny_vit)
    trainable = {n for n, p in tiny_vit.named_parameters() if p.requires_grad}
    expected = {n for n, _ in tiny_vit.named_parameters()
                if n.startswith(("hst.", "head.")) or n.endswith(".meta")
                or ".base_layer.norm1." in n or ".base_layer.norm2." in n}
    assert trainable == expected
    assert {n for n, _ in method.trainable_parameters(tiny_vit)} == expected - {
        "head.weight", "head.bias"}
    assert not any(n.startswith(("norm.", "patch_embed.", "cls_token", "pos_embed"))
                   or ".base_layer.attn." in n or ".base_layer.mlp." in n for n in trainable)
    assert tiny_vit.head.in_features == 72 and head_parameters(tiny_vit)

    x = torch.rand(3, 3, 32, 32)
    tiny_vit.eval()
    before = tiny_vit(x)
    with torch.no_grad():
        tiny_vit.norm.weight.mul_(3.0).add_(1.0)  # the ViT's final norm is not used
    assert torch.equal(tiny_vit(x), before)


def test_meta_token_init_is_xavier_uniform(make_tiny_vit):
    model = make_tiny_vit(depth=2, embed_dim=48)
    attached(model, meta_tokens=3)
    bound = math.sqrt(6.0 / (3 * 48 + 48))  # torch's fans for a (1, 3, 48) tensor
    for blk in model.blocks:
        assert blk.meta.shape == (1, 3, 48)
        assert blk.meta.abs().max() <= bound and blk.meta.abs().max() > 0.8 * bound


# -- the forward against an independent re-implementation of the release's --------------------
def release_forward(model: nn.Module, x: torch.Tensor):
    """The release's ``forward_features`` + head, written out with functional ops on the
    attached model's weights (eval mode): resize *then* bridge, every step explicit.
    Returns the logits and, per stage, the attention (batch × blocks × heads × P × keys)."""
    side, lay = model.hst, model.hst.layout
    b = x.shape[0]
    n = model.blocks[0].num_meta
    gh, gw = lay.vit_grid
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(b, -1, -1), t], 1) + model.pos_embed
    metas, feats = [], []
    for blk in model.blocks:
        t = torch.cat([blk.meta.expand(b, -1, -1), t], 1)
        t = blk.base_layer(t)  # timm's own block
        metas.append(t[:, :n])
        feats.append(t[:, n + 1:].transpose(1, 2).reshape(b, -1, gh, gw))
        t = t[:, n:]
    xm, attns = x, []
    for i, (stage, st) in enumerate(zip(side.stages, lay.stages)):
        e = stage.embed
        if i == 0:
            conv1, bn, _, conv2 = e.conv
            y = F.conv2d(xm, conv1.weight, None, lay.stem_stride, 1)
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                             0.0, bn.eps)
            y = F.conv2d(F.relu(y), conv2.weight, conv2.bias, lay.stem_kernel)
        else:
            y = F.conv2d(xm, e.proj.weight, e.proj.bias, 2, 1)
        h, w = y.shape[2:]
        xm = F.layer_norm(y.flatten(2).transpose(1, 2), (st.width,), e.norm.weight, e.norm.bias,
                          1e-5)
        stage_attn = []
        for j, layer in enumerate(st.layers):
            br, blk = stage.bridge, stage.blocks[j]
            f = F.interpolate(feats[layer], size=(h, w), mode="bilinear", align_corners=False)
            f = F.linear(f.flatten(2).transpose(1, 2), br.weight, br.bias)
            mn = stage.meta_norms[j]
            m = F.layer_norm(F.linear(metas[layer], br.weight, br.bias), (st.width,),
                             mn.weight, mn.bias, 1e-5)
            kv = torch.cat([m, f.mean(1, keepdim=True)], 1)
            a = blk.attn
            hd = st.width // st.heads
            q = F.linear(F.layer_norm(xm, (st.width,), blk.norm1.weight, blk.norm1.bias, 1e-6),
                         a.q.weight, a.q.bias)
            k, v = F.linear(kv, a.k.weight, a.k.bias), F.linear(kv, a.v.weight, a.v.bias)
            q, k, v = (z.reshape(b, z.shape[1], st.heads, hd).permute(0, 2, 1, 3)
                       for z in (q, k, v))
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1)
            stage_attn.append(p)
            o = (p @ v).permute(0, 2, 1, 3).reshape(b, -1, st.width)
            xm = xm + F.linear(o, a.proj.weight, a.proj.bias)
            xm = xm + f
            z = F.layer_norm(xm, (st.width,), blk.norm2.weight, blk.norm2.bias, 1e-6)
            z = F.linear(F.gelu(F.linear(z, blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                         blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            xm = xm + z
        attns.append(torch.stack(stage_attn, 1))
        xm = F.layer_norm(xm, (st.width,), stage.norm.weight, stage.norm.bias, 1e-6)
        if i < len(lay.stages) - 1:
            xm = xm.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    pooled = xm.mean(1)
    bn = side.fc_norm
    pooled = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6)
    return F.linear(pooled, model.head.weight, model.head.bias), attns


@pytest.mark.parametrize("settings", [{}, {"meta_tokens": 2}])
def test_forward_matches_the_release_written_out(make_tiny_vit, settings):
    model = make_tiny_vit(depth=3)  # 3 stages on grids 8, 4, 2: up-, same- and down-sized
    attached(model, **settings)
    perturb_all(model)
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_attn = release_forward(model, x)
        got = trace(model, x)
        assert (model(x) - want).abs().max() < 1e-5
    assert np.abs(got["logits"] - want.numpy()).max() < 1e-5
    assert len(got["attn"]) == 3
    for g, w in zip(got["attn"], want_attn):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < 1e-6
        assert g.shape[-1] == model.blocks[0].num_meta + 1  # keys: meta token(s) + global


def test_cross_attention_against_a_hand_written_reference():
    from vpeft_viz.methods.hst import CrossAttention

    torch.manual_seed(0)
    att = CrossAttention(24, 4).eval()
    x, kv = torch.randn(2, 10, 24), torch.randn(2, 3, 24)
    out = att(x, kv)
    ref = torch.zeros_like(out)
    for b in range(2):
        heads = []
        for hh in range(4):
            s = slice(6 * hh, 6 * hh + 6)
            q = x[b] @ att.q.weight[s].T + att.q.bias[s]
            k = kv[b] @ att.k.weight[s].T + att.k.bias[s]
            v = kv[b] @ att.v.weight[s].T + att.v.bias[s]
            w = torch.exp(q @ k.T / math.sqrt(6))
            heads.append((w / w.sum(1, keepdim=True)) @ v)
        ref[b] = torch.cat(heads, 1) @ att.proj.weight.T + att.proj.bias
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("grid", [(56, 56), (7, 7), (14, 14)])
def test_bridging_before_resizing_equals_the_release_order(grid):
    torch.manual_seed(0)
    bridge = nn.Linear(768, 32)
    nn.init.normal_(bridge.bias)
    tokens = torch.randn(2, 196, 768)
    got = bridge_to_grid(bridge, tokens, (14, 14), grid)
    feat = tokens.transpose(1, 2).reshape(2, 768, 14, 14)
    resized = F.interpolate(feat, size=grid, mode="bilinear", align_corners=False)
    want = bridge(resized.flatten(2).transpose(1, 2))
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


# -- BatchNorm statistics: stored, restored, and a one-image batch -------------------------------
def test_batchnorm_statistics_are_stored_and_reloaded(tiny_vit, make_tiny_vit):
    attached(tiny_vit)
    tiny_vit.train()
    with torch.no_grad():
        for s in range(3):  # training forwards move the running statistics
            tiny_vit(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 3)
    state = trainable_state(tiny_vit)
    assert {"hst.fc_norm.running_mean", "hst.fc_norm.running_var",
            "hst.stages.0.embed.conv.1.running_mean"} <= set(state)
    assert state["hst.fc_norm.running_var"].sub(1).abs().max() > 1e-3
    x = torch.rand(2, 3, 32, 32)
    want = tiny_vit.eval()(x)
    fresh = make_tiny_vit()
    attached(fresh)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    assert torch.equal(fresh.eval()(x), want)


def test_best_epoch_restores_its_batchnorm_statistics(tiny_vit, tiny_loader, monkeypatch):
    """Validation is best after epoch 1; the statistics that come back are epoch 1's, not
    the last epoch's (they go with the weights they were collected with)."""
    import vpeft_viz.train as train
    from vpeft_viz.train import Callback, EvalResult, TrainConfig, fit

    method = attached(tiny_vit)
    accs = iter([0.9, 0.1, 0.1])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: EvalResult(
        loss=1.0, acc=next(accs), confusion=None, class_correct=np.zeros(5, dtype=np.int64),
        class_total=np.ones(5, dtype=np.int64)))
    seen: list[torch.Tensor] = []

    class Snapshot(Callback):
        def on_epoch(self, row: dict) -> None:
            seen.append(tiny_vit.hst.fc_norm.running_mean.clone())

    res = fit(tiny_vit, method, tiny_loader, tiny_loader, 5,
              TrainConfig(epochs=3, batch_size=8, warmup_epochs=0), callbacks=[Snapshot()],
              device=CPU)
    assert res.best_epoch == 1 and not torch.equal(seen[0], seen[-1])
    assert torch.equal(tiny_vit.hst.fc_norm.running_mean, seen[0])


def test_a_training_batch_of_one_image(tiny_vit):
    attached(tiny_vit)
    tiny_vit.train()
    out = tiny_vit(torch.rand(1, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 5) and tiny_vit.blocks[0].meta.grad is not None


def test_run_is_rebuilt_exactly_with_its_record(vtab_task, tmp_path):
    """A real HST run on the embedded architecture (random init; a last training batch of
    one image): the rebuilt model reproduces the test loss, and the record is stored."""
    from vpeft_viz.data import resolve_data
    from vpeft_viz.runs import RunStore
    from vpeft_viz.runs.execute import build_loaders, execute_run, make_run_config
    from vpeft_viz.runs.weights import load_run_model
    from vpeft_viz.train import TrainConfig, evaluate

    cfg = make_run_config(method="hst", data=str(vtab_task), pretrained=False,
                          train={"epochs": 2, "batch_size": 23})
    run = RunStore(tmp_path / "store").create(cfg)
    summary = execute_run(run)
    assert summary["trainable_params_excl_head"] == 384_848
    trained = load_run_model(run)
    assert trained.model.hst.fc_norm.running_var.sub(1).abs().max() > 1e-4  # stored stats
    task = resolve_data(cfg["data"]["spec"], seed=0)
    loaders = build_loaders(task, trained.model, cfg, TrainConfig.from_dict(cfg["train"]))
    test = evaluate(trained.model, loaders["test"], task.num_classes, device=CPU)
    assert test.loss == summary["test_loss"] and test.acc == summary["test_acc"]

    rec = run.load_artifact("method.npz")
    assert rec["meta_param_norm"].shape == rec["meta_out_norm"].shape == (6,)
    assert rec["meta_shift_norm"].max() > 0  # the meta tokens moved in training
    assert [tuple(g) for g in rec["stage_grids"]] == [(16, 16), (8, 8), (4, 4)]
    assert rec["sample_images"].shape == (8, 32, 32, 3)
    assert rec["sample_stage0_attn"].shape == (8, 2, 4, 256, 2)
    assert rec["stage2_meta_share"].shape == (2, 12)

    # the view's trace of a test image from the stored weights is what the run recorded
    from vpeft_viz.analysis.hst import SideRecord, run_trace

    stored = SideRecord.from_artifacts(rec)
    again = run_trace(run.path, 3)
    t = again["trace"]
    assert again["pred"] == stored.preds[3] and again["label"] == stored.labels[3]
    for i in range(3):
        assert np.allclose(t.norms[i][0], stored.samples.norms[i][3], atol=1e-4)
        assert np.allclose(t.attn[i][0], stored.samples.attn[i][3], atol=2e-3)  # float16
    assert np.allclose(t.meta_norm[0], stored.samples.meta_norm[3], atol=1e-4)
    assert np.array_equal(t.images[0], stored.samples.images[3])


# -- the records the view reads --------------------------------------------------------------
def test_test_split_record(tiny_vit, tiny_loader):
    method = attached(tiny_vit)
    arts = method.artifacts(tiny_vit)
    assert np.allclose(arts["meta_param_norm"], arts["meta_init_norm"])
    assert np.all(arts["meta_shift_norm"] == 0)
    rec = measure_test_split(tiny_vit, tiny_loader, device=CPU)
    assert rec["labels"].shape == rec["preds"].shape == (16,)
    assert rec["sample_images"].dtype == np.uint8 and rec["sample_images"].shape == (8, 32, 32, 3)
    for i, (g, blocks, heads) in enumerate([(4, 1, 8), (2, 1, 12)]):
        attn = rec[f"sample_stage{i}_attn"].astype(np.float32)
        assert attn.shape == (8, blocks, heads, g * g, 2)
        assert np.allclose(attn.sum(-1), 1.0, atol=2e-3)
        assert rec[f"sample_stage{i}_norm"].shape == (8, g, g)
        assert rec[f"sample_stage{i}_pca"].shape == (8, g, g, 3)
        assert rec[f"stage{i}_mean_norm"].shape == (g, g)
        share = rec[f"stage{i}_meta_share"]
        assert share.shape == (blocks, heads) and np.all((share >= 0) & (share <= 1))

    # the per-layer norms are those of the blocks' outputs, computed independently
    x = next(iter(tiny_loader))[0]
    with torch.no_grad():
        t = tiny_vit.patch_embed(x)
        t = torch.cat([tiny_vit.cls_token.expand(8, -1, -1), t], 1) + tiny_vit.pos_embed
        meta, patch = [], []
        for blk in tiny_vit.blocks:
            t = blk.base_layer(torch.cat([blk.meta.expand(8, -1, -1), t], 1))
            meta.append(t[:, 0].norm(dim=-1))
            patch.append(t[:, 2:].norm(dim=-1).mean(1))
            t = t[:, 1:]
    assert np.allclose(rec["sample_meta_norm"], torch.stack(meta, 1).numpy(), atol=1e-5)
    assert np.allclose(rec["sample_patch_norm"], torch.stack(patch, 1).numpy(), atol=1e-5)


def test_pca_rgb_is_deterministic_and_scaled():
    rng = np.random.default_rng(0)
    tok = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    rgb = pca_rgb(tok)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.array_equal(rgb, pca_rgb(tok.copy()))
    perm = rng.permutation(8)  # the component signs follow the data, not the channel order
    assert np.allclose(pca_rgb(tok[..., perm]), rgb, atol=1e-5)


def test_hst_side_is_a_peft_module_with_its_own_batchnorms():
    layout = side_layout(depth=2, vit_grid=(4, 4), image=(32, 32))
    side = HSTSide(layout, vit_dim=48, in_chans=3)
    from vpeft_viz.methods import peft_modules

    names = [n for n, _ in peft_modules(side)]
    assert names == ["", "stages.0.embed.conv.1", "fc_norm"]
    assert copy.deepcopy(side).layout == layout
