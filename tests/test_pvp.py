"""PVP (vpeft_viz/methods/pvp.py) and its source runs (vpeft_viz/runs/sources.py): prompts
loaded from a source exactly, the shape checks, the recorded identity and similarity, a
named source and the default source trained once and found again, the pooled embedded
task, and the shipped recipe's few-shot variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpeft_viz.config import ConfigError
from vpeft_viz.methods import attach_method, count_parameters, create_method
from vpeft_viz.methods.pvp import prompt_cosine
from vpeft_viz.runs import sources
from vpeft_viz.runs.execute import execute_run, make_run_config
from vpeft_viz.runs.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")


def source_weights(depth: int = 2, p: int = 10, width: int = 48, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.prompts": torch.randn(p, width, generator=g) for i in range(depth)}


def test_prompts_start_from_the_source_and_count_as_vpt_deep(tiny_vit, make_tiny_vit):
    pvp = create_method("pvp")
    weights = source_weights()
    pvp.load_source(weights, {"run_id": "src"})
    attach_method(tiny_vit, pvp)
    for i, block in enumerate(tiny_vit.blocks):
        assert torch.equal(block.prompts.detach(), weights[f"blocks.{i}.prompts"])
    vpt = make_tiny_vit()
    attach_method(vpt, create_method("vpt-deep"))
    assert count_parameters(tiny_vit, pvp) == count_parameters(vpt, create_method("vpt-deep"))

    with torch.no_grad():  # "training": move the prompts, then read what the run stores
        for block in tiny_vit.blocks:
            block.prompts.add_(torch.randn_like(block.prompts))
    arts = pvp.artifacts(tiny_vit)
    initial = np.stack([arts[f"initial/{i}"] for i in range(2)])
    tuned = np.stack([arts[f"prompts/{i}"] for i in range(2)])
    assert np.allclose(initial, np.stack([w.numpy() for w in weights.values()]))
    manual = [[float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
               for a, b in zip(li, lt)] for li, lt in zip(initial, tuned)]
    assert np.allclose(arts["cosine"], manual) and arts["cosine"].shape == (2, 10)
    assert np.allclose(arts["change"], [np.linalg.norm(t - i) / np.linalg.norm(i)
                                        for i, t in zip(initial, tuned)])
    assert bool(arts["from_source"]) and pvp.state()["source"] == {"run_id": "src"}
    assert np.allclose(prompt_cosine(initial, initial), 1.0)


def test_random_init_asks_for_no_source_and_keeps_vpt_init(tiny_vit):
    pvp = create_method("pvp", {"init": "random"})
    assert pvp.source_request() is None
    torch.manual_seed(0)
    attach_method(tiny_vit, pvp)
    arts = pvp.artifacts(tiny_vit)
    assert not bool(arts["from_source"]) and np.allclose(arts["cosine"], 1.0)
    req = create_method("pvp", {"source": "my-run", "num_tokens": 5}).source_request()
    assert (req.method, req.method_config, req.run) == ("vpt-deep", {"num_tokens": 5}, "my-run")
    assert create_method("pvp").source_request().run is None  # 'pool': the default source


def test_sources_that_do_not_fit_are_refused(tiny_vit):
    pvp = create_method("pvp")
    with pytest.raises(ConfigError, match="set pvp.num_tokens=5"):
        pvp.load_source(source_weights(p=5), {"run_id": "src"})
    with pytest.raises(ConfigError, match="stores no VPT-deep prompts"):
        pvp.load_source({"head.weight": torch.zeros(3, 3)}, {"run_id": "src"})
    with pytest.raises(ConfigError, match="not in every layer"):
        pvp.load_source({"blocks.1.prompts": torch.zeros(10, 48)}, {"run_id": "src"})
    pvp.load_source(source_weights(depth=3), {"run_id": "deep"})
    with pytest.raises(ConfigError, match="3 layers of prompts 48 wide; this backbone needs 2"):
        attach_method(tiny_vit, pvp)
    with pytest.raises(ConfigError, match="pvp.source must be"):
        create_method("pvp", {"source": " "})


def test_training_without_the_source_loaded_is_refused(tiny_vit):
    pvp = create_method("pvp")
    attach_method(tiny_vit, pvp)
    with pytest.raises(RuntimeError, match="no source prompts were loaded"):
        pvp.train_rounds(tiny_vit, lambda: None)


# -- source runs, end to end on a tiny folder task ----------------------------------------
def tiny_run(store: RunStore, method: str, data: Path, settings: dict | None = None,
             seed: int = 0, **train) -> dict:
    cfg = make_run_config(method=method, data=str(data), pretrained=False,
                          method_config=settings,
                          train={"epochs": 1, "batch_size": 8, "seed": seed, **train})
    run = store.create(cfg)
    return execute_run(run)


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    import vpeft_viz.runs as run_stores

    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(tmp_path / "user"))
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "cached")
    return RunStore(tmp_path / "user")


def test_a_named_vpt_deep_run_is_the_source(store, vtab_task):
    src = tiny_run(store, "vpt-deep", vtab_task)
    summary = tiny_run(store, "pvp", vtab_task, {"source": src["run_id"]}, shots=2)
    run = store.get(summary["run_id"])
    identity = run.method_state()["source"]
    assert identity["run_id"] == src["run_id"] and identity["store"] == "same store"
    assert identity["method"] == "vpt-deep" and not identity["default"]
    assert summary["source_run"] == src["run_id"] and summary["train_size"] == 6
    arts = run.load_artifact("method.npz")
    stored = store.get(src["run_id"]).load_weights()
    depth = len([k for k in stored if k.endswith(".prompts")])
    for i in range(depth):
        assert np.array_equal(arts[f"initial/{i}"], stored[f"blocks.{i}.prompts"].numpy())
    assert arts["cosine"].shape == (depth, 10)
    assert identity["weights_sha256"] == sources.weights_digest(stored)


def test_named_sources_that_cannot_serve_fail_before_a_run_exists(store, vtab_task):
    lora = tiny_run(store, "lora", vtab_task)
    small = tiny_run(store, "vpt-deep", vtab_task, {"num_tokens": 5})
    for source, needle in [("nope", "no run of that id"), (lora["run_id"], "is a lora run"),
                           (small["run_id"], "set pvp.num_tokens=5"),
                           (str(store.root / "x" / "y"), "not a run directory")]:
        with pytest.raises(ConfigError, match=needle):
            make_run_config(method="pvp", data=str(vtab_task), pretrained=False,
                            method_config={"source": source})
    with pytest.raises(ConfigError, match="was trained on backbone"):
        make_run_config(method="pvp", data=str(vtab_task), pretrained=True,
                        method_config={"source": small["run_id"], "num_tokens": 5})


def test_the_default_source_is_trained_once_then_found(store, vtab_task, monkeypatch):
    """The pooled embedded source, stood in for by the tiny folder task (the real pool has
    7,200 images): trained by the first pre-trained run, in its store, found by the next."""
    real = sources.default_source

    def on_the_folder(cfg):
        got = real(cfg)
        if got is None:
            return None
        _, config = got
        config = make_run_config(method=config["method"], data=str(vtab_task),
                                 method_config=config["method_config"], pretrained=False,
                                 train={**config["train"], "batch_size": 8})
        return "pool-stand-in-vpt-deep-s0", config

    monkeypatch.setattr(sources, "default_source", on_the_folder)
    first = tiny_run(store, "pvp", vtab_task, {"source_epochs": 1}, shots=2)
    second = tiny_run(store, "pvp", vtab_task, {"source_epochs": 1}, seed=1, shots=2)
    control = tiny_run(store, "pvp", vtab_task, {"init": "random"}, shots=2)
    assert first["source_run"] == second["source_run"] == "pool-stand-in-vpt-deep-s0"
    assert "source_run" not in control
    src = store.get("pool-stand-in-vpt-deep-s0")
    assert src.status()["status"] == "done" and src.config["method"] == "vpt-deep"
    states = [store.get(s["run_id"]).method_state()["source"] for s in (first, second)]
    assert [s["trained_now"] for s in states] == [True, False]
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    assert store.get(control["run_id"]).method_state() == {}


def test_default_source_config_pools_the_other_tasks():
    cfg = make_run_config(method="pvp", data="embedded:count", method_config={"num_tokens": 4},
                          train={"seed": 3, "shots": 2})
    run_id, config = sources.default_source(cfg)
    assert config["data"]["spec"] == "embedded:pool-except-count"
    assert config["method"] == "vpt-deep" and config["method_config"]["num_tokens"] == 4
    assert config["train"]["epochs"] == 5 and config["train"]["seed"] == 0
    assert config["train"]["shots"] is None  # the source trains on the whole pool
    assert run_id.startswith("pool-except-count-vpt-deep-s0-")
    again, _ = sources.default_source({**cfg, "train": {**cfg["train"], "seed": 4}})
    assert again == run_id  # the downstream seed and split do not change the source
    other, _ = sources.default_source(make_run_config(
        method="pvp", data="embedded:count", method_config={"source_epochs": 2}))
    assert other != run_id
    assert sources.default_source(make_run_config(
        method="pvp", data="embedded:count", method_config={"init": "random"})) is None


def test_pooled_task_unions_labels_without_the_left_out_task(tmp_path, monkeypatch):
    from conftest import write_vtab_task

    from vpeft_viz.data import check_data_spec, resolve_data
    from vpeft_viz.data.embedded import pool
    from vpeft_viz.data.embedded.registry import UnknownTaskError

    folders = {"a": write_vtab_task(tmp_path / "a", num_classes=3),
               "b": write_vtab_task(tmp_path / "b", num_classes=2, seed=1),
               "c": write_vtab_task(tmp_path / "c", num_classes=2, seed=2)}

    class Meta:
        def __init__(self, n):
            self.class_names = tuple(f"k{i}" for i in range(n))

    monkeypatch.setattr(pool, "EMBEDDED_TASKS", {"a": Meta(3), "b": Meta(2), "c": Meta(2)})
    monkeypatch.setattr(pool, "ensure_task", lambda name, progress=None: folders[name])
    task = resolve_data("embedded:pool-except-b")
    assert task.num_classes == 5 and task.class_names == [
        "a/k0", "a/k1", "a/k2", "c/k0", "c/k1"]
    for split, n in (("train", 24), ("val", 9), ("test", 9)):
        assert len(task.splits[split]) == 2 * n
        assert not any(str(s.path).startswith(str(folders["b"])) for s in task.splits[split])
    assert {s.label for s in task.splits["train"]} == {0, 1, 2, 3, 4}
    assert pool.pool_members("pool") == ("a", "b", "c")
    with pytest.raises(UnknownTaskError, match="cannot leave 'zz' out"):
        check_data_spec("embedded:pool-except-zz")


def test_shipped_recipe_has_few_shot_variants_of_both_inits(tmp_path):
    from vpeft_viz.runs import cached

    specs = [s for s in cached.variant_specs() if s["method"] == "pvp"]
    keys = {(s["settings"]["init"], s["train"]["shots"], s["task"], s["seed"]) for s in specs}
    assert len(keys) == len(specs) == 2 * 5 * 3 * 3
    assert {s["epochs"] for s in specs} == {20}
    spec = next(s for s in specs if s["run_id"] == "count-pvp-random-k4-s2")
    cfg = cached._run_config(spec, pretrained=True)
    assert cfg["train"]["shots"] == 4 and cfg["train"]["seed"] == 2
    assert cfg["method_config"]["init"] == "random" and cfg["train"]["epochs"] == 20
    quick = [s for s in cached.variant_specs(quick=True) if s["method"] == "pvp"]
    assert {s["seed"] for s in quick} == {0} and {s["epochs"] for s in quick} == {1}


def test_update_keeps_runs_made_before_shots_existed_and_their_sources(tmp_path, monkeypatch):
    from vpeft_viz import backbones
    from vpeft_viz.runs import cached, execute

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.setattr(backbones, "EMBEDDED_WEIGHTS", weights)
    calls = []

    def fake_execute(run, callbacks=None):
        calls.append(run.id)
        if run.config["method"] == "pvp":  # its source, trained into the same store
            src = RunStore(run.path.parent).create(run.config, run_id="pool-src")
            src.set_status("done")
        run.weights_path.write_bytes(b"\0" * 100)
        summary = {"run_id": run.id, "test_acc": 0.5, "weight_bytes": 100,
                   **({"source_run": "pool-src"} if run.config["method"] == "pvp" else {})}
        run.write_summary(summary)
        run.set_status("done")
        return summary

    monkeypatch.setattr(execute, "execute_run", fake_execute)
    out = tmp_path / "cached_runs"
    recipe = [("linear", "digits", (0,), 10), ("pvp", "count", (0,), 10)]
    manifest = cached.regenerate(out, recipe=recipe)
    assert manifest["sources"] == ["pool-src"] and (out / "pool-src").is_dir()
    # a run recorded before train.shots existed: the same recipe, kept by --update
    path = out / "digits-linear-s0" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["train"]["shots"], cfg["train"]["shots_seed"]
    path.write_text(json.dumps(cfg))
    calls.clear()
    manifest = cached.regenerate(out, recipe=recipe, update=True)
    assert calls == [] and manifest["sources"] == ["pool-src"]
    assert (out / "pool-src").is_dir()


def test_curves_and_paired_gains_over_seeds():
    import pandas as pd

    from vpeft_viz.analysis import pvp as ana

    rows = []
    for init, base in (("pretrained", 0.4), ("random", 0.3)):
        for shots in (1, 4, None):
            for seed in (0, 1, 2):
                setting = {"method": "pvp", "method_config.init": init,
                           "method_config.num_tokens": 10, "train.epochs": 20 if shots else 10,
                           **({"train.shots": shots} if shots else {})}
                acc = base + 0.02 * (shots or 40) + (0.01 * seed if init == "pretrained" else 0)
                rows.append({"run_id": f"{init}-{shots}-{seed}", "method": "pvp", "task": "t",
                             "backbone": "b", "seed": seed, "test_acc": acc, "val_acc": acc,
                             "setting_key": json.dumps(setting, sort_keys=True),
                             "train_size": 6 * (shots or 800)})
    rows.append({**rows[0], "run_id": "other-task", "task": "u"})
    table = pd.DataFrame(rows)
    curves = ana.shot_curves(table, task="t", backbone="b")
    assert len(curves) == 6 and curves["variant"].nunique() == 1
    p1 = curves[(curves["init"] == "pretrained") & (curves["shots"] == 1)].iloc[0]
    assert p1["n_seeds"] == 3 and p1["test_acc"] == pytest.approx(0.43)
    assert p1["test_acc_std"] == pytest.approx(0.01) and p1["train_size"] == 6
    full = curves[curves["shots"].isna()]
    assert set(full["init"]) == {"pretrained", "random"} and set(full["epochs"]) == {10}
    gain = ana.paired_gain(table, task="t", backbone="b")
    assert list(gain["shots"]) == [1, 4] and list(gain["n_pairs"]) == [3, 3]
    assert gain["gain"].tolist() == pytest.approx([0.11, 0.11])
    assert gain["gain_std"].tolist() == pytest.approx([0.01, 0.01])
    overview = ana.gain_overview(table, ["t", "u"], backbone="b")
    assert list(overview.index) == ["t"] and overview.loc["t", 4] == pytest.approx(11.0)


def test_vpt_deep_on_the_whole_split_is_the_random_reference():
    import pandas as pd

    from vpeft_viz.analysis import pvp as ana

    def row(method, acc, seed, **setting):
        key = json.dumps({"method": method, "train.epochs": 10, **setting}, sort_keys=True)
        return {"run_id": f"{method}-{acc}", "method": method, "task": "t", "backbone": "b",
                "seed": seed, "test_acc": acc, "val_acc": acc, "setting_key": key}

    table = pd.DataFrame([row("vpt-deep", 0.4, 0, **{"method_config.num_tokens": 10}),
                          row("vpt-deep", 0.5, 1, **{"method_config.num_tokens": 10}),
                          row("vpt-deep", 0.9, 0, **{"method_config.num_tokens": 50}),
                          row("vpt-deep", 0.9, 0, **{"method_config.num_tokens": 10,
                                                     "train.shots": 4})])
    ref = ana.vpt_deep_reference(table, task="t", backbone="b",
                                 variant=json.dumps({"method_config.num_tokens": 10}))
    assert len(ref) == 1 and ref["n_seeds"][0] == 2
    assert ref["test_acc"][0] == pytest.approx(0.45)
    assert ana.vpt_deep_reference(table, task="t", backbone="b", variant=json.dumps(
        {"method_config.num_tokens": 50}))["test_acc"][0] == pytest.approx(0.9)
