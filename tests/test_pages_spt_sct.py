"""AppTest of the SPT and SCT view pages: with no runs at all, and with synthetic runs of a
tiny ViT (real prepare, real artifacts) in the user store; the live budget slider, an
unreachable budget, the matrix image, two tasks, and launching a run of a chosen budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

import vpeft_viz.runs as run_stores
from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.runs.execute import make_run_config

PAGES = Path(__file__).resolve().parents[1] / "pages"
TIMEOUT = 180  # the first run imports torch, timm and plotly


def write_run(store: run_stores.RunStore, method: str, task: str, seed: int,
              overrides: dict | None = None) -> run_stores.Run:
    """A finished run of ``method`` on a tiny ViT, with the method's real state and
    artifacts (random images; the numbers mean nothing)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              num_classes=4).eval()
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(torch.rand(24, 3, 32, 32, generator=g),
                                      torch.arange(24) % 4), batch_size=8)
    method_obj = create_method(method, overrides)
    method_obj.prepare(model, loader, device=torch.device("cpu"))
    attach_method(model, method_obj)
    cfg = make_run_config(method=method, data=f"embedded:{task}",
                          method_config=method_obj.config.to_dict(),
                          train={"epochs": 1, "seed": seed})
    run = store.create(cfg)
    run.write_method_state(method_obj.state())
    run.save_artifact("method.npz", {k: np.asarray(v)
                                     for k, v in method_obj.artifacts(model).items()})
    run.write_summary({"run_id": run.id, "test_acc": 0.5, "val_acc": 0.5})
    run.set_status("done")
    return run


@pytest.fixture
def with_runs(stores: Path) -> Path:
    user = run_stores.RunStore(stores / "user")
    spt = {"budget_fraction": 0.1, "sensitivity_batches": 2, "sensitivity_batch_size": 8}
    for task, seed in (("digits", 0), ("count", 1)):
        write_run(user, "spt-lora", task, seed, spt)
        write_run(user, "sct", task, seed)
    write_run(user, "spt-adapter", "digits", 2, spt)
    write_run(user, "lora", "digits", 0)  # other methods are not listed
    return stores


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / name), default_timeout=TIMEOUT).run()


def text(at: AppTest) -> str:
    kinds = ("markdown", "caption", "info", "warning", "success", "error")
    return "\n".join(str(e.value) for k in kinds for e in getattr(at, k))


def test_spt_page_with_runs(with_runs):
    at = page("4_SPT.py")
    assert not at.exception
    labels = at.selectbox(key="spt-run").options
    assert len(labels) == 3 and all("spt-" in s for s in labels)
    assert [m.label for m in at.metric][:2] == ["budget used", "structured matrices"]
    charts = at.get("plotly_chart")
    assert len(charts) >= 5

    at.number_input(key="spt-typed").set_value(1).run()  # below the CLS token alone
    assert not at.exception
    assert any("not reachable within 2%: the nearest reachable budget is 48" in w.value
               for w in at.warning)
    slider = at.select_slider(key="spt-budget")
    at.number_input(key="spt-typed").set_value(None)
    slider.set_value(slider.options[len(slider.options) // 2]).run()
    assert not at.exception and at.success

    at.selectbox(key="spt-matrix").set_value("blocks.1.mlp.fc2.weight").run()
    assert not at.exception
    at.toggle(key="spt-same").set_value(True).run()
    assert not at.exception
    assert any("Structured matrices shared" in c.value for c in at.caption)


def test_spt_page_launches_the_chosen_budget(with_runs):
    at = page("4_SPT.py")
    at.number_input(key="spt-typed").set_value(3000).run()
    assert not at.exception
    before = {r.id for r in run_stores.user_store().list()}
    at.button(key="spt-launch").click().run()
    assert not at.exception
    new = [r for r in run_stores.user_store().list() if r.id not in before]
    assert len(new) == 1 and new[0].status()["status"] == "queued"
    cfg = new[0].config
    assert cfg["method"] in ("spt-lora", "spt-adapter") and cfg["data"]["spec"] == \
        "embedded:count"  # the picker lists runs by task: count comes first
    assert abs(cfg["method_config"]["budget"] - 3000) <= 0.2 * 3000
    assert any("Queued run" in s.value for s in at.success)


def test_sct_page_with_runs(with_runs):
    at = page("5_SCT.py")
    assert not at.exception
    assert len(at.selectbox(key="sct-run").options) == 2
    assert at.metric[0].value == "6 of 48"
    assert len(at.get("plotly_chart")) >= 4  # map, distributions, overlap, vs plain (+scatter)
    at.slider(key="sct-block").set_value(0).run()
    assert not at.exception
    at.multiselect(key="sct-tasks").set_value([0]).run()
    assert any("at least two runs" in i.value for i in at.info)


def test_unusable_records_give_an_error_not_a_crash(with_runs):
    user = run_stores.RunStore(with_runs / "user")
    (bad,) = [r for r in user.list() if r.config["method"] == "spt-adapter"]
    bad.save_artifact("method.npz", {"unrelated": np.zeros(3)})
    at = page("4_SPT.py")  # first run (count) is fine; the bad one is the first to compare with
    assert not at.exception
    assert any(f"Run {bad.id} has no usable sensitivity record" in e.value for e in at.error)
    assert [m.label for m in at.metric][:1] == ["budget used"]  # the rest of the page is there

    runs = at.selectbox(key="spt-run")
    at = runs.set_value(next(o for o in runs.options if bad.id in o)).run()
    assert not at.exception
    assert any(f"Run {bad.id} has no usable sensitivity record" in e.value for e in at.error)
