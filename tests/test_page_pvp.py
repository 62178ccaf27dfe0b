"""AppTest of the PVP view page, on small PVP runs of a tiny ViT (real initial and tuned
prompts, few-shot configs of both inits and two seeds, a source identity) in the user store
and in the shipped store. The page with no runs: tests/test_registry.py, for every view page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import page_text as text
from streamlit.testing.v1 import AppTest
from timm.models.vision_transformer import VisionTransformer

import vpeft_viz.runs as run_stores
from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.runs.execute import make_run_config

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "11_PVP.py")
TIMEOUT = 180
pytestmark = pytest.mark.usefixtures("one_thread")


def write_run(store: run_stores.RunStore, task: str, init: str, shots: int | None, seed: int,
              test_acc: float) -> run_stores.Run:
    """A finished PVP run whose prompts really started from a source (or random) and moved."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                              num_classes=4).eval()
    method = create_method("pvp", {"init": init})
    if init == "pretrained":
        g = torch.Generator().manual_seed(100)
        method.load_source({f"blocks.{i}.prompts": torch.randn(10, 48, generator=g)
                            for i in range(2)},
                           {"run_id": "pool-except-count-vpt-deep-s0-abc", "store": "same store",
                            "method": "vpt-deep", "data": "embedded:pool-except-count",
                            "epochs": 5, "seed": 0, "test_acc": 0.4, "trained_now": False,
                            "weights_sha256": "0" * 64})
    attach_method(model, method)
    with torch.no_grad():
        for b in model.blocks:
            b.prompts.add_(0.1 * (shots or 32) * torch.randn_like(b.prompts))
    cfg = make_run_config(method="pvp", data=f"embedded:{task}",
                          method_config=method.config.to_dict(),
                          train={"epochs": 20 if shots else 10, "seed": seed, "shots": shots})
    run = store.create(cfg, run_id=f"{task}-pvp-{init}-k{shots}-s{seed}")
    run.write_method_state(method.state())
    run.save_artifact("method.npz", {k: np.asarray(v) for k, v in
                                     method.artifacts(model).items()})
    run.write_summary({"run_id": run.id, "test_acc": test_acc, "val_acc": test_acc,
                       "num_classes": 6, "train_size": 6 * (shots or 800), "device": "cpu"})
    run.set_status("done")
    return run


@pytest.fixture
def with_runs(stores: Path) -> Path:
    user = run_stores.RunStore(stores / "user")
    for shots in (1, 2):
        for seed in (0, 1):
            write_run(user, "count", "pretrained", shots, seed, 0.4 + 0.05 * shots + 0.01 * seed)
            write_run(user, "count", "random", shots, seed, 0.3 + 0.05 * shots)
    write_run(user, "count", "pretrained", None, 0, 0.6)
    write_run(run_stores.RunStore(stores / "cached"), "digits", "random", 4, 0, 0.2)
    return stores


def test_pvp_page_with_runs(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="pvp-task").options == ["digits", "count"]  # shipped first
    at = at.selectbox(key="pvp-task").set_value("count").run()
    assert not at.exception, at.exception
    charts = {c.proto.spec for c in at.get("plotly_chart")}
    shots = next(s for s in charts if "test accuracy (%)" in s)
    assert "pre-trained prompts (PVP)" in shots and "random prompts" in shots
    assert "whole training split" in shots  # the 10-epoch run on all of train800
    gain = next(s for s in charts if "random (points)" in s)
    assert "paired seed" in gain
    body = text(at)
    assert "Source" in body and "pool-except-count-vpt-deep-s0-abc" in body
    assert [m.label for m in at.metric] == ["test accuracy", "training images",
                                            "mean cosine, tuned vs initial",
                                            "prompts started from"]
    assert "Every run on count" in body  # the cosine per layer by init and k

    runs = at.selectbox(key="pvp-run")
    at = runs.set_value(next(o for o in runs.options if "random-k2-s1" in o)).run()
    assert not at.exception, at.exception
    assert at.metric[3].value == "random init"

    at = at.selectbox(key="pvp-task").set_value("digits").run()
    assert not at.exception, at.exception
    assert "Only random prompts on digits so far" in text(at)


def test_unusable_record_gives_an_error(with_runs):
    user = run_stores.RunStore(with_runs / "user")
    bad = user.get("count-pvp-random-k1-s0")
    bad.save_artifact("method.npz", {"prompts/0": np.zeros((10, 48))})  # a VPT-deep record
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at = at.selectbox(key="pvp-task").set_value("count").run()
    runs = at.selectbox(key="pvp-run")
    at = runs.set_value(next(o for o in runs.options if bad.id in o)).run()
    assert not at.exception
    assert any(f"Run {bad.id} has no usable PVP prompt record" in e.value for e in at.error)
