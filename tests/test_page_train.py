"""The Train page under ``streamlit.testing.v1.AppTest`` (no browser, no worker process).

Spawning workers is tested for real in test_queue.py; here ``ensure_worker`` is replaced by a
recorder so a launch only puts runs on the queue in a tmp store.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_vtab_task
from streamlit.testing.v1 import AppTest

from vpeft_viz.backbones import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, weights_fingerprint
from vpeft_viz.data.embedded import list_tasks
from vpeft_viz.runs import REPO_ROOT, RunStore, queue
from vpeft_viz.runs.execute import make_run_config

PAGE = str(REPO_ROOT / "pages" / "1_Train.py")


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    root = tmp_path / "runs"
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(root))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    return RunStore(root)


@pytest.fixture
def spawned(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(queue, "ensure_worker", lambda store: calls.append(str(store.root)) or [])
    return calls


@pytest.fixture
def task(tmp_path):
    return write_vtab_task(tmp_path / "colours", sizes=(6, 3, 3))


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60).run()


def _with_folder(at: AppTest, path) -> AppTest:
    at.radio(key="data.kind").set_value("folder").run()
    at.text_input(key="data.path").set_value(str(path)).run()
    return at


def _errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def test_page_renders_key_widgets(store, spawned):
    at = _page()
    assert not at.exception
    assert at.title[0].value == "Train"
    assert at.radio(key="backbone.kind").value == "embedded"
    assert at.radio(key="data.kind").value == "embedded"
    assert at.multiselect(key="methods").value == ["lora"]
    assert at.multiselect(key="methods").options[:2]  # the registry is offered
    assert at.number_input(key="method.lora.rank").value == 8
    assert at.selectbox(key="method.lora.targets").value == "qv"
    assert at.number_input(key="train.epochs").value == 10
    assert at.text_input(key="train.seeds").value == "0"
    assert at.selectbox(key="data.normalization").value == "backbone"
    assert at.button(key="launch")
    assert "No runs queued or running." in [c.value for c in at.caption]
    assert spawned == []


def test_backbone_choices_validate(store, spawned, tmp_path):
    at = _page()
    at.radio(key="backbone.kind").set_value("timm").run()
    at.text_input(key="backbone.name").set_value("vit_nonexistent_model").run()
    assert "unknown timm model 'vit_nonexistent_model'" in _errors(at)
    at.radio(key="backbone.kind").set_value("checkpoint").run()
    at.text_input(key="backbone.path").set_value(str(tmp_path / "missing.safetensors")).run()
    assert "checkpoint: no file at" in _errors(at)
    assert not at.exception


def test_folder_format_feedback(store, spawned, task, tmp_path):
    at = _with_folder(_page(), task)
    assert not at.exception
    assert any("VTAB-1k task folder" in s.value and "3 classes" in s.value for s in at.success)
    (tmp_path / "empty").mkdir()
    at.text_input(key="data.path").set_value(str(tmp_path / "empty")).run()
    assert "matches no known task format" in _errors(at)
    assert at.button(key="launch").disabled


def test_invalid_values_show_errors_naming_the_field(store, spawned, task):
    at = _with_folder(_page(), task)
    at.text_input(key="train.lr").set_value("fast").run()
    assert "train.lr expects a float, got 'fast'" in _errors(at)
    assert at.button(key="launch").disabled
    at.text_input(key="train.lr").set_value("").run()
    at.number_input(key="train.epochs").set_value(1).run()
    at.number_input(key="train.warmup_epochs").set_value(3.0).run()
    assert "train.warmup_epochs (3.0) must not exceed train.epochs (1)" in _errors(at)
    at.number_input(key="train.warmup_epochs").set_value(0.0).run()
    at.text_input(key="train.seeds").set_value("0,x").run()
    assert "seeds: 'x' is not a seed" in _errors(at)
    assert at.button(key="launch").disabled
    at.text_input(key="train.seeds").set_value("0").run()
    assert not at.error and not at.button(key="launch").disabled
    assert not at.exception


def test_launch_queues_one_run_per_method_and_seed(store, spawned, task):
    at = _with_folder(_page(), task)
    at.multiselect(key="methods").set_value(["linear", "lora"]).run()
    at.number_input(key="method.lora.rank").set_value(4).run()
    at.number_input(key="train.epochs").set_value(1).run()
    at.text_input(key="train.seeds").set_value("0-1").run()
    assert at.button(key="launch").label == "Launch 4 runs"
    at.button(key="launch").click().run()
    assert not at.exception
    assert spawned and set(spawned) == {str(store.root)}  # the launch (and the panel) ask
    assert [s.value for s in at.success][-1] == "Queued 4 runs."
    jobs = queue.queue_state(store).queued
    assert len(jobs) == 4
    got = sorted((j.config["method"], j.config["train"]["seed"]) for j in jobs)
    assert got == [("linear", 0), ("linear", 1), ("lora", 0), ("lora", 1)]
    lora = next(j.config for j in jobs if j.config["method"] == "lora")
    assert lora["method_config"]["rank"] == 4 and lora["train"]["epochs"] == 1
    assert lora["data"]["spec"] == str(task.resolve())
    # the queue is on the page, each run with its Cancel button
    assert any("Queue" in m.value and "4 waiting" in m.value for m in at.markdown)
    at.button(key=f"cancel-{jobs[0].id}").click().run()
    assert jobs[0].run.status()["status"] == "cancelled"
    assert len(queue.queue_state(store).queued) == 3


def test_default_launch_uses_the_embedded_backbone_and_first_task(store, spawned):
    at = _page()
    at.number_input(key="train.epochs").set_value(1).run()
    at.button(key="launch").click().run()
    assert not at.exception
    (job,) = queue.queue_state(store).queued
    cfg = job.config
    assert cfg["method"] == "lora" and cfg["data"]["spec"] == f"embedded:{list_tasks()[0]['name']}"
    # without shipped weights the embedded backbone can only start from random init
    shipped = EMBEDDED_WEIGHTS.is_file()
    weights = weights_fingerprint(EMBEDDED_WEIGHTS) if shipped else None
    assert cfg["backbone"] == {"name": EMBEDDED_BACKBONE, "pretrained": shipped,
                               "checkpoint": None, "weights": weights}


def test_running_and_failed_runs_are_shown(store, spawned, task):
    cfg = make_run_config(method="linear", data=str(task), pretrained=False,
                          train={"epochs": 2, "warmup_epochs": 0.0})
    running = store.create(cfg)
    running.set_status("running", pid=os.getpid())
    running.update_progress(phase="train", step=3, steps=10, epochs=2, loss=0.75, eta_s=42.0)
    running.append_metrics({"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9,
                            "val_acc": 0.6})
    failed = store.create(cfg)
    failed.set_status("failed", error="DataError: cannot read image /x.png: truncated",
                      finished=1.0)
    at = _page()
    assert not at.exception
    bars = at.get("progress")
    assert len(bars) == 1 and bars[0].value == 30
    assert "epoch 1/2 · step 3/10 · loss 0.750 · ETA 42 s" in bars[0].proto.text
    assert len(at.get("plotly_chart")) == 1
    assert "DataError: cannot read image /x.png: truncated" in _errors(at)
    at.button(key=f"cancel-{running.id}").click().run()
    assert running.cancel_requested()
    assert at.button(key=f"cancel-{running.id}").disabled


def test_progress_text_covers_prepare_and_training():
    from vpeft_viz.ui.live import progress_text

    frac, text = progress_text({"phase": "prepare", "prepare_done": 4, "prepare_total": 16})
    assert frac == 0.25 and "4/16" in text
    assert progress_text({"phase": "weights"})[1] == "downloading weights"
    frac, text = progress_text({"phase": "train", "step": 30, "steps": 120, "epochs": 10,
                                "loss": 0.5, "eta_s": 65})
    assert frac == 0.25 and "epoch 3/10" in text and "loss 0.500" in text and "ETA" in text


# -- issue 15: what a first-time user tripped over -------------------------------------------
def _code(at: AppTest) -> str:
    return "\n".join(c.value for c in at.code)


def test_invalid_numbers_block_launch_and_the_queued_config_is_shown(store, spawned):
    at = _page()
    for key, bad in (("method.lora.rank", 0), ("train.epochs", 0)):
        at.number_input(key=key).set_value(bad).run()
        assert not at.exception
        assert at.number_input(key=key).value == bad  # the value reaches the check...
        assert at.button(key="launch").disabled  # ...and blocks the launch
        assert key.split(".")[-1] in _errors(at) and "Launch is blocked" in at.warning[0].value
        assert not at.code  # nothing shown as "what Launch queues" while blocked
    at.number_input(key="method.lora.rank").set_value(4).run()
    at.number_input(key="train.epochs").set_value(2).run()
    assert not at.button(key="launch").disabled
    shown = json.loads(_code(at))
    assert shown["method_config"]["rank"] == 4 and shown["train"]["epochs"] == 2
    at.button(key="launch").click().run()
    (job,) = queue.queue_state(store).queued
    assert job.config == shown  # exactly what was shown is what was queued


def test_form_lives_in_the_url(store, spawned):
    # Every field is bound to the URL (the browser writes it; test_browser.py checks that):
    # a reload, or a shared link, with those query parameters brings the form back.
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.query_params.update({"train.epochs": "3", "methods": ["Linear probe", "SSF"],
                            "data.kind": "Task folder"})
    at.run()
    assert not at.exception
    assert at.number_input(key="train.epochs").value == 3
    assert at.multiselect(key="methods").value == ["linear", "ssf"]
    assert at.radio(key="data.kind").value == "folder"


def test_backbone_problems_are_caught_before_launch(store, spawned, tmp_path, monkeypatch):
    import streamlit as st

    from vpeft_viz.ui import forms

    at = _page()
    at.radio(key="backbone.kind").set_value("timm").run()
    at.text_input(key="backbone.name").set_value("vit_base_patch16_244").run()
    assert "did you mean vit_base_patch16_224" in _errors(at)
    at.text_input(key="backbone.name").set_value("resnet50").run()
    assert "not a VisionTransformer" in _errors(at) and at.button(key="launch").disabled
    # weights not on this machine: offline they block the launch, online they are announced
    monkeypatch.setattr(forms, "hub_weights_cached", lambda name: False)
    monkeypatch.setattr(forms, "hub_reachable", lambda: False)
    st.cache_data.clear()
    at.text_input(key="backbone.name").set_value("vit_small_patch16_224").run()
    assert "cannot be reached (offline)" in _errors(at) and at.button(key="launch").disabled
    monkeypatch.setattr(forms, "hub_reachable", lambda: True)
    st.cache_data.clear()
    at.checkbox(key="backbone.pretrained").uncheck().run()
    at.checkbox(key="backbone.pretrained").check().run()
    assert not _errors(at)
    assert any("downloading weights" in i.value for i in at.info)
    # a checkpoint that is not a weights file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    at.radio(key="backbone.kind").set_value("checkpoint").run()
    at.text_input(key="backbone.path").set_value(str(junk)).run()
    assert "cannot read checkpoint" in _errors(at) and at.button(key="launch").disabled
    assert not at.exception


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_blocks_launch(store, spawned):
    at = _page()
    at.selectbox(key="train.device").set_value("cuda").run()
    assert "torch sees no GPU" in _errors(at) and at.button(key="launch").disabled


def test_finished_runs_keep_card_curves_and_a_link_to_compare(store, spawned, task):
    cfg = make_run_config(method="linear", data=str(task), pretrained=False,
                          train={"epochs": 2, "warmup_epochs": 0.0})
    done = store.create(cfg)
    for e in (1, 2):
        done.append_metrics({"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5,
                             "val_loss": 0.9, "val_acc": 0.6})
    done.write_summary({"val_acc": 0.6, "test_acc": 0.55, "train_time_s": 3.0})
    done.set_status("done", finished=2.0)
    failed = store.create(cfg)
    failed.set_status("failed", error="RuntimeError: boom", finished=1.0)
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/1_Train.py")
    at.run()
    assert not at.exception
    body = "\n".join(m.value for m in at.markdown)
    assert "linear · colours · vit_tiny_patch4_32_vpeft · 2 epochs · seed 0" in body
    assert "done" in body and "test 55.0%" in body
    assert len(at.get("plotly_chart")) == 1  # the done run's curves (the failed run has none)
    (link,) = [p for p in at.get("page_link") if p.proto.page == "Compare"]
    assert link.proto.query_string == "task=colours"
    at.button(key=f"dismiss-{failed.id}").click().run()
    assert "RuntimeError: boom" not in _errors(at)
    assert failed.status()["status"] == "failed"  # hidden, not changed
    assert not at.exception


def test_first_epoch_shows_a_per_step_loss_curve(store, spawned, task):
    cfg = make_run_config(method="linear", data=str(task), pretrained=False,
                          train={"epochs": 2, "warmup_epochs": 0.0})
    running = store.create(cfg)
    running.set_status("running", pid=os.getpid())
    running.update_progress(phase="train", step=3, steps=10, epochs=2, loss=0.75,
                            loss_curve=[[1, 1.2], [2, 0.9], [3, 0.75]])
    at = _page()
    (chart,) = at.get("plotly_chart")
    fig = json.loads(chart.proto.spec)
    assert fig["data"][0]["y"] == [1.2, 0.9, 0.75]


def test_new_seed_methods_launch_from_the_form(store, spawned, task):
    """VeLoRA, HST and PVP (and a few-shot split) are launched like any method: their
    settings come from the registry into the form and the queued configs."""
    at = _with_folder(_page(), task)
    at.multiselect(key="methods").set_value(["velora", "hst", "pvp"]).run()
    assert not at.exception
    at.number_input(key="train.epochs").set_value(1).run()
    at.button(key="launch").click().run()
    assert not at.exception, at.exception
    jobs = queue.queue_state(store).queued
    assert sorted(j.config["method"] for j in jobs) == ["hst", "pvp", "velora"]
    velora = next(j.config for j in jobs if j.config["method"] == "velora")
    assert velora["method_config"]["groups"] == 32
    pvp = next(j.config for j in jobs if j.config["method"] == "pvp")
    assert pvp["method_config"]["init"] == "pretrained"
