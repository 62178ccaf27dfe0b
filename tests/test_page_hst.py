"""AppTest of the HST view page with small real HST runs of a tiny ViT (real side-network
records measured on random images) in the user store; the empty-store check is
tests/test_registry.py's, for every view page."""

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

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "10_HST.py")
TIMEOUT = 180
CLASSES = ["a", "b", "c", "d"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_run(store: run_stores.RunStore, task: str, seed: int, *, depth: int = 3,
              settings: dict | None = None) -> run_stores.Run:
    """A finished HST run on a tiny ViT with its real record (no weights stored)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth,
                              num_heads=2, num_classes=4).eval()
    method = create_method("hst", settings)
    attach_method(model, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            blk.meta.add_(torch.randn(blk.meta.shape, generator=g))  # "trained" tokens
    loader = DataLoader(TensorDataset(torch.rand(12, 3, 32, 32, generator=g),
                                      torch.arange(12) % 4), batch_size=5)
    cfg = make_run_config(method="hst", data=f"embedded:{task}",
                          method_config=method.config.to_dict(),
                          train={"epochs": 1, "seed": seed})
    run = store.create(cfg)
    arts = method.artifacts(model)
    arts.update(method.test_artifacts(model, loader, device=torch.device("cpu")))
    run.save_artifact("method.npz", {k: np.asarray(v) for k, v in arts.items()})
    run.save_artifact("eval.json", {"class_names": CLASSES})
    run.write_summary({"run_id": run.id, "test_acc": 0.5, "val_acc": 0.5,
                       "trainable_params_excl_head": method.num_trainable(model),
                       "device": "cpu"})
    run.set_status("done")
    return run


@pytest.fixture
def with_runs(stores: Path) -> Path:
    user = run_stores.RunStore(stores / "user")
    write_run(user, "count", 0)
    write_run(user, "digits", 1, depth=2, settings={"meta_tokens": 2})
    return stores


def test_hst_page_with_runs(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="hst-run")
    assert len(runs.options) == 2 and all("hst" in o for o in runs.options)
    assert [m.label for m in at.metric] == ["test accuracy", "trainable (no head)",
                                            "side stages", "attention on the meta token"]
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # maps, mean maps, meta norms, attention maps, shares
    assert "no stored weights" in text(at)  # the trace-again panel says why it cannot

    at.selectbox(key="hst-image").set_value(5).run()
    assert not at.exception
    at.selectbox(key="hst-stage").set_value(2).run()
    assert not at.exception
    at.selectbox(key="hst-head-2").set_value(3).run()
    assert not at.exception
    at.selectbox(key="hst-attn-image").set_value(7).run()
    assert not at.exception

    runs = at.selectbox(key="hst-run")
    at = runs.set_value(next(o for o in runs.options if "digits" in o)).run()
    assert not at.exception
    assert at.selectbox(key="hst-stage").options == ["stage 1 · 4×4 · 64 wide",
                                                     "stage 2 · 2×2 · 72 wide"]
    assert "equal split: 67%" in [m.delta for m in at.metric][3]  # two meta tokens + global


def test_unusable_record_gives_an_error(with_runs):
    user = run_stores.RunStore(with_runs / "user")
    bad = next(r for r in user.list() if "count" in r.id)
    bad.save_artifact("method.npz", {"unrelated": np.zeros(3)})
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    runs = at.selectbox(key="hst-run")
    at = runs.set_value(next(o for o in runs.options if bad.id in o)).run()
    assert not at.exception
    assert any(f"Run {bad.id} has no usable HST side-network record" in e.value
               for e in at.error)


def test_trace_another_image_from_the_weights(stores, vtab_task):
    """A real (short) HST run with its weights: the page rebuilds it and traces test image 8,
    which the run did not store."""
    from vpeft_viz.runs.execute import execute_run

    cfg = make_run_config(method="hst", data=str(vtab_task), pretrained=False,
                          train={"epochs": 1, "batch_size": 8})
    run = run_stores.RunStore(stores / "user").create(cfg)
    execute_run(run)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert at.number_input(key="hst-trace-index").value == 8
    at = at.toggle(key="hst-trace").set_value(True).run()
    assert not at.exception, at.exception
    assert "Test image 8:" in text(at)
    assert len(at.get("plotly_chart")) == 6


def test_page_on_the_shipped_cached_runs(stores, monkeypatch):
    """The real cached_runs/ store: one HST run per cached task, read from their records
    (their weights are over the shipping limit, which the trace panel says)."""
    monkeypatch.setattr(run_stores, "CACHED_STORE", run_stores.REPO_ROOT / "cached_runs")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="hst-run").options
    assert len(runs) == 3 and all("shipped" in r for r in runs)
    assert at.selectbox(key="hst-stage").options == ["stage 1 · 16×16 · 48 wide",
                                                     "stage 2 · 8×8 · 64 wide",
                                                     "stage 3 · 4×4 · 72 wide"]
    assert len(at.get("plotly_chart")) == 5 and not at.error
    assert "no stored weights" in text(at)
