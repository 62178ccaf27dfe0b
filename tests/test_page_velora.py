"""AppTest of the VeLoRA view page with small real VeLoRA runs of a tiny ViT (memory and
gradient records from real training steps) at three G, next to LoRA runs of the same task,
in the user store. The page on an empty store: tests/test_registry.py."""

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
from vpeft_viz.train import TrainConfig, fit

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "9_VeLoRA.py")
TIMEOUT = 180

pytestmark = pytest.mark.usefixtures("one_thread")


def write_run(store: run_stores.RunStore, method: str, task: str, seed: int,
              overrides: dict | None = None, test_acc: float = 0.5) -> run_stores.Run:
    """A finished run on a tiny ViT; a VeLoRA run trains 2 epochs for its real records."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              num_classes=4)
    method_obj = create_method(method, overrides)
    attach_method(model, method_obj)
    cfg = make_run_config(method=method, data=f"embedded:{task}",
                          method_config=method_obj.config.to_dict(),
                          train={"epochs": 1, "seed": seed})
    run = store.create(cfg)
    if method == "velora":
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(TensorDataset(torch.rand(32, 3, 32, 32, generator=g),
                                          torch.arange(32) % 4), batch_size=8)
        fit(model, method_obj, loader, loader, 4, TrainConfig(epochs=2, device="cpu"))
        run.save_artifact("method.npz", {k: np.asarray(v) for k, v in
                                         method_obj.artifacts(model).items()})
    run.write_summary({"run_id": run.id, "test_acc": test_acc, "val_acc": test_acc,
                       "device": "cpu"})
    run.set_status("done")
    return run


@pytest.fixture
def with_runs(stores: Path) -> Path:
    user = run_stores.RunStore(stores / "user")
    write_run(user, "velora", "count", 0, {"groups": 16}, test_acc=0.6)
    write_run(user, "velora", "count", 0, {"groups": 4}, test_acc=0.55)
    write_run(user, "velora", "count", 0, {"groups": 48}, test_acc=0.62)
    write_run(user, "velora", "digits", 0, {"groups": 16})
    write_run(user, "lora", "count", 0, test_acc=0.64)
    write_run(user, "lora", "count", 1, test_acc=0.60)
    return stores


def test_velora_page_with_runs(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="velora-run")
    assert len(runs.options) == 4 and all("velora" in o for o in runs.options)
    assert [m.label for m in at.metric] == ["test accuracy", "kept for backward, one step",
                                            "down-projection inputs kept",
                                            "allocator peak of the step"]
    assert "vs LoRA" in at.metric[1].delta
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # sweep, cosine map, cosine lines, breakdown
    sweep = charts[0].proto.spec
    assert "G=4" in sweep and "G=16" in sweep and "G=48" in sweep and "LoRA (2 runs)" in sweep
    body = text(at)
    assert "Only one G" not in body and "No LoRA run" not in body
    assert "Measured on CUDA only" in str(at.metric[3].help)

    at.radio(key="velora-target").set_value("v").run()
    assert not at.exception

    runs = at.selectbox(key="velora-run")
    at = runs.set_value(next(o for o in runs.options if "digits" in o)).run()
    assert not at.exception
    body = text(at)
    assert "Only one G on digits" in body and "No LoRA run on digits" in body


def test_unusable_record_gives_an_error(with_runs):
    user = run_stores.RunStore(with_runs / "user")
    bad = next(r for r in user.list() if r.config["method"] == "velora")
    bad.save_artifact("method.npz", {"unrelated": np.zeros(3)})
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    runs = at.selectbox(key="velora-run")
    at = runs.set_value(next(o for o in runs.options if bad.id in o)).run()
    assert not at.exception
    assert any(f"Run {bad.id} has no usable VeLoRA record" in e.value for e in at.error)


def test_page_on_the_shipped_cached_runs(stores, monkeypatch):
    """The real cached_runs/ store: VeLoRA on every cached task at G = 32 and on digits at
    G = 8 and 128 too; LoRA's shipped runs are the reference. The shipped records show
    VeLoRA keeping fewer bytes than LoRA (the issue's done-when)."""
    monkeypatch.setattr(run_stores, "CACHED_STORE", run_stores.REPO_ROOT / "cached_runs")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="velora-run")
    assert len(runs.options) >= 5 and all("shipped" in r for r in runs.options)
    digits = next(o for o in runs.options if "digits-velora-s0" in o)
    at = runs.set_value(digits).run()
    assert not at.exception and not at.error
    assert "% vs LoRA" in at.metric[1].delta and at.metric[1].delta.startswith("-")
    sweep = at.get("plotly_chart")[0].proto.spec
    assert all(f"G={g}" in sweep for g in (8, 32, 128)) and "LoRA (2 runs)" in sweep
    assert "Only one G" not in text(at)
