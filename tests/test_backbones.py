"""Backbones: local checkpoints offline, clear errors, attention maps, the embedded default."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vpeft_viz.backbones import (
    EMBEDDED_ARCH,
    EMBEDDED_BACKBONE,
    EMBEDDED_WEIGHTS,
    BackboneError,
    create_backbone,
    load_weights,
)
from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.probes.attention import attention_maps

SMALL = "vit_tiny_patch16_224"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    src = create_backbone(SMALL, pretrained=False, num_classes=7)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(_state(src), str(path))
    else:  # a torch file wrapped the way training scripts often save it
        torch.save({"model": _state(src)}, path)
    dst = create_backbone(SMALL, checkpoint=path, num_classes=3)
    for k, v in _state(src).items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.head.out_features == 3  # the head is fresh, never taken from the file


def test_checkpoint_errors(tmp_path):
    with pytest.raises(BackboneError, match="checkpoint file not found"):
        create_backbone(SMALL, checkpoint=tmp_path / "nope.safetensors")
    other = create_backbone("vit_small_patch16_224", pretrained=False)
    path = tmp_path / "small.safetensors"
    save_file(_state(other), str(path))
    with pytest.raises(BackboneError, match="shape"):
        create_backbone(SMALL, checkpoint=path)
    bad = tmp_path / "partial.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 192)}, str(bad))
    with pytest.raises(BackboneError, match="missing"):
        load_weights(create_backbone(SMALL, pretrained=False), bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="cannot read checkpoint"):
        create_backbone(SMALL, checkpoint=junk)


def test_unknown_and_non_vit_models():
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone("vit_does_not_exist")
    with pytest.raises(BackboneError, match="only timm ViTs"):
        create_backbone("resnet18", pretrained=False)


def test_hub_download_failure_is_clear(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):  # what timm raises when the hub is unreachable
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError, match="could not download pretrained weights.*offline"):
        create_backbone(SMALL, pretrained=True)


def test_embedded_default_architecture():
    model = create_backbone(pretrained=False, num_classes=10)
    assert model.patch_embed.img_size == (32, 32)
    assert model.embed_dim == EMBEDDED_ARCH["embed_dim"] and len(model.blocks) == 6
    assert model.patch_embed.num_patches == 64
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(not EMBEDDED_WEIGHTS.exists(), reason="embedded weights not generated")
def test_embedded_weights_load_and_differ_from_random():
    a = create_backbone(num_classes=0)
    b = create_backbone(pretrained=False, num_classes=0)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert EMBEDDED_WEIGHTS.stat().st_size <= 10 * 2**20
    assert EMBEDDED_BACKBONE in str(EMBEDDED_WEIGHTS)


@pytest.mark.parametrize("method", [None, "lora", "adaptformer"])
def test_attention_maps(tiny_vit, method):
    if method:
        attach_method(tiny_vit, create_method(method))
    x = torch.rand(3, 3, 32, 32)
    fused_before = [m.attn.fused_attn if hasattr(m, "attn") else m.base_layer.attn.fused_attn
                    for m in tiny_vit.blocks]
    maps = attention_maps(tiny_vit, x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, 17))
    fused_after = [m.attn.fused_attn if hasattr(m, "attn") else m.base_layer.attn.fused_attn
                   for m in tiny_vit.blocks]
    assert fused_before == fused_after
    # the maps are the ones the model computes: logits are unchanged by the hooks
    with torch.no_grad():
        assert torch.allclose(tiny_vit(x), tiny_vit(x))


# -- which weights a run started from ---------------------------------------------------
def test_runs_record_their_backbone_weights_and_refuse_others(vtab_task, tmp_path):
    """A run's stored weights only reproduce it on the same frozen backbone: the run records
    the fingerprint of the weights it started from, and rebuilding it on changed weights
    fails with a message naming both, instead of silently giving another model."""
    from safetensors.torch import load_file

    from vpeft_viz.backbones import weights_fingerprint
    from vpeft_viz.runs.execute import execute_run, make_run_config
    from vpeft_viz.runs.store import RunStore, RunStoreError
    from vpeft_viz.runs.weights import load_run_model

    ckpt = tmp_path / "backbone.safetensors"
    state = load_file(str(EMBEDDED_WEIGHTS))
    save_file(state, str(ckpt))
    cfg = make_run_config(method="lora", data=str(vtab_task), checkpoint=str(ckpt),
                          train={"epochs": 1, "batch_size": 8, "warmup_epochs": 0})
    assert cfg["backbone"]["weights"] == weights_fingerprint(ckpt)
    run = RunStore(tmp_path / "store").create(cfg)
    execute_run(run)
    load_run_model(run)  # same weights: fine
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"] * 1.01
    save_file(state, str(ckpt))
    with pytest.raises(RunStoreError, match="was trained on backbone weights sha256:"):
        load_run_model(run)
    ckpt.unlink()
    with pytest.raises(RunStoreError, match="checkpoint file not found"):
        load_run_model(run)


def test_runs_from_before_the_record_read_as_the_first_embedded_weights(vtab_task):
    from vpeft_viz.backbones import weights_fingerprint
    from vpeft_viz.runs.execute import make_run_config
    from vpeft_viz.runs.recipe import config_hash, same_recipe
    from vpeft_viz.weights import EMBEDDED_WEIGHTS_V1, recorded_weights_id

    cfg = make_run_config(method="lora", data=str(vtab_task))
    assert cfg["backbone"]["weights"] == weights_fingerprint(EMBEDDED_WEIGHTS)
    old = {**cfg, "backbone": {k: v for k, v in cfg["backbone"].items() if k != "weights"}}
    assert recorded_weights_id(old["backbone"]) == EMBEDDED_WEIGHTS_V1
    # an old run is the same experiment exactly while the shipped weights are the first ones
    assert same_recipe(old, cfg) == (weights_fingerprint(EMBEDDED_WEIGHTS) == EMBEDDED_WEIGHTS_V1)
    other = {**cfg, "backbone": {**cfg["backbone"], "weights": "sha256:0000000000000000"}}
    assert not same_recipe(other, cfg) and config_hash(other) != config_hash(cfg)
    random = make_run_config(method="lora", data=str(vtab_task), pretrained=False)
    assert random["backbone"]["weights"] is None
