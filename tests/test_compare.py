"""Comparison analysis: seed statistics, PPT, Pareto frontier, multi-task means, export,
the guided tour's numbers and the cached-runs regeneration (with training faked)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vpeft_viz.analysis.compare import (
    PROTOCOL_NOTE,
    aggregate,
    export_csv,
    export_json,
    load_curves,
    load_runs,
    multi_task_means,
    pareto_front,
    read_export_json,
    seed_eval,
    task_group,
)
from vpeft_viz.analysis.cost import human_bytes, human_count, percent_of_backbone, ppt_score
from vpeft_viz.analysis.tour import pick_tour_task, tour_steps
from vpeft_viz.runs.store import RunStore

GROUPS = {"digits": "natural", "mnist": "natural", "retinopathy": "specialized",
          "count": "structured"}
BACKBONE_PARAMS = 2_691_648


def write_run(store: RunStore, *, method: str, task: str, seed: int, test_acc: float,
              val_acc: float | None = None, trainable: int = 10_000, head: int = 1_000,
              method_config: dict | None = None, status: str = "done", epochs: int = 3,
              num_classes: int = 3, spec: str | None = None, weight_bytes: int | None = None):
    """A synthetic finished run written through the Run API (no training)."""
    val_acc = test_acc if val_acc is None else val_acc
    cfg = {"method": method, "method_config": method_config or {},
           "backbone": {"name": "vit_tiny_patch4_32_vpeft", "pretrained": True,
                        "checkpoint": None},
           "data": {"spec": spec or f"embedded:{task}", "name": task,
                    "normalization": "backbone"},
           "train": {"epochs": epochs, "seed": seed, "lr": None, "device": "auto"},
           "versions": {"vpeft_viz": "test"}}
    run = store.create(cfg)
    for e in range(1, epochs + 1):
        run.append_metrics({"epoch": e, "step": 10 * e, "train_loss": 2.0 / e,
                            "train_acc": val_acc * e / epochs, "val_loss": 2.5 / e,
                            "val_acc": val_acc * e / epochs, "time_s": float(e)})
    correct = round(test_acc * 30)
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    confusion[0, 0] = correct
    confusion[1, 0] = 30 - correct
    run.save_artifact("eval.json", {
        "class_names": [f"c{i}" for i in range(num_classes)],
        "test_confusion": confusion.tolist(),
        "test_per_class_acc": [float(np.diag(confusion)[i] / max(confusion[i].sum(), 1))
                               for i in range(num_classes)]})
    run.write_summary({
        "run_id": run.id, "method": method, "backbone": "vit_tiny_patch4_32_vpeft",
        "task": task, "num_classes": num_classes, "seed": seed, "epochs": epochs,
        "best_epoch": epochs, "val_acc": val_acc, "test_acc": test_acc, "test_loss": 1.0,
        "trainable_params": trainable + head, "trainable_params_excl_head": trainable,
        "total_params": BACKBONE_PARAMS + head, "backbone_params": BACKBONE_PARAMS,
        "weight_bytes": 4 * (trainable + head) if weight_bytes is None else weight_bytes,
        "train_time_s": 10.0 + seed, "images_per_s": 100.0, "peak_memory_bytes": 2**30,
        "flops_per_image": 3.5e8, "device": "cpu"})
    run.set_status(status)
    return run


def synthetic_store(root: Path) -> RunStore:
    """linear / bitfit / lora / full on digits (3 seeds) and count (2 seeds)."""
    store = RunStore(root)
    plan = {"linear": (0, [0.60, 0.62, 0.64]), "bitfit": (20_000, [0.70, 0.71, 0.72]),
            "lora": (37_000, [0.80, 0.78, 0.82]), "full": (BACKBONE_PARAMS, [0.79, 0.80, 0.78])}
    for method, (params, accs) in plan.items():
        for seed, acc in enumerate(accs):
            write_run(store, method=method, task="digits", seed=seed, test_acc=acc,
                      trainable=params, num_classes=3)
        for seed, acc in enumerate(accs[:2]):
            write_run(store, method=method, task="count", seed=seed, test_acc=acc - 0.2,
                      trainable=params, num_classes=4)
    return store


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return synthetic_store(tmp_path / "runs")


# -- loading and seed statistics ----------------------------------------------------------
def test_load_runs_reads_done_runs_and_derives_costs(store: RunStore) -> None:
    table = load_runs({"cached": store}, GROUPS)
    assert len(table.runs) == 20 and table.skipped == []
    lora = table.runs[(table.runs["method"] == "lora") & (table.runs["task"] == "digits")]
    assert set(lora["seed"]) == {0, 1, 2}
    assert lora["pct_backbone"].iloc[0] == pytest.approx(100 * 37_000 / BACKBONE_PARAMS)
    assert set(table.runs["task_group"]) == {"natural", "structured"}
    assert (table.runs["source"] == "cached").all()


def test_unfinished_and_corrupt_runs_are_left_out(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    write_run(store, method="lora", task="digits", seed=0, test_acc=0.5)
    write_run(store, method="lora", task="digits", seed=1, test_acc=0.5, status="failed")
    bad = write_run(store, method="lora", task="digits", seed=2, test_acc=0.5)
    (bad.path / "summary.json").write_text("{not json")
    table = load_runs({"user": store}, GROUPS)
    assert len(table.runs) == 1
    assert len(table.skipped) == 1 and bad.id in table.skipped[0]


def test_aggregate_mean_std_over_seeds(store: RunStore) -> None:
    agg = aggregate(load_runs({"c": store}, GROUPS).runs)
    assert len(agg) == 8
    row = agg[(agg["task"] == "digits") & (agg["method"] == "lora")].iloc[0]
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["test_acc"] == pytest.approx(0.80)
    assert row["test_acc_std"] == pytest.approx(np.std([0.80, 0.78, 0.82], ddof=1))
    assert row["train_time_s"] == pytest.approx(11.0)
    assert row["ppt"] == pytest.approx(ppt_score(0.80, 38_000))
    assert len(row["run_ids"]) == 3


def test_single_seed_has_no_spread(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    write_run(store, method="ssf", task="digits", seed=0, test_acc=0.7)
    agg = aggregate(load_runs({"c": store}, GROUPS).runs)
    assert agg.iloc[0]["n_seeds"] == 1 and math.isnan(agg.iloc[0]["test_acc_std"])


def test_settings_split_groups_and_are_labelled(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in (0, 1):
        write_run(store, method="lora", task="digits", seed=seed, test_acc=0.7,
                  method_config={"rank": 4})
        write_run(store, method="lora", task="digits", seed=seed, test_acc=0.8,
                  method_config={"rank": 8})
    write_run(store, method="linear", task="digits", seed=0, test_acc=0.5)
    agg = aggregate(load_runs({"c": store}, GROUPS).runs)
    lora = agg[agg["method"] == "lora"].set_index("setting")
    assert sorted(lora.index) == ["rank=4", "rank=8"]
    assert lora.loc["rank=8", "n_seeds"] == 2
    assert lora.loc["rank=8", "test_acc"] == pytest.approx(0.8)
    assert agg[agg["method"] == "linear"]["setting"].iloc[0] == ""


def test_empty_stores_give_empty_tables(tmp_path: Path) -> None:
    table = load_runs({"c": RunStore(tmp_path / "none")}, GROUPS)
    assert table.runs.empty
    assert aggregate(table.runs).empty and multi_task_means(aggregate(table.runs)).empty


def test_curves_and_seed_eval(store: RunStore) -> None:
    runs = load_runs({"c": store}, GROUPS).runs
    lora = runs[(runs["method"] == "lora") & (runs["task"] == "digits")]
    curves = load_curves(lora)
    assert len(curves) == 9 and set(curves["epoch"]) == {1, 2, 3}
    ev = seed_eval(lora["path"])
    assert ev.n_runs == 3 and ev.class_names == ["c0", "c1", "c2"]
    assert ev.confusion.sum() == 90
    assert ev.per_class_acc[0] == pytest.approx(1.0)


# -- cost ---------------------------------------------------------------------------------
def test_ppt_known_values() -> None:
    assert ppt_score(0.9, 0) == pytest.approx(0.9)
    # P/C + 1 = 10 → the accuracy is multiplied by e^-1.
    assert ppt_score(0.8, 9e7) == pytest.approx(0.8 * math.exp(-1))
    assert ppt_score(80.0, 294_912) == pytest.approx(80.0 * math.exp(-math.log10(1.0294912)))
    both = ppt_score(np.array([0.5, 0.5]), np.array([0, 9e7]))
    assert both == pytest.approx([0.5, 0.5 / math.e])


def test_percent_and_human_formats() -> None:
    assert percent_of_backbone(1_000, 100_000) == pytest.approx(1.0)
    assert math.isnan(percent_of_backbone(1, 0))
    assert human_count(294_912) == "294.91k" and human_count(85.8e6) == "85.80M"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(None) == "–"


# -- Pareto -------------------------------------------------------------------------------
def test_pareto_front_hand_made() -> None:
    acc = [0.60, 0.70, 0.65, 0.80, 0.80, 0.75, float("nan")]
    cost = [1, 10, 20, 100, 200, 100, 5]
    #        A   B   C(B better, cheaper)  D   E(D same acc, cheaper)  F(D dominates)  nan
    assert pareto_front(acc, cost).tolist() == [True, True, False, True, False, False, False]


def test_pareto_front_keeps_exact_ties() -> None:
    assert pareto_front([0.5, 0.5], [3, 3]).tolist() == [True, True]
    assert pareto_front([], []).tolist() == []


# -- means over tasks ---------------------------------------------------------------------
def _agg(rows: list[tuple[str, str | None, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"task": t, "task_group": g, "backbone": "b", "method": "m",
                          "setting": "", "setting_key": "k", "test_acc": a}
                         for t, g, a in rows])


def test_group_mean_differs_from_plain_mean_and_says_so() -> None:
    agg = _agg([("digits", "natural", 0.9), ("mnist", "natural", 0.7),
                ("count", "structured", 0.5)])
    row = multi_task_means(agg).iloc[0]
    assert row["plain_mean"] == pytest.approx(0.7)
    assert row["group_mean"] == pytest.approx((0.8 + 0.5) / 2)
    assert row["plain_label"] == "plain mean over 3 tasks"
    assert row["group_label"].startswith("group mean: mean of 2 group means")
    assert "natural 2" in row["group_label"] and "structured 1" in row["group_label"]
    assert row["n_tasks"] == 3 and row["tasks"] == "count, digits, mnist"


def test_unknown_group_gives_plain_mean_only() -> None:
    row = multi_task_means(_agg([("digits", "natural", 0.9), ("mine", None, 0.5)])).iloc[0]
    assert row["plain_mean"] == pytest.approx(0.7)
    assert math.isnan(row["group_mean"]) and row["group_label"] == ""


def test_task_groups_from_vtab_names_and_embedded_suite() -> None:
    assert task_group("/data/vtab-1k/cifar", "cifar", {}) == "natural"
    assert task_group("/data/vtab-1k/cifar100", "cifar100", {}) == "natural"
    assert task_group("/data/vtab-1k/eurosat", "eurosat", {}) == "specialized"
    assert task_group("/data/vtab-1k/dsprites_ori", "dsprites_ori", {}) == "structured"
    assert task_group("embedded:count", "count", GROUPS) == "structured"
    assert task_group("/my/flowers", "flowers", GROUPS) is None
    assert task_group("embedded:eurosat", "eurosat", {}) is None  # embedded ≠ VTAB folder


# -- export -------------------------------------------------------------------------------
def test_export_round_trip(store: RunStore) -> None:
    runs = load_runs({"c": store}, GROUPS).runs
    agg = aggregate(runs)
    means = multi_task_means(agg)
    doc = read_export_json(export_json(agg, runs, means))
    assert doc["protocol"] == PROTOCOL_NOTE
    per_task = doc["per_task"]
    assert len(per_task) == len(agg)
    pd.testing.assert_series_equal(per_task["test_acc"], agg["test_acc"], check_names=False)
    assert per_task["seeds"].tolist() == agg["seeds"].tolist()
    assert len(doc["runs"]) == len(runs) and len(doc["multi_task_means"]) == len(means)
    assert "setting_key" not in doc["runs"] and "path" not in doc["runs"]
    csv = pd.read_csv(io.StringIO(export_csv(agg)))
    assert csv["test_acc"].tolist() == pytest.approx(agg["test_acc"].tolist())
    assert csv["seeds"].iloc[0] == "0;1;2" or csv["seeds"].iloc[0] == "0;1"


def test_export_json_writes_nan_as_null(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    write_run(store, method="ssf", task="digits", seed=0, test_acc=0.7)
    runs = load_runs({"c": store}, GROUPS).runs
    doc = json.loads(export_json(aggregate(runs), runs))
    assert doc["per_task"][0]["test_acc_std"] is None


# -- guided tour --------------------------------------------------------------------------
def test_tour_reads_its_numbers_from_the_runs(store: RunStore) -> None:
    runs = load_runs({"c": store}, GROUPS).runs
    agg = aggregate(runs)
    task = pick_tour_task(agg)
    assert task == "digits"  # three seeds beat count's two
    steps = tour_steps(agg, runs, task, titles={"lora": "LoRA"})
    assert [s.title for s in steps] == ["One task, three ways to adapt", "Accuracy",
                                        "Parameter cost", "The Pareto plot", "Seeds matter",
                                        "One number: PPT"]
    assert "LoRA**: test 80.0 % ± 2.0" in steps[1].text
    assert "On the frontier, cheapest first: linear, bitfit, lora." in steps[3].text
    assert "full is dominated" in steps[3].text and steps[3].figure == "pareto"
    assert steps[4].table.loc[1, "lora"] == pytest.approx(78.0)
    assert "4.0 points" in steps[4].text  # lora's seeds span 78–82


def test_tour_needs_all_three_methods(store: RunStore) -> None:
    agg = aggregate(load_runs({"c": store}, GROUPS).runs)
    assert pick_tour_task(agg[agg["method"] != "full"]) is None


# -- cached runs --------------------------------------------------------------------------
def test_shipped_flatness_records_are_part_of_the_recipe(tmp_path, monkeypatch) -> None:
    """Regeneration measures the flatness records the Flatness page opens on, for the
    runs that ship with weights, and only where a record with the settings is missing."""
    from vpeft_viz.analysis import flatness
    from vpeft_viz.runs import cached

    ids = cached.flatness_run_ids(cached.planned_runs())
    assert "digits-bi-adaptformer-s0" in ids and "digits-bi-adaptformer-b2-s0" in ids
    assert all(i.split("-s")[-1] == "0" for i in ids)
    assert not any("-full-" in i or "-linear-" in i for i in ids)
    store = RunStore(tmp_path)
    for run_id, weights in (("a", True), ("b", False), ("c", True)):
        run = store.create({"method": "lora"}, run_id=run_id)
        if weights:
            run.weights_path.write_bytes(b"w")
    seen = []

    def fake_compute(path, settings):
        seen.append((path.name, settings.images, settings.grid_2d))
        return {}

    monkeypatch.setattr(flatness, "compute_flatness", fake_compute)
    monkeypatch.setattr(flatness, "load_record",
                        lambda path, settings: {} if path.name == "c" else None)
    settings = flatness.FlatnessSettings.from_strings(cached.FLATNESS_SETTINGS)
    assert flatness.measure_missing(store, ["a", "b", "c"], settings) == ["a"]
    assert seen == [("a", 64, 7)]


def test_regenerate_swaps_in_resumes_and_drops_big_weights(tmp_path, monkeypatch) -> None:
    from vpeft_viz import backbones
    from vpeft_viz.runs import cached, execute

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.setattr(backbones, "EMBEDDED_WEIGHTS", weights)
    calls = []

    def fake_execute(run, callbacks=None):
        cfg = run.config
        calls.append(run.id)
        big = cfg["method"] == "full"
        run.weights_path.write_bytes(b"\0" * (2_000_000 if big else 100))
        summary = {"run_id": run.id, "method": cfg["method"], "test_acc": 0.5,
                   "weight_bytes": run.weights_path.stat().st_size}
        run.write_summary(summary)
        run.set_status("done")
        return summary

    monkeypatch.setattr(execute, "execute_run", fake_execute)
    out = tmp_path / "cached_runs"
    (out / "stale-run").mkdir(parents=True)
    recipe = [("linear", "digits", (0, 1), 10), ("full", "count", (0,), 10)]
    seen = []
    manifest = cached.regenerate(out, recipe=recipe, progress=lambda *a: seen.append(a))
    assert calls == ["digits-linear-s0", "digits-linear-s1", "count-full-s0"]
    assert manifest["runs"] == calls and manifest["pretrained"] is True
    assert not (out / "stale-run").exists() and not (tmp_path / ".cached_runs.partial").exists()
    assert (out / "README.md").is_file() and (out / "manifest.json").is_file()
    full = RunStore(out).get("count-full-s0")
    assert not full.weights_path.exists()
    assert full.summary()["weights_shipped"] is False
    assert full.summary()["weight_bytes"] == 2_000_000
    assert RunStore(out).get("digits-linear-s0").summary()["weights_shipped"] is True
    assert seen[-1][:2] == (3, 3)

    # An interrupted regeneration keeps the runs it finished.
    partial = tmp_path / ".cached_runs.partial"
    partial.mkdir()
    shutil.copytree(out / "digits-linear-s0", partial / "digits-linear-s0")
    calls.clear()
    cached.regenerate(out, recipe=recipe)
    assert calls == ["digits-linear-s1", "count-full-s0"]

    # --update starts from the shipped store: identical runs are kept, a run made under
    # other method settings (an older default) is trained again.
    calls.clear()
    store = RunStore(out)
    cfg_path = out / "digits-linear-s1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["method_config"]["not_a_default_any_more"] = 1
    cfg_path.write_text(json.dumps(cfg))
    manifest = cached.regenerate(out, recipe=recipe, update=True)
    assert calls == ["digits-linear-s1"]
    assert manifest["trained"] == ["digits-linear-s1"]
    assert manifest["kept"] == ["digits-linear-s0", "count-full-s0"]
    assert sorted(r.id for r in store.list()) == sorted(manifest["runs"])


def test_regenerate_refuses_random_init_unless_quick(tmp_path, monkeypatch) -> None:
    from vpeft_viz import backbones
    from vpeft_viz.runs import cached

    monkeypatch.setattr(backbones, "EMBEDDED_WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match="weights missing"):
        cached.regenerate(tmp_path / "out")
    assert [r["run_id"] for r in cached.planned_runs(quick=True)][:2] == [
        "digits-linear-s0", "digits-full-s0"]
    assert all(r["epochs"] == 1 for r in cached.planned_runs(quick=True))
    # every task × every method's declared seeds, plus the declared variants
    from vpeft_viz.methods import get_method_class, method_names

    per_task = sum(len(get_method_class(m).cached_seeds) for m in method_names())
    assert len(cached.planned_runs()) == len(cached.TASKS) * per_task + len(
        cached.variant_specs())
    assert {r["run_id"] for r in cached.planned_runs()} >= {
        "count-lora-s1", "count-full-s0", "digits-sct-s0", "retinopathy-spt-adapter-s0"}


def test_shared_settings_are_named_where_they_depart_or_vary_within_a_method() -> None:
    """20-epoch few-shot runs say epochs=20; the many 10-epoch groups stay unlabelled; a
    3-epoch LoRA beside a 10-epoch one is told apart; a tie names both."""
    from vpeft_viz.analysis.compare import setting_labels

    def key(method, epochs, **cfg):
        return json.dumps({"method": method, "train.epochs": epochs,
                           **{f"method_config.{k}": v for k, v in cfg.items()}},
                          sort_keys=True)

    many = [key(m, 10) for m in ("linear", "lora", "ssf", "bitfit", "vpt-deep")]
    few = [key("pvp", 20, init=i) for i in ("random", "pretrained")]
    labels = setting_labels([*many, *few])
    assert all(labels[k] == "" for k in many)
    assert [labels[k] for k in few] == ["epochs=20, init=random", "epochs=20, init=pretrained"]
    mine, shipped = key("lora", 3), key("lora", 10)
    labels = setting_labels([*many, *few, mine])
    assert labels[mine] == "epochs=3" and labels[shipped] == "epochs=10"
    assert labels[key("ssf", 10)] == ""
    tie = setting_labels([mine, shipped])
    assert tie[mine] == "epochs=3" and tie[shipped] == "epochs=10"
    # a value only your store has names the entry on every group, the shipped ones too
    stores = {k: {"cached"} for k in [*many, *few]} | {mine: {"user"}}
    labels = setting_labels([*many, *few, mine], stores)
    assert labels[key("ssf", 10)] == "epochs=10" and labels[mine] == "epochs=3"
    # your 20-epoch few-shot run has a value the shipped store has too: departures only
    yours = key("pvp", 20, init="random")
    labels = setting_labels([*many, *few], {k: {"cached"} for k in [*many, *few]}
                            | {yours: {"cached", "user"}})
    assert labels[key("ssf", 10)] == "" and labels[yours] == "epochs=20, init=random"


def test_runs_record_the_learning_rate_they_used_and_old_null_ones_read_as_then(vtab_task):
    """A config records the learning rate the run used, so changing a method's default
    later cannot change what an old run says; a stored null (older runs) reads as the
    default of its day, for the recipe check and for Compare's groups alike."""
    from vpeft_viz.analysis.compare import _setting
    from vpeft_viz.methods import get_method_class
    from vpeft_viz.runs.execute import make_run_config
    from vpeft_viz.runs.recipe import canonical_config, same_recipe

    cfg = make_run_config(method="linear", data=str(vtab_task))
    assert cfg["train"]["lr"] == get_method_class("linear").default_lr_on(None)
    old = {**cfg, "train": {**cfg["train"], "lr": None}}
    old["backbone"] = {k: v for k, v in cfg["backbone"].items() if k != "weights"}
    assert canonical_config(old)["train"]["lr"] == 1e-2
    assert canonical_config({**old, "method": "lora"})["train"]["lr"] == 1e-3
    weights = canonical_config(old)["backbone"]["weights"]
    then = {**cfg, "train": {**cfg["train"], "lr": 1e-2},
            "backbone": {**cfg["backbone"], "weights": weights}}
    assert same_recipe(old, then) and _setting(old, "cpu") == _setting(then, "cpu")
    assert not same_recipe(old, {**then, "train": {**then["train"], "lr": 3e-2}})
