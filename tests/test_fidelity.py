"""Defaults that follow the released code (docs/methods.md, "deviations from the released
code"): what ``methods --json`` shows, and VPT's prompt count and dropout in a forward pass.

SPT's released defaults (sensitivity head and drop-path, LayerNorm entries, DropPath on
structured modules, proj's un-dropped input, the adapter placement) are tested with the
rest of SPT in ``tests/test_spt.py``.
"""

from __future__ import annotations

import json

import torch
from timm.models.vision_transformer import VisionTransformer

from vpeft_viz.cli import main
from vpeft_viz.methods import attach_method, count_parameters, create_method


def _methods_json(capsys) -> dict[str, dict]:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {r["name"]: r["config"] for r in rows}


def test_methods_json_shows_the_released_defaults(capsys):
    configs = _methods_json(capsys)
    for vpt in ("vpt-shallow", "vpt-deep"):
        assert configs[vpt]["num_tokens"] == 10 and configs[vpt]["dropout"] == 0.0
    for spt in ("spt-lora", "spt-adapter"):
        c = configs[spt]
        assert (c["drop_path"], c["sensitivity_drop_path"], c["sparse_layernorm"]) == \
            (0.1, 0.1, False)
        assert c["dropout"] == 0.1
    assert configs["spt-adapter"]["proj_adapter"] == "parallel-input"
    assert "proj_adapter" not in configs["spt-lora"]
    assert configs["sct"]["scale"] == 1.0


def test_vpt_defaults_ten_prompts_without_dropout():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              num_classes=3)
    method = create_method("vpt-deep")
    attach_method(model, method)
    assert count_parameters(model, method)["trainable_excl_head"] == 2 * 10 * 48
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].base_layer.norm1.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0]))
    model.train()  # dropout would act here; the default rate is 0
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    hook.remove()
    prompts = model.blocks[0].prompts
    assert seen[0].shape[1] == 1 + 16 + 10
    assert torch.equal(seen[0][:, 1:11], prompts.expand(2, -1, -1))
