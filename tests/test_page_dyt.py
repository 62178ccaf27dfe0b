"""AppTest of the DyT view page: with no runs, and with small real DyT runs of a tiny ViT
(real masks, FLOPs and attention measured on random images) next to full fine-tuning and
AdaptFormer runs of the same task, in the user store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import page_text as text
from streamlit.testing.v1 import AppTest
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

import vpeft_viz.runs as run_stores
from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.runs.execute import make_run_config

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "6_DyT.py")
TIMEOUT = 180
CLASSES = ["a", "b", "c", "d"]


def write_run(store: run_stores.RunStore, method: str, task: str, seed: int,
              overrides: dict | None = None, test_acc: float = 0.5) -> run_stores.Run:
    """A finished run on a tiny ViT; a DyT run gets its real test-split measurements."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              num_classes=4).eval()
    method_obj = create_method(method, overrides)
    attach_method(model, method_obj)
    cfg = make_run_config(method=method, data=f"embedded:{task}",
                          method_config=method_obj.config.to_dict(),
                          train={"epochs": 1, "seed": seed})
    run = store.create(cfg)
    if method == "dyt":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for b in model.blocks:
                b.dispatcher.weight.normal_(0, 0.5, generator=g)
        loader = DataLoader(TensorDataset(torch.rand(24, 3, 32, 32, generator=g),
                                          torch.arange(24) % 4), batch_size=8)
        run.save_artifact("method.npz", {k: np.asarray(v) for k, v in method_obj.test_artifacts(
            model, loader, device=torch.device("cpu")).items()})
    run.save_artifact("eval.json", {"class_names": CLASSES})
    run.write_summary({"run_id": run.id, "test_acc": test_acc, "val_acc": test_acc,
                       "flops_per_image": 4_000_000, "device": "cpu"})
    run.set_status("done")
    return run


@pytest.fixture
def with_runs(stores: Path) -> Path:
    user = run_stores.RunStore(stores / "user")
    write_run(user, "dyt", "count", 0, {"r": 0.5}, test_acc=0.6)
    write_run(user, "dyt", "count", 1, {"r": 0.3}, test_acc=0.55)
    write_run(user, "dyt", "digits", 0)
    write_run(user, "full", "count", 0, test_acc=0.7)
    write_run(user, "adaptformer", "count", 0, test_acc=0.65)
    return stores


# The page on an empty store: tests/test_registry.py, for every view page.


def test_dyt_page_with_runs(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="dyt-run")
    assert len(runs.options) == 3 and all("dyt" in o for o in runs.options)
    assert [m.label for m in at.metric] == ["test accuracy", "tokens through the MLPs",
                                            "FLOPs per image", "latency, batch 1"]
    charts = at.get("plotly_chart")
    assert len(charts) >= 9  # masks, 3 rate views, map, histogram, sweep, overlap, agreement
    body = text(at)
    assert "Only one target rate" not in body  # count has r = 0.3 and 0.5
    sweep = [c for c in charts if "target rate r" in c.proto.spec]
    assert sweep and "adaptformer" in sweep[0].proto.spec and "full" in sweep[0].proto.spec

    at.selectbox(key="dyt-image").set_value(3).run()
    assert not at.exception
    at.selectbox(key="dyt-attn-image").set_value(5).run()
    assert not at.exception

    runs = at.selectbox(key="dyt-run")
    at = runs.set_value(next(o for o in runs.options if "digits" in o)).run()
    assert not at.exception
    body = text(at)
    assert "Only one target rate on digits" in body
    assert "No full fine-tuning or AdaptFormer run on digits" in body


def test_unusable_record_gives_an_error(with_runs):
    user = run_stores.RunStore(with_runs / "user")
    bad = next(r for r in user.list() if r.config["method"] == "dyt")
    bad.save_artifact("method.npz", {"unrelated": np.zeros(3)})
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    runs = at.selectbox(key="dyt-run")
    at = runs.set_value(next(o for o in runs.options if bad.id in o)).run()
    assert not at.exception
    assert any(f"Run {bad.id} has no usable token record" in e.value for e in at.error)
