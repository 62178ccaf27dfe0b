"""The GPU benchmark suite's CPU smoke configuration: every registered method runs through
the engine, the plain reference loop and the FLOP counter (the figures mean nothing here)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from vpeft_viz.methods import method_names

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its own imports resolved from that folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def gpu_suite():
    return load_benchmark("gpu_suite")


def test_smoke_configuration_covers_every_method(gpu_suite):
    result = gpu_suite.run(gpu_suite.parse(["--smoke"]))
    assert result["device"] == "cpu" and result["img_size"] == 32
    assert [r["method"] for r in result["rows"]] == method_names()
    for row in result["rows"]:
        assert row["engine_images_per_s"] > 0 and row["plain_images_per_s"] > 0
        assert row["step_flops"] > 0 and math.isfinite(row["engine_vs_plain"])
        assert row["mfu"] is None  # no bf16 peak on a CPU
    # full fine-tuning computes weight gradients of the whole backbone: more FLOPs per step
    flops = {r["method"]: r["step_flops"] for r in result["rows"]}
    assert flops["full"] > flops["lora"] > 0


@pytest.fixture(scope="module")
def inside_bench():
    return load_benchmark("inside")


def test_inside_smoke_configuration_times_attributions_and_cka(inside_bench):
    """The Inside benchmark's CPU smoke configuration (2 shipped runs, 16 images): both
    timings are recorded, and the CKA of a tuned run is below 1 somewhere (the figures
    mean nothing here)."""
    import torch

    threads = torch.get_num_threads()
    try:
        result = inside_bench.run(inside_bench.parse(["--smoke"]))
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1 and len(result["runs"]) == 2
    assert result["attributions"]["median_s"] > 0 and result["cka"]["median_s"] > 0
    assert result["attributions"]["metrics_s"][0] > 0  # the trust metrics are in the time
    for values in result["cka"]["cka_tokens"].values():
        assert len(values) == len(result["cka"]["layers"]) and min(values) < 1


def test_live_recipe_chooses_on_validation_from_complete_grid_points(tmp_path):
    """The learning rate is chosen by the suite's mean validation accuracy (never test), only
    among rates run on every task; its sweep spec is one the sweep command accepts."""
    module = load_benchmark("live_recipe")
    from vpeft_viz.runs.sweep.spec import expand, load_spec

    def r(val, test):
        return {"val_acc": val, "test_acc": test, "train_time_s": 1.0}

    runs = {"lora": {1e-3: {"a": r(0.5, 0.9), "b": r(0.5, 0.9)},   # best on test only
                     1e-2: {"a": r(0.7, 0.4), "b": r(0.6, 0.4)},   # best on validation
                     3e-2: {"a": r(0.9, 0.9)}}}                    # task b missing
    chosen, tables = module.choose(runs, ["lora", "ssf"], ["a", "b"])
    assert chosen == {"lora": {"lr": 1e-2, "val_mean": pytest.approx(0.65),
                               "test_mean": pytest.approx(0.4), "rates_compared": 2}}
    assert list(tables["lora"]) == ["0.001", "0.01"]
    path = tmp_path / "s.toml"
    path.write_text(module.spec_text("s", "lora", (1e-3, 1e-2), ["digits", "count"], None,
                                     "bf16", 10))
    planned = expand(load_spec(path))
    assert len(planned) == 4 and {p.config["train"]["lr"] for p in planned} == {1e-3, 1e-2}


def test_live_recipe_bars_follow_the_issue():
    module = load_benchmark("live_recipe")
    bars = module.targets({"a": {"test_acc": 0.92, "chance": 0.5},     # capped at 0.95
                           "b": {"test_acc": 0.14, "chance": 0.10},    # 2 x chance wins
                           "c": {"test_acc": 0.60, "chance": 0.10}})   # pixels + 5 wins
    assert bars == pytest.approx({"a": 0.95, "b": 0.20, "c": 0.65})

    def r(acc):
        return {"val_acc": acc, "test_acc": acc}

    tables = {m: {"0.01": {"per_task": {"a": r(acc), "b": r(acc)}}}
              for m, acc in (("linear", 0.5), ("full", 0.6), ("lora", 0.96), ("ssf", 0.7))}
    chosen = {m: {"lr": 0.01} for m in tables}
    check = module.suite_check(chosen, tables, ["a", "b"],
                               {"a": {"test_acc": 0.92, "chance": 0.5},
                                "b": {"test_acc": 0.14, "chance": 0.1}})
    assert all(t["pass"] for t in check["tasks"].values())
    assert check["lora_mean_ge_0.70"] and not check["linear_mean_ge_0.55"]
    assert check["vtab_pattern"]


def test_live_recipe_seed_check_reports_spread_and_pattern_per_seed():
    """Seeds report the suite's test mean per seed, its spread, and the VTAB pattern per
    seed and on the means; a seed missing a run is left out rather than averaged short."""
    module = load_benchmark("live_recipe")

    def runs(acc):
        return {"a": {"test_acc": acc}, "b": {"test_acc": acc}}

    by_seed = {0: {"linear": runs(0.5), "full": runs(0.8), "lora": runs(0.7), "ssf": runs(0.6)},
               1: {"linear": runs(0.5), "full": runs(0.7), "lora": runs(0.8), "ssf": runs(0.6)},
               2: {"linear": runs(0.5), "full": runs(0.7), "lora": {"a": {"test_acc": 0.9}},
                   "ssf": runs(0.6)}}
    check = module.seed_check(by_seed, ["a", "b"])
    assert check["seeds"] == [0, 1]
    assert check["methods"]["full"]["mean"] == pytest.approx(0.75)
    assert check["methods"]["full"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert check["full_minus_best_peft"] == {"0": pytest.approx(0.1), "1": pytest.approx(-0.1)}
    assert check["vtab_pattern_per_seed"] == {"0": False, "1": True}
    assert check["vtab_pattern_on_seed_means"] is True   # full 0.75 <= LoRA 0.75
    assert module.vtab_pattern({"linear": 0.5, "full": 0.6}) is None


def test_live_vs_plain_loop_does_the_engine_runs_work(tmp_path):
    """The plain reference loop trains the run config's model and recipe on the decoded
    splits (here one epoch): it learns, and it reads the same learning rate as the engine."""
    module = load_benchmark("live_vs_plain")
    from vpeft_viz.runs.execute import make_run_config

    cfg = make_run_config(method="lora", data="embedded:faces", train={"epochs": 1})
    classes, data = module.decoded_splits("embedded:faces", cfg["backbone"]["name"], 0)
    assert classes == 2 and len(data["train"][1]) == 800
    assert data["train"][0].shape[1:] == (3, 32, 32)
    res = module.plain_run("lora", cfg, classes, data)
    assert res["wall_s"] > 0 and 0.6 < res["test_acc"] <= 1.0
