"""Flatness analysis on finished runs (record, cache, parameter space), its command and the
Flatness page on a store with runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import vpeft_viz.runs as run_stores
from vpeft_viz.analysis import flatness as fl
from vpeft_viz.cli import main
from vpeft_viz.probes import landscape as ls
from vpeft_viz.runs import queue
from vpeft_viz.runs.execute import execute_run, make_run_config
from vpeft_viz.runs.store import Run, RunStore
from vpeft_viz.runs.weights import load_run_model

PAGE = Path(__file__).resolve().parents[1] / "pages" / "7_Flatness.py"
TINY = fl.FlatnessSettings(images=6, points_1d=5, grid_2d=3, noise=(0.0, 0.5), draws=2,
                           lanczos_steps=3, trace_samples=2, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Finished 1-epoch runs on a tiny task (random-init embedded backbone)."""
    from conftest import write_vtab_task

    root = tmp_path_factory.mktemp("flat")
    task = write_vtab_task(root / "colours")
    s = RunStore(root / "store")
    for method, cfg, run_id in (("bi-adaptformer", {"bits": 1}, "colours-bi-adaptformer-s0"),
                                ("bi-adaptformer", {"bits": 32}, "colours-bi-adaptformer-s0-b32"),
                                ("linear", {}, "colours-linear-s0")):
        config = make_run_config(method=method, data=str(task), pretrained=False,
                                 method_config=cfg, train={"epochs": 1, "batch_size": 8})
        execute_run(s.create(config, run_id=run_id))
    return root / "store"


def test_record_centre_is_the_trained_loss(store):
    path = store / "colours-bi-adaptformer-s0"
    rec = fl.compute_flatness(path, TINY, save=False)
    trained = load_run_model(Run(path, read_only=True))
    batches = fl.validation_batches(trained, TINY.images, TINY.batch_size, "cpu")
    loss, acc = ls.loss_and_accuracy(trained.model, batches)
    assert rec["images"] == 6
    assert rec["trained"] == {"loss": loss, "acc": acc, "test_acc": rec["trained"]["test_acc"]}
    assert rec["landscape_1d"]["loss"][2] == loss and rec["landscape_1d"]["acc"][2] == acc
    assert rec["landscape_2d"]["loss"][1][1] == loss
    assert rec["noise"]["loss_mean"][0] == loss
    assert rec["space"]["params"] == 6 * 2 * 128 * 32
    assert rec["sharpness"]["lanczos_products"] <= TINY.lanczos_steps
    assert rec["sharpness"]["top_eigenvalue"] >= rec["sharpness"]["lowest_ritz_value"]
    assert len(set(rec["landscape_1d"]["loss"])) > 1


def test_record_is_cached_with_its_settings(store, tmp_path, monkeypatch):
    path = store / "colours-bi-adaptformer-s0-b32"
    rec = fl.compute_flatness(path, TINY)
    assert (path / "artifacts" / fl.ARTIFACT).is_file()
    assert fl.load_record(path, TINY) == json.loads(json.dumps(rec))
    assert fl.load_record(path, fl.FlatnessSettings()) is None  # other settings: recompute

    # a run in a read-only store keeps its record in the user cache
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "ro" / path.name
    shutil.copytree(path, copy)
    (copy / "artifacts" / fl.ARTIFACT).unlink()
    fl.compute_flatness(copy, TINY, writable=False)
    assert not (copy / "artifacts" / fl.ARTIFACT).exists()
    assert (tmp_path / "cache" / "flatness" / f"{copy.name}.json").is_file()
    assert fl.load_record(copy, TINY)["run_id"] == copy.name


def test_linear_probe_is_measured_in_its_head(store):
    rec = fl.compute_flatness(store / "colours-linear-s0", TINY, save=False)
    assert rec["space"]["what"].startswith("classifier head")
    assert rec["space"]["params"] == 128 * 3 + 3


def test_frontier_uses_packed_bytes():
    summaries = [{"run_id": "a", "task": "t", "test_acc": 0.5, "adapter_bytes": 2048,
                  "trainable_params_excl_head": 99999},
                 {"run_id": "b", "task": "t", "test_acc": 0.6, "trainable_params_excl_head": 512}]
    configs = [{"method": "bi-lora", "method_config": {"bits": 1}},
               {"method": "lora", "method_config": {"rank": 8}}]
    rows = fl.frontier_rows(summaries, configs)
    assert [(r["label"], r["kb"], r["bits"]) for r in rows] == [
        ("bi-lora · 1 bit", 2.0, 1), ("lora", 2.0, 32)]


def test_flatness_command(store, capsys):
    assert main(["flatness", "colours-linear-s0", "--store", str(store), "--images", "4",
                 "--grid", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["run_id"] == "colours-linear-s0" and row["params"] == 387
    assert main(["flatness", "--store", str(store)]) == 1  # nothing named


def _page(store: Path, tmp_path: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(store))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "no-cached")
    monkeypatch.setattr(queue, "ensure_worker", lambda s: [])
    return AppTest.from_file(str(PAGE), default_timeout=180)


def test_page_with_runs(store, tmp_path, monkeypatch):
    for run_id in ("colours-bi-adaptformer-s0", "colours-bi-adaptformer-s0-b32",
                   "colours-linear-s0"):
        fl.compute_flatness(store / run_id, fl.FlatnessSettings(
            **{**TINY.key(), "noise": (0.0, 0.5)}))
    at = _page(store, tmp_path, monkeypatch).run()
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs] == ["Landscapes", "Sharpness", "Noise robustness",
                                          "Weight histograms", "Storage frontier"]
    assert not at.warning  # every picked run has its record
    charts = at.get("plotly_chart")
    assert len(charts) >= 5
    assert len(at.dataframe) == 2  # the sharpness table and the records' settings


def test_settings_differ():
    a = {"settings": TINY.key()}
    b = {"settings": {**TINY.key(), "images": 7, "noise": [0.0]}}
    assert fl.settings_differ([a, a]) == ""
    assert fl.settings_differ([a, b]) == "images, noise"


def test_page_offers_to_measure_runs_without_a_record(store, tmp_path, monkeypatch):
    for run_id in ("colours-bi-adaptformer-s0", "colours-bi-adaptformer-s0-b32",
                   "colours-linear-s0"):
        for path in (store / run_id / "artifacts" / fl.ARTIFACT,
                     tmp_path / "cache" / "flatness" / f"{run_id}.json"):
            path.unlink(missing_ok=True)
    at = _page(store, tmp_path, monkeypatch).run()
    assert not at.exception, at.exception
    assert "no flatness record yet" in at.warning[0].value
    assert at.button(key="flat-compute")


def test_bf16_landscapes_keep_an_exact_centre(store):
    """Under bf16 autocast every point, the centre included, is evaluated the same way: the
    centre is the trained model's bf16 loss exactly, and close to the fp32 one."""
    import dataclasses

    import torch

    path = store / "colours-bi-adaptformer-s0"
    fast = dataclasses.replace(TINY, precision="bf16")
    rec = fl.compute_flatness(path, fast, save=False)
    trained = load_run_model(Run(path, read_only=True))
    batches = fl.validation_batches(trained, TINY.images, TINY.batch_size, "cpu")
    loss16, _ = ls.loss_and_accuracy(trained.model, batches, amp=torch.bfloat16)
    loss32, _ = ls.loss_and_accuracy(trained.model, batches)
    assert rec["settings"]["precision"] == "bf16"
    assert rec["landscape_1d"]["loss"][2] == loss16 == rec["trained"]["loss"]
    assert rec["landscape_2d"]["loss"][1][1] == loss16
    assert abs(loss16 - loss32) < 0.05 * abs(loss32)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        fl.FlatnessSettings(precision="fp8")


def test_records_from_before_a_setting_existed_still_load(store, tmp_path):
    """A record written before ``precision`` existed was fp32: it matches fp32 settings."""
    path = store / "colours-linear-s0"
    rec = fl.compute_flatness(path, TINY)
    stored = json.loads((path / "artifacts" / fl.ARTIFACT).read_text())
    del stored["settings"]["precision"]
    (path / "artifacts" / fl.ARTIFACT).write_text(json.dumps(stored))
    assert fl.load_record(path, TINY)["run_id"] == rec["run_id"]
