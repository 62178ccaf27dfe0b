"""AppTest of the E2VPT page: with no runs, and with real (tiny) runs of e2vpt, a run that
did not prune, and the VPT-deep / LoRA references, trained by the run engine on a tiny task
with a random-init embedded backbone; round picker, image picker, reference launch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import page_text as text
from streamlit.testing.v1 import AppTest

import vpeft_viz.runs as run_stores
from vpeft_viz.runs.execute import execute_run, make_run_config

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "8_E2VPT.py")
TIMEOUT = 180


def train(data: Path, method: str, method_config: dict | None = None) -> None:
    cfg = make_run_config(method=method, data=str(data), pretrained=False,
                          method_config=method_config,
                          train={"epochs": 1, "batch_size": 8, "warmup_epochs": 0})
    execute_run(run_stores.user_store().create(cfg))


# The page on an empty store: tests/test_registry.py, for every view page.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A user store with e2vpt (pruned), e2vpt (no pruning), vpt-deep and lora runs."""
    from conftest import write_vtab_task

    root = tmp_path_factory.mktemp("e2vpt-page")
    data = write_vtab_task(root / "colours")
    mp = pytest.MonkeyPatch()
    mp.setenv("VPEFT_VIZ_RUNS", str(root / "user"))
    try:
        small = {"num_tokens": 4, "kv_tokens": 2}
        train(data, "e2vpt", {**small, "piece_fractions": "0.25,0.5"})
        train(data, "e2vpt", {**small, "prune": False})
        train(data, "vpt-deep", {"num_tokens": 4})
    finally:
        mp.undo()
    return root


@pytest.fixture
def with_runs(stores, trained, monkeypatch) -> Path:
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(trained / "user"))
    return trained


def test_page_with_runs(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="e2vpt-run").options
    assert len(runs) == 2 and all("e2vpt" in r for r in runs)
    labels = [m.label for m in at.metric]
    assert labels[:2] == ["visual tokens kept", "pieces kept per token"]
    assert len(at.get("plotly_chart")) >= 6
    body = text(at)
    assert "Share of the attention" in body and "No finished lora run" in body

    rounds = at.selectbox(key="e2vpt-round")
    assert len(rounds.options) in (1, 3)  # 3 for the pruned run (mask round + 2 rewinds)
    at.number_input(key="e2vpt-image").set_value(3).run()
    assert not at.exception
    at.slider(key="e2vpt-images").set_value(16).run()
    assert not at.exception

    # the other run: no pruning, said so, views still open
    at.selectbox(key="e2vpt-run").set_value(1 - at.selectbox(key="e2vpt-run").value).run()
    assert not at.exception


def test_page_shows_pruning_rounds_and_launches_a_reference(with_runs):
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    picker = at.selectbox(key="e2vpt-run")
    for i in range(len(picker.options)):
        at.selectbox(key="e2vpt-run").set_value(i).run()
        if len(at.selectbox(key="e2vpt-round").options) == 3:
            break
    assert len(at.selectbox(key="e2vpt-round").options) == 3
    assert not any("did not prune" in i.value for i in at.info)
    at.selectbox(key="e2vpt-round").set_value(2).run()
    assert not at.exception
    before = {r.id for r in run_stores.user_store().list()}
    at.button(key="e2vpt-ref-lora").click().run()
    assert not at.exception
    new = [r for r in run_stores.user_store().list() if r.id not in before]
    assert len(new) == 1 and new[0].config["method"] == "lora"
    assert new[0].status()["status"] == "queued"
    shutil.rmtree(new[0].path)  # the store is shared by this module's tests


def test_live_progress_names_the_round():
    from vpeft_viz.ui.live import progress_text

    frac, line = progress_text({"phase": "train", "round": 1, "rounds": 3, "step": 5,
                                "steps": 10, "epochs": 2, "round_label": "rewind 1/2"})
    assert frac == 0.5 and line.startswith("round 2/3 (rewind 1/2) · epoch 2/2 · step 5/10")
    assert not progress_text({"phase": "train", "step": 5, "steps": 10})[1].startswith("round")


def test_page_on_the_shipped_cached_runs(stores, monkeypatch):
    """The real cached_runs/ store: one e2vpt run per cached task, each pruned and rewound,
    rebuilt on the embedded backbone for the attention view."""
    monkeypatch.setattr(run_stores, "CACHED_STORE", run_stores.REPO_ROOT / "cached_runs")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    runs = at.selectbox(key="e2vpt-run").options
    assert len(runs) >= 3 and all("shipped" in r for r in runs)
    assert len(at.selectbox(key="e2vpt-round").options) == 3
    assert len(at.get("plotly_chart")) >= 6 and not at.error
    assert not any("No finished" in c.value for c in at.caption)  # VPT-deep and LoRA shipped
