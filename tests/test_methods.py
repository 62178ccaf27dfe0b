"""Contract tests for every registered PEFT method, parametrised over the registry.

A method registered later is tested here with no new test code: shapes, exactly which
parameters train, identity at init, merge equivalence, save/load round trip and config
validation run for every name in ``method_names()``. The few method-specific facts (LoRA's
q/v slices, SSF's init, AdaptFormer's input, VPT's sequence lengths) follow, and the exact
ViT-B/16 parameter counts each method declares (docs/methods.md) close the file.

Everything runs on random-init timm ViTs on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.config import ConfigError
from vpeft_viz.methods import (
    NotMergeableError,
    PeftMethod,
    PeftModule,
    UnknownMethodError,
    attach_method,
    count_parameters,
    create_method,
    get_method_class,
    head_parameters,
    method_names,
    trainable_state,
)
from vpeft_viz.methods._layers import vit_blocks

# Config overrides for the tiny test ViT (48 wide, 2 blocks, 17 tokens): for defaults that
# do not fit it (e.g. a channel count larger than the width, a budget larger than the model)
# or that would leave part of a method unexercised on it. Every method not listed runs with
# its defaults; the ViT-B counts below use their own overrides.
TINY_OVERRIDES: dict[str, dict] = {
    # A budget large enough that the tiny allocation also reaches LayerNorm vectors, so the
    # generic tests cover every module kind SPT inserts (default: only linears are tuned).
    "spt-lora": {"budget_fraction": 0.2},
    "spt-adapter": {"budget_fraction": 0.2},
    # G must divide the width: 16 sub-tokens of 3 (the default 32 fits 128 and 768, not 48).
    "velora": {"groups": 16},
}

# Exact trainable counts on vit_base_patch16_224, head excluded, as each method declares them
# (``vit_b_counts``: settings → count, documented in docs/methods.md). Every registered
# method must declare a count or say why it has none (``vit_b_uncounted``).
VIT_B_COUNTS: list[tuple[str, dict, int]] = [
    (name, dict(settings), count) for name in method_names()
    for settings, count in get_method_class(name).vit_b_counts]


def head_100(model: nn.Module) -> int:
    """A 100-class head on the features the model's head reads (``num_features``): 76,900 on
    ViT-B's 768; HST's head reads its side network's 72 features (7,300)."""
    return (model.num_features + 1) * 100


CPU = torch.device("cpu")
METHODS = method_names()


# -- helpers ---------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def images_for(model: VisionTransformer, n: int = 4, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def random_loader(img_size: int, num_classes: int, n: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, img_size, img_size, generator=g)
    labels = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=n)


def make_method(name: str, overrides: dict | None = None) -> PeftMethod:
    return create_method(name, {**TINY_OVERRIDES.get(name, {}), **(overrides or {})})


def attach(name: str, model: nn.Module, loader: DataLoader, overrides: dict | None = None,
           *, seed: int = 0) -> PeftMethod:
    """Create, prepare (when the method needs data) and attach; the model ends in eval mode."""
    method = make_method(name, overrides)
    if method.needs_data:
        method.prepare(model, loader, device=CPU)
    torch.manual_seed(seed)
    attach_method(model, method)
    model.eval()
    return method


def method_params(method: PeftMethod, model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in method.trainable_parameters(model)]


def perturb(params, std: float = 0.05, seed: int = 0) -> None:
    """Add N(0, std²) noise so a test cannot pass by sitting at the (zero-delta) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- contract tests, one per registered method ------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_output_shapes(name, tiny_vit, tiny_loader):
    attach(name, tiny_vit, tiny_loader)
    x = images_for(tiny_vit)
    for train in (True, False):
        tiny_vit.train(train)
        with torch.no_grad():
            out = tiny_vit(x)
        assert out.shape == (x.shape[0], tiny_vit.num_classes), f"train={train}"
        assert torch.isfinite(out).all(), f"train={train}"


@pytest.mark.parametrize("name", METHODS)
def test_only_method_params_and_head_train(name, tiny_vit, tiny_loader):
    method = attach(name, tiny_vit, tiny_loader)
    head = {id(p) for p in head_parameters(tiny_vit)}
    own = {id(p) for p in method_params(method, tiny_vit)}
    assert head and not head & own, "the head is trained but never counted as the method's"
    names = {id(p): n for n, p in tiny_vit.named_parameters()}
    trainable = {id(p) for p in tiny_vit.parameters() if p.requires_grad}
    assert trainable == own | head, (
        f"trainable but not the method's: {sorted(names[i] for i in trainable - own - head)}; "
        f"the method's but frozen: {sorted(names[i] for i in (own | head) - trainable)}")
    if name == "linear":
        assert trainable == head
    if name == "full":
        assert trainable == set(names)

    tiny_vit.train()
    x = images_for(tiny_vit)
    y = torch.arange(x.shape[0]) % tiny_vit.num_classes
    loss, out = method.training_loss(tiny_vit, x, y, nn.CrossEntropyLoss())
    assert out.shape == (x.shape[0], tiny_vit.num_classes)
    loss.backward()
    for n, p in tiny_vit.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but gets no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name, tiny_vit, tiny_loader):
    x = images_for(tiny_vit)
    before = logits(copy.deepcopy(tiny_vit), x)
    method = attach(name, tiny_vit, tiny_loader)
    diff = max_diff(logits(tiny_vit, x), before)
    if method.identity_at_init:
        assert diff < 1e-5
    else:  # a method that declares it changes the function should really change it
        assert diff > 1e-6, f"{name} says it is not the identity at init, but it is"


@pytest.mark.parametrize("pool", ["token", "avg"])  # avg: `norm` is an Identity, fc_norm not
@pytest.mark.parametrize("name", METHODS)
def test_merge(name, pool, make_tiny_vit, tiny_loader):
    tiny_vit = make_tiny_vit(global_pool=pool)
    plain = copy.deepcopy(tiny_vit)
    method = attach(name, tiny_vit, tiny_loader)
    perturb(method_params(method, tiny_vit))
    x = images_for(tiny_vit)
    if not method.mergeable:
        with pytest.raises(NotMergeableError):
            method.merge(copy.deepcopy(tiny_vit))
        return
    expected = logits(tiny_vit, x)
    merged = method.merge(copy.deepcopy(tiny_vit))
    assert max_diff(logits(merged, x), expected) < 1e-4

    assert not any(isinstance(m, PeftModule) for m in merged.modules())
    foreign = {type(m) for m in merged.modules()} - {type(m) for m in plain.modules()}
    assert not foreign, f"merged model holds modules a plain timm ViT has not: {foreign}"
    # A plain timm model of the same architecture takes the merged weights as they are.
    plain.load_state_dict(merged.state_dict(), strict=True)
    assert max_diff(logits(plain, x), expected) < 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tiny_vit, tiny_loader, tmp_path):
    backbone = copy.deepcopy(tiny_vit)
    method = attach(name, tiny_vit, tiny_loader)
    perturb(method_params(method, tiny_vit) + head_parameters(tiny_vit))
    x = images_for(tiny_vit)
    expected = logits(tiny_vit, x)

    save_file(trainable_state(tiny_vit), tmp_path / "trainable.safetensors")
    (tmp_path / "state.json").write_text(json.dumps(method.state()))
    (tmp_path / "config.json").write_text(json.dumps(method.config.to_dict()))

    loaded = load_file(tmp_path / "trainable.safetensors")
    method2 = create_method(name, json.loads((tmp_path / "config.json").read_text()))
    assert method2.config == method.config
    method2.load_state(json.loads((tmp_path / "state.json").read_text()))
    torch.manual_seed(1234)  # a different init, so only loading can give the same logits
    attach_method(backbone, method2)
    result = backbone.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys
    assert set(trainable_state(backbone)) == set(loaded), "trainable keys differ after load"
    assert set(result.missing_keys).isdisjoint(loaded)
    assert max_diff(logits(backbone, x), expected) < 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_config_validation(name):
    cls = get_method_class(name)
    assert cls.name == name and cls.Config.prefix == name
    assert cls.title and cls.summary, "menus need a title and a one-line summary"
    cls.Config()  # the defaults are valid
    for spec in cls.Config.field_specs():
        where = f"{name}.{spec.name}"
        assert spec.help.strip(), f"{where} has no help text"
        bad = []
        if spec.min is not None:
            bad.append(math.floor(spec.min) - 1 if spec.type is int else spec.min - 1.0)
        if spec.max is not None:
            bad.append(math.floor(spec.max) + 1 if spec.type is int else spec.max + 1.0)
        if spec.choices is not None:
            bad.append("not-a-choice" if spec.type is str else max(spec.choices) + 1)
        for value in bad:
            with pytest.raises(ConfigError, match=f"{name}\\.{spec.name}"):
                cls.Config.from_dict({spec.name: value})
            with pytest.raises(ConfigError, match=f"{name}\\.{spec.name}"):
                create_method(name, {spec.name: value})
        if spec.type in (int, float, bool):
            with pytest.raises(ConfigError, match=f"{name}\\.{spec.name}"):
                cls.Config.from_strings({spec.name: "abc"})
    with pytest.raises(ConfigError, match="no_such_setting"):
        cls.Config.from_dict({"no_such_setting": 1})
    with pytest.raises(ConfigError, match="no_such_setting"):
        cls.Config.from_strings({"no_such_setting": "1"})


def test_unknown_method_name():
    with pytest.raises(UnknownMethodError, match="no-such-method"):
        create_method("no-such-method")


# -- method-specific facts -------------------------------------------------------------------
@pytest.mark.parametrize(("targets", "changed"), [("qv", "qv"), ("qkv", "qkv")])
def test_lora_touches_only_target_slices(targets, changed, tiny_vit, tiny_loader):
    method = attach("lora", tiny_vit, tiny_loader, {"targets": targets})
    perturb(method_params(method, tiny_vit))
    qkv = vit_blocks(tiny_vit)[0].attn.qkv
    x = torch.randn(2, 17, tiny_vit.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = qkv(x).chunk(3, dim=-1)
        base = qkv.base_layer(x).chunk(3, dim=-1)
    for part, a, b in zip("qkv", adapted, base):
        if part in changed:
            assert max_diff(a, b) > 1e-3, f"{part} slice not adapted"
        else:
            assert torch.equal(a, b), f"{part} slice changed"


def test_ssf_init_statistics(vit_b):
    model = copy.deepcopy(vit_b)
    method = create_method("ssf")
    attach_method(model, method)
    art = method.artifacts(model)
    scale = torch.cat([torch.as_tensor(v) for k, v in art.items() if k.startswith("scale/")])
    shift = torch.cat([torch.as_tensor(v) for k, v in art.items() if k.startswith("shift/")])
    assert scale.numel() == shift.numel() == 205_824 // 2
    assert abs(scale.mean().item() - 1.0) < 1e-3 and abs(scale.std().item() - 0.02) < 1e-3
    assert abs(shift.mean().item()) < 1e-3 and abs(shift.std().item() - 0.02) < 1e-3
    # every site draws its own factors
    assert not torch.equal(torch.as_tensor(art["scale/blocks.0.norm1"]),
                           torch.as_tensor(art["scale/blocks.1.norm1"]))


def test_ssf_zero_std_is_identity(tiny_vit, tiny_loader):
    x = images_for(tiny_vit)
    before = logits(copy.deepcopy(tiny_vit), x)
    attach("ssf", tiny_vit, tiny_loader, {"init_std": 0.0})
    assert max_diff(logits(tiny_vit, x), before) < 1e-6


@pytest.mark.parametrize("overrides, site", [
    ({"qkv_bias": False}, "attn.qkv"),      # the shift would need a bias qkv lacks
    ({"final_norm": False}, "norm"),        # SSF after an Identity: nothing to fold into
])
def test_ssf_merge_refuses_sites_without_a_bias(overrides, site, make_tiny_vit, tiny_loader):
    model = make_tiny_vit(**overrides)
    attach("ssf", model, tiny_loader)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match=site):
        create_method("ssf").merge(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused merge changed weights"


def test_adaptformer_reads_unnormalised_residual(tiny_vit, tiny_loader):
    method = attach("adaptformer", tiny_vit, tiny_loader)
    assert method.config.scale == 0.1
    perturb(method_params(method, tiny_vit), std=0.2)
    wrapper = tiny_vit.blocks[0]
    block, adapter = wrapper.base_layer, wrapper.adapter
    x = torch.randn(2, 17, tiny_vit.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))  # the post-attention stream
        down = torch.relu(h @ adapter.down.weight.T + adapter.down.bias)
        branch = down @ adapter.up.weight.T + adapter.up.bias
        expected = h + block.mlp(block.norm2(h)) + 0.1 * branch
        assert max_diff(wrapper(x), expected) < 1e-5
        assert max_diff(block(x), expected) > 1e-3  # the adapter really contributes


@pytest.mark.parametrize("name", ["vpt-shallow", "vpt-deep"])
def test_vpt_sequence_lengths(name, tiny_vit, tiny_loader):
    method = attach(name, tiny_vit, tiny_loader)
    p, n_prefix = method.config.num_tokens, tiny_vit.num_prefix_tokens
    x = images_for(tiny_vit, n=2)
    n_tokens = tiny_vit.patch_embed.num_patches + n_prefix
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hooks = [b.norm1.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
             for b in vit_blocks(tiny_vit)]
    hooks += [b.register_forward_hook(lambda _m, _a, o: outputs.append(o))
              for b in tiny_vit.blocks]
    with torch.no_grad():
        features = tiny_vit.forward_features(x)
    for h in hooks:
        h.remove()

    assert [t.shape[1] for t in inputs] == [n_tokens + p] * len(tiny_vit.blocks)
    assert [t.shape[1] for t in outputs[:-1]] == [n_tokens + p] * (len(outputs) - 1)
    assert outputs[-1].shape[1] == n_tokens and features.shape[1] == n_tokens
    slots = slice(n_prefix, n_prefix + p)
    for i, (inp, wrapper) in enumerate(zip(inputs, tiny_vit.blocks)):
        prompts = wrapper.prompts
        if prompts is not None:  # the block's own prompts replace whatever was in the slots
            assert torch.equal(inp[:, slots], prompts.expand(x.shape[0], -1, -1))
        else:  # VPT-shallow: later blocks carry the previous block's outputs at the slots
            assert name == "vpt-shallow" and i > 0
            assert torch.equal(inp[:, slots], outputs[i - 1][:, slots])
        if i > 0:  # image tokens always come from the previous block
            assert torch.equal(inp[:, n_prefix + p:], outputs[i - 1][:, n_prefix + p:])
    assert (sum(w.prompts is not None for w in tiny_vit.blocks)
            == (len(tiny_vit.blocks) if name == "vpt-deep" else 1))


# -- exact counts on ViT-B/16 ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b() -> VisionTransformer:
    """vit_base_patch16_224, random init, no head; built once, deep-copied per test."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()


def test_every_method_declares_its_vit_b_count():
    for name in METHODS:
        cls = get_method_class(name)
        assert bool(cls.vit_b_counts) != bool(cls.vit_b_uncounted), (
            f"{name}: declare vit_b_counts (settings, exact count on vit_base_patch16_224) "
            "or, only when the count depends on data, a reason in vit_b_uncounted")


@pytest.mark.parametrize(("name", "overrides", "expected"), VIT_B_COUNTS,
                         ids=[row[0] for row in VIT_B_COUNTS])
def test_vit_b_counts(name, overrides, expected, vit_b):
    model = copy.deepcopy(vit_b)
    method = create_method(name, overrides)
    if method.needs_data:
        method.prepare(model, random_loader(224, 10), device=CPU)
    attach_method(model, method)
    counts = count_parameters(model, method)
    assert counts["trainable_excl_head"] == expected
    assert counts["trainable"] == expected  # no head
    model.reset_classifier(100)
    with_head = count_parameters(model, method)
    assert with_head["trainable_excl_head"] == expected
    assert with_head["trainable"] == expected + head_100(model)
    assert with_head["total"] == counts["total"] + head_100(model)
