"""What a first-time user tripped over (issue 15, items 11-16), below the pages: per-run
peak memory, class names in eval.json, setting labels over every store, one style per
group, the comparison table as shown, chance lines and cell counts, and the backbone checks
made before a launch. The pages themselves are covered in test_pages.py, test_page_train.py
and (in a real browser) test_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_compare import synthetic_store, write_run

from vpeft_viz.analysis.compare import aggregate, load_runs, seed_eval
from vpeft_viz.backbones import (
    BackboneError,
    check_backbone_name,
    check_checkpoint,
    close_names,
    edit_distance,
    vit_names,
)
from vpeft_viz.config import ConfigError
from vpeft_viz.data import TaskSplits
from vpeft_viz.plots import group_label, group_styles
from vpeft_viz.plots.compare import (
    confusion_heatmap,
    pareto_scatter,
    per_class_bars,
    training_curves,
)
from vpeft_viz.runs import RunStore
from vpeft_viz.runs.execute import execute_run, make_run_config
from vpeft_viz.runs.model import class_names
from vpeft_viz.ui.common import comparison_frame
from vpeft_viz.ui.stores import load_run_table


# -- 11: each run's own peak memory --------------------------------------------------------
def _high_water_mark() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_is_the_runs_own_not_the_process_high_water_mark(vtab_task, tmp_path):
    spike = np.ones(600 * 2**20 // 8)  # 600 MiB touched, then freed: the process's old peak
    del spike
    before = _high_water_mark()
    store = RunStore(tmp_path / "runs")
    cfg = make_run_config(method="linear", data=str(vtab_task), pretrained=False,
                          train={"epochs": 1, "batch_size": 8})
    first = execute_run(store.create(cfg))["peak_memory_bytes"]
    second = execute_run(store.create(cfg))["peak_memory_bytes"]
    # The tiny run needs far less than the spike: a process-lifetime high-water mark
    # (what every run of a dashboard worker or `cache-runs` recorded) would include it.
    assert first < before - 300 * 2**20
    assert abs(second - first) < 100 * 2**20  # the same run again: about the same peak


# -- 14: class names are stored ------------------------------------------------------------
def test_eval_json_names_the_classes_of_an_embedded_task(tmp_path):
    # Generated embedded tasks are read back as plain VTAB folders, without class names.
    task = TaskSplits(name="retinopathy", format="embedded", root=tmp_path, num_classes=4,
                      splits={"train": [], "val": [], "test": []})
    assert class_names(task) == ["none", "mild", "moderate", "severe"]
    task.format, task.name = "vtab", "dtd"
    assert class_names(task) == ["0", "1", "2", "3"]
    task.class_names = ["a", "b", "c", "d"]
    assert class_names(task) == ["a", "b", "c", "d"]


def test_old_runs_without_class_names_borrow_the_tasks(tmp_path):
    store = RunStore(tmp_path)
    run = write_run(store, method="lora", task="digits", seed=0, test_acc=0.5)
    ev = json.loads((run.path / "artifacts" / "eval.json").read_text())
    ev["class_names"] = None
    (run.path / "artifacts" / "eval.json").write_text(json.dumps(ev))
    n = len(ev["test_confusion"])
    names = [f"c{i}" for i in range(n)]
    assert seed_eval([run.path], names).class_names == names
    assert seed_eval([run.path], names[:-1]).class_names == [str(i) for i in range(n)]


# -- 12: runs differing only by settings are told apart --------------------------------------
def _two_stores(tmp_path):
    cached, user = RunStore(tmp_path / "cached"), RunStore(tmp_path / "user")
    write_run(cached, method="lora", task="digits", seed=0, test_acc=0.8, epochs=10)
    write_run(cached, method="linear", task="digits", seed=0, test_acc=0.6, epochs=10)
    write_run(user, method="lora", task="digits", seed=0, test_acc=0.7, epochs=3)
    return cached, user


def test_settings_are_labelled_over_every_store(tmp_path, monkeypatch):
    import vpeft_viz.runs as run_stores

    cached, user = _two_stores(tmp_path)
    monkeypatch.setattr(run_stores, "CACHED_STORE", cached.root)
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(user.root))
    runs = load_run_table().runs
    labels = {(r.source, r.method): group_label(r.method, r.setting) for r in runs.itertuples()}
    # epochs differ between the stores, so every group names its epochs
    assert labels[("user", "lora")] == "lora (epochs=3)"
    assert labels[("cached", "lora")] == "lora (epochs=10)"
    assert labels[("cached", "linear")] == "linear (epochs=10)"
    # one store alone: nothing differs, no label
    alone = load_runs({"cached": cached}, {})
    assert set(alone.runs["setting"]) == {""}


def test_each_group_keeps_one_style_on_every_figure(tmp_path):
    cached, user = _two_stores(tmp_path)
    runs = load_runs({"cached": cached, "user": user}, {}).runs
    styles = group_styles(zip(runs["method"], runs["setting"]))
    a, b = styles["lora (epochs=3)"], styles["lora (epochs=10)"]
    assert a.colour == b.colour and a.symbol != b.symbol and a.dash != b.dash
    assert styles["linear (epochs=10)"].colour != a.colour
    agg = aggregate(runs)
    fig = pareto_scatter(agg, cost="trainable_params", cost_label="p", styles=styles)
    marks = {t.name: t.marker.symbol for t in fig.data if t.mode == "markers+text"}
    assert marks["lora (epochs=3)"] == a.symbol and marks["lora (epochs=10)"] == b.symbol
    # only some groups shown: the survivors keep their look
    fig = pareto_scatter(agg[agg["setting"] == "epochs=10"], cost="trainable_params",
                         cost_label="p", styles=styles)
    assert {t.name: t.marker.symbol for t in fig.data
            if t.mode == "markers+text"}["lora (epochs=10)"] == b.symbol


# -- 14: chance level, counts in cells -------------------------------------------------------
def test_accuracy_figures_draw_chance_and_confusion_cells_show_counts(tmp_path):
    runs = synthetic_store(tmp_path / "s")
    agg = aggregate(load_runs({"cached": runs}, {}).runs)
    on = agg[agg["task"] == "digits"]
    fig = pareto_scatter(on, cost="trainable_params", cost_label="p", chance=0.1)
    assert any(s.y0 == pytest.approx(10.0) for s in fig.layout.shapes)
    assert "chance 10.0%" in [a.text for a in fig.layout.annotations]
    curves = pd.DataFrame({"epoch": [1, 2], "val_acc": [0.2, 0.3], "method": "lora",
                           "setting": ""})
    assert training_curves(curves, metric="val_acc", chance=0.25).layout.shapes
    assert not training_curves(curves, metric="val_acc").layout.shapes
    assert per_class_bars({"lora": [0.5, 0.7]}, ["a", "b"], chance=0.5).layout.shapes
    heat = confusion_heatmap(np.array([[3, 1], [0, 4]]), ["cat", "dog"])
    assert heat.data[0].texttemplate == "%{text}"
    assert heat.data[0].text.tolist() == [[3, 1], [0, 4]]
    assert list(heat.data[0].x) == ["cat", "dog"]


# -- 15: the comparison table as a projector shows it ------------------------------------------
def test_comparison_table_puts_method_and_accuracy_first_and_hides_constants(tmp_path):
    runs = load_runs({"cached": synthetic_store(tmp_path / "s")}, {}).runs
    agg = aggregate(runs[runs["task"] == "digits"])
    table, constant = comparison_frame(agg)
    assert list(table.columns[:3]) == ["Method", "Setting", "Test acc"] or \
        list(table.columns[:2]) == ["Method", "Test acc"]
    assert "Task" not in table.columns and constant["Task"] == "digits"
    assert "Backbone" in constant
    assert "None" not in " ".join(constant.values())


# -- 16: what fails inside a run is caught before launch -------------------------------------
def test_close_timm_names_by_edit_distance():
    assert edit_distance("vit_base_patch16_244", "vit_base_patch16_224") == 1
    assert close_names("vit_base_patch16_244", vit_names())[0] == "vit_base_patch16_224"
    with pytest.raises(BackboneError, match="did you mean vit_base_patch16_224"):
        check_backbone_name("vit_base_patch16_244")


def test_non_vit_and_unreadable_checkpoints_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="not a VisionTransformer"):
        check_backbone_name("resnet18")
    with pytest.raises(ConfigError, match="backbone: .*resnet18"):
        make_run_config(method="lora", data="embedded:digits", backbone="resnet18")
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="cannot read checkpoint"):
        check_checkpoint(junk)
