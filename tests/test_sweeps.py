"""Sweeps: the spec and its expansion, planning against the store, the Sweeps view's maths,
and a real local Ray cluster (two worker processes) against the local job queue.

The cluster test (marked ``ray``; deselect with ``-m "not ray"``) runs the same six runs
(linear and LoRA × three seeds, one epoch on an embedded task) through both backends into
two stores and finds the same accuracies and the same weights bytes; during the Ray sweep it
SIGKILLs the worker process training a run and finds that run retried and done, with exactly
one run directory per planned run; running either sweep again adds no run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _sweep_data import write_fake_sweep

from vpeft_viz.analysis import sweeps as view
from vpeft_viz.cli import main as cli_main
from vpeft_viz.runs import RunStore, queue
from vpeft_viz.runs.recipe import config_hash, recipe
from vpeft_viz.runs.store import RunStoreError
from vpeft_viz.runs.sweep import SpecError, expand, load_spec, parse_spec, plan_sweep, run_sweep
from vpeft_viz.runs.sweep.manifest import read_manifest, write_manifest
from vpeft_viz.runs.sweep.plan import create_run, execute_claimed

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BASE = 'name = "t"\ntasks = ["digits"]\nmethods = ["linear", "lora"]\nseeds = [0]\n'


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


# -- the spec -----------------------------------------------------------------------------------
def test_example_spec_expands_in_grid_order():
    spec = load_spec(ROOT / "examples" / "sweep.toml")
    runs = expand(spec)
    # 2 tasks × (linear + lora at 2 ranks) × 3 seeds
    assert len(runs) == 18 and len({r.run_id for r in runs}) == 18
    assert [(r.task, r.method, r.method_settings.get("rank"), r.seed) for r in runs[:6]] == [
        ("digits", "linear", None, 0), ("digits", "linear", None, 1),
        ("digits", "linear", None, 2), ("digits", "lora", 4, 0), ("digits", "lora", 4, 1),
        ("digits", "lora", 4, 2)]
    lora8 = next(r for r in runs if r.method_settings.get("rank") == 8)
    assert lora8.config["method_config"]["rank"] == 8
    assert lora8.config["train"]["epochs"] == 10 and lora8.config["data"]["spec"] == (
        "embedded:digits")
    assert spec.ray.num_cpus == 1 and spec.ray.num_gpus == 0 and spec.ray.max_retries == 2


def test_the_documented_spec_parses():
    text = (ROOT / "docs" / "sweeps.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    import tomllib

    spec = parse_spec(tomllib.loads(block), source="docs/sweeps.md")
    assert spec.methods == ["linear", "lora"] and spec.ray.num_gpus == 0.25
    assert spec.tasks[:2] == ["embedded:digits", "embedded:count"]


def test_relative_folders_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    from conftest import write_vtab_task

    write_vtab_task(tmp_path / "specs" / "colours", sizes=(6, 3, 3))
    path = tmp_path / "specs" / "s.toml"
    path.write_text('tasks = ["colours"]\nmethods = ["linear"]\nseeds = [0]\n'
                    'pretrained = false\ncheckpoint = "w.safetensors"\n')
    monkeypatch.chdir(tmp_path)  # not where the spec is
    spec = load_spec(path)
    assert spec.tasks == [str(tmp_path / "specs" / "colours")]
    assert spec.checkpoint == str(tmp_path / "specs" / "w.safetensors")
    assert spec.name == "s"


def test_run_ids_follow_the_recipe_not_the_versions():
    a, b = expand(parse_spec(dict(tasks=["digits"], methods=["lora"], seeds=[3], name="x")))[0], \
        expand(parse_spec(dict(tasks=["embedded:digits"], methods=["lora"], seeds=[3],
                               name="y")))[0]
    assert a.run_id == b.run_id and a.run_id.startswith("lora-digits-s3-")
    other = dict(a.config, versions={"torch": "0"}, data={**a.config["data"], "warnings": ["w"]})
    assert config_hash(other) == a.config_hash  # where it ran does not make it another run
    changed = dict(a.config, train={**a.config["train"], "lr": 0.5})
    assert config_hash(changed) != a.config_hash
    assert set(recipe(a.config)) == {"method", "method_config", "backbone", "train", "data"}


@pytest.mark.parametrize("text, message", [
    (BASE + "method = 1\n", "unknown key(s) method"),
    ('tasks = ["digits"]\nmethods = ["lora"]\n', "missing 'seeds'"),
    (BASE.replace('"lora"', '"lorra"'), "unknown method 'lorra'"),
    (BASE.replace('"digits"', '"digts"'), "task 'digts' is neither an embedded task"),
    (BASE + "[set.vpt-deep]\nnum_tokens = 5\n", "'vpt-deep' is not among the methods"),
    (BASE + "[set.lora]\nrnk = [4, 8]\n", "unknown lora setting(s) rnk"),
    (BASE + "[set.lora]\nrank = [0, 8]\n", "lora.rank must be in [1, 1024], got 0"),
    (BASE + "[train]\nseed = 1\n", "[train] must not set seed"),
    (BASE + "[train]\nepochs = []\n", "'epochs' is an empty list"),
    (BASE + "[train]\nlr = [0.01, 1e-2]\n", "lists a value more than once"),
    (BASE + "[train]\nepochs = [1, 1.0]\n", "two grid values give one config"),
    (BASE + "[train]\noptimizer = \"adam\"\n", "train.optimizer must be one of adamw, sgd"),
    (BASE.replace("[0]", "[0, 0]"), "'seeds' lists 0 more than once"),
    (BASE.replace("[0]", '["a"]'), "every entry of 'seeds' must be a int"),
    (BASE.replace('"t"', '"a/b"'), "name must be letters"),
    (BASE + "[ray]\ngpus = 1\n", "[ray]: unknown key(s) gpus"),
    (BASE + "[ray]\nnum_gpus = 1.5\n", "num_gpus above 1 must be a whole number"),
    (BASE + "[ray]\nmax_retries = -1\n", "max_retries must be an integer in [0, 100]"),
    (BASE + "backbones = [\"vit_base_patch16_2244\"]\n", "backbone: unknown"),
    ("tasks = [", "not valid TOML"),
])
def test_bad_specs_name_the_file_and_what_to_fix(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as e:
        expand(load_spec(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_cli_reports_a_bad_spec_in_one_line(tmp_path, capsys):
    assert cli_main(["sweep", str(write_spec(tmp_path, BASE + "nope = 1\n")),
                     "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unknown key(s) nope" in err[0]
    assert not (tmp_path / "s").exists()


# -- planning against the store --------------------------------------------------------------
def test_plan_keeps_done_runs_restarts_failed_ones_and_moves_attempts_aside(tmp_path, capsys):
    store = RunStore(tmp_path / "store")
    spec = load_spec(write_spec(tmp_path, BASE.replace("[0]", "[0, 1]")))
    first = plan_sweep(spec, store)
    assert [i.origin for i in first.items] == ["new"] * 4
    # The linear seed-0 run exists done under another id (a `train` run), seed 1 failed.
    linear0, linear1 = first.items[0], first.items[1]
    other = store.create(linear0.run.config, run_id="20260101-000000-linear-digits-s0-abcdef")
    other.write_summary({"run_id": other.id, "val_acc": 0.5, "test_acc": 0.5})
    other.set_status("done")
    failed = create_run(store, linear1)
    failed.set_status("failed", error="RuntimeError: boom")
    again = plan_sweep(spec, store)
    assert [(i.origin, i.run_id) for i in again.items[:2]] == [
        ("kept", other.id), ("restarted", linear1.run_id)]
    assert {i.origin for i in again.items[2:]} == {"new"}

    restarted = create_run(store, again.items[1])
    assert restarted.status() == {**restarted.status(), "status": "queued", "attempt": 2}
    aside = store.root / ".attempts" / linear1.run_id / "1"
    assert json.loads((aside / "status.json").read_text())["error"] == "RuntimeError: boom"
    assert sorted(r.id for r in store.list()) == sorted([other.id, linear1.run_id])

    assert cli_main(["sweep", str(spec.source), "--store", str(store.root), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "4 runs planned, 1 already done, 1 in progress, 2 to run" in err
    assert not (store.root / ".sweeps").exists()  # a dry run writes nothing


def test_execute_claimed_runs_only_its_own_claimed_runs(tmp_path):
    store = RunStore(tmp_path / "store")
    item = plan_sweep(parse_spec(dict(tasks=["digits"], methods=["linear"], seeds=[0],
                                      name="x")), store).items[0]
    run = create_run(store, item, claim_owner="sweep x (ray, driver a)")
    with pytest.raises(RunStoreError, match="not this sweep's to execute"):
        execute_claimed(str(store.root), run.id, "sweep x (ray, driver b)", 1)
    run.write_summary({"run_id": run.id, "val_acc": 0.3, "test_acc": 0.2})
    run.set_status("done")  # a retry after the run ended returns it, trains nothing
    got = execute_claimed(str(store.root), run.id, "sweep x (ray, driver a)", 1)
    assert got["test_acc"] == 0.2 and got["attempt"] == 1


def test_execute_claimed_moves_a_dead_attempt_aside_and_runs_afresh(tmp_path):
    """What a Ray retry does, without Ray: the first attempt's process died mid-training."""
    from conftest import write_vtab_task

    from vpeft_viz.runs.owner import HOST

    task = write_vtab_task(tmp_path / "colours", sizes=(8, 3, 3))
    store = RunStore(tmp_path / "store")
    spec = parse_spec(dict(tasks=[str(task)], methods=["linear"], seeds=[0], name="x",
                           pretrained=False, train={"epochs": 1, "batch_size": 4,
                                                    "warmup_epochs": 0.0, "device": "cpu"}))
    owner = "sweep x (ray, driver a)"
    run = create_run(store, plan_sweep(spec, store).items[0], claim_owner=owner)
    dead = subprocess.Popen(["true"])
    dead.wait()
    run.set_status("running", pid=dead.pid, pid_start=None, host=HOST)
    run.append_metrics({"epoch": 1, "val_acc": 0.0})  # what the dead attempt got to write
    summary = execute_claimed(str(store.root), run.id, owner, 1)
    assert summary["attempt"] == 2 and summary["test_acc"] is not None
    fresh = store.get(run.id)
    assert fresh.status()["status"] == "done" and fresh.status()["attempt"] == 2
    assert len(fresh.metrics()) == 1 and "train_loss" in fresh.metrics()[0]
    assert (fresh.path / "claim").read_text() == (
        store.root / ".attempts" / run.id / "1" / "claim").read_text()
    old = json.loads((store.root / ".attempts" / run.id / "1" / "status.json").read_text())
    assert old["status"] == "failed" and old["pid"] == dead.pid
    assert [r.id for r in store.list()] == [run.id]


def test_local_backend_queues_a_run_whose_worker_died_again(tmp_path, monkeypatch):
    """A local worker killed mid-run (the store reads the run failed, owner gone) gets the
    run back on the queue as a new attempt, up to [ray] max_retries times; a run that
    raised is not retried."""
    from conftest import write_vtab_task

    from vpeft_viz.runs.owner import HOST
    from vpeft_viz.runs.sweep.local import run_local

    task = write_vtab_task(tmp_path / "colours", sizes=(8, 3, 3))
    store = RunStore(tmp_path / "store")
    spec = parse_spec(dict(tasks=[str(task)], methods=["linear", "lora"], seeds=[0],
                           name="x", pretrained=False, ray={"max_retries": 1},
                           train={"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0}))
    plan = plan_sweep(spec, store)
    linear, lora = (i.run_id for i in plan.items)
    dead = subprocess.Popen(["true"])
    dead.wait()
    attempts: list[tuple[str, int]] = []

    def fake_worker(store_):  # what the queue's workers would do, one step per call
        for run in store_.list():
            status = run.status()
            if status["status"] != "queued":
                continue
            attempt = int(status.get("attempt") or 1)
            attempts.append((run.id, attempt))
            if run.id == lora:
                run.set_status("failed", error="RuntimeError: boom")
            elif attempt == 1:  # the worker dies mid-run
                run.set_status("running", pid=dead.pid, pid_start=None, host=HOST)
            else:
                run.write_summary({"run_id": run.id, "val_acc": 0.5, "test_acc": 0.4})
                run.set_status("done", attempt=attempt)

    monkeypatch.setattr(queue, "ensure_worker", fake_worker)
    events: list[dict] = []
    final = run_local(store, plan, progress=events.append, poll_s=0.01)
    assert final == {linear: "done", lora: "failed"}
    assert sorted(attempts) == [(linear, 1), (linear, 2), (lora, 1)]
    (retry,) = [e for e in events if e["kind"] == "retry"]
    assert retry["run_id"] == linear and "ended without finishing" in retry["error"]
    assert (store.root / ".attempts" / linear / "1" / "status.json").is_file()


def test_ray_is_imported_only_by_the_ray_backend():
    code = ("import sys, vpeft_viz.cli, vpeft_viz.runs.sweep, vpeft_viz.analysis.sweeps, "
            "vpeft_viz.plots.sweeps; sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_vpetl_cost_benchmark_smoke():
    """benchmarks/vpetl_cost.py end to end on the embedded backbone (figures mean nothing)."""
    import importlib.util

    bench = ROOT / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("vpetl_cost", bench / "vpetl_cost.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.run(module.parse(["--smoke", "--methods", "linear", "lora",
                                          "--peft-like", "lora"]))
    finally:
        sys.path.remove(str(bench))
    rows = {r["method"]: r for r in result["rows"]}
    # LoRA backpropagates through the frozen backbone; the linear probe does not
    assert rows["lora"]["train_flops_per_image"] > 2 * rows["linear"]["train_flops_per_image"]
    plan = result["plan"]
    assert plan["runs"] == 25 * 24 * 3 and plan["costed_as"] == ["lora"]
    a100 = plan["gpu_estimate"]["A100"]
    assert a100["gpu_hours"] == pytest.approx(
        plan["total_flops"] / (312e12 * 0.3) / 3600)
    assert a100["gpus_for_24h"] >= 1 and plan["per_task"]["nabirds"]["images_trained"] == (
        100 * 21_536)


# -- the Sweeps view's maths ------------------------------------------------------------------
def test_progress_and_best_setting_chosen_on_validation_only(tmp_path):
    write_fake_sweep(tmp_path)
    (sweep,), problems = view.load_sweeps(tmp_path)
    assert not problems and sweep.name == "grid" and sweep.active
    runs = sweep.runs
    assert view.progress_counts(runs) == {"done": 4, "running": 1, "queued": 0, "failed": 1,
                                          "cancelled": 0, "missing": 0}
    assert list(runs["setting"]) == ["", "", "rank=4", "rank=4", "rank=8", "rank=8"]
    assert view.parallel_axes(runs) == ["method", "set.rank"]
    assert list(view.running_table(runs)["step"]) == ["5/13"]
    best = view.best_settings(runs).set_index("method")
    # rank 8's test accuracy (70 %) is far better, but rank 4 is better on validation
    assert best.loc["lora", "setting"] == "rank=4"
    assert best.loc["lora", "val_acc"] == pytest.approx(0.61)
    assert best.loc["lora", "test_acc"] == pytest.approx(0.51)
    assert best.loc["lora", "seeds"] == "2/2" and best.loc["lora", "settings"] == "2/2"
    assert not best.loc["lora", "complete"]  # rank 8 seed 1 failed: not final
    assert best.loc["linear", "seeds"] == "1/2"
    eta = view.eta_s(runs, sweep.manifest, now=sweep.manifest["started"] + 30)
    assert eta == pytest.approx(1 / (5 / 30))  # one run left, five ended in 30 s


def test_test_accuracy_never_changes_the_choice(tmp_path):
    from _sweep_data import OUTCOMES

    swapped = {k: (s, v, None if t is None else 1.0 - t) for k, (s, v, t) in OUTCOMES.items()}
    write_fake_sweep(tmp_path, swapped)
    best = view.best_settings(view.load_sweeps(tmp_path)[0][0].runs).set_index("method")
    assert best.loc["lora", "setting"] == "rank=4"


def test_unreadable_manifest_is_reported_not_raised(tmp_path):
    write_fake_sweep(tmp_path)
    (tmp_path / ".sweeps" / "broken.json").write_text('{"name": "broken", "runs": 3}')
    sweeps, problems = view.load_sweeps(tmp_path)
    assert [s.name for s in sweeps] == ["grid"]
    assert len(problems) == 1 and "broken.json" in problems[0] and "'runs'" in problems[0]
    with pytest.raises(RunStoreError):
        read_manifest(tmp_path / ".sweeps" / "broken.json")


def test_rerunning_keeps_each_runs_first_origin(tmp_path):
    write_fake_sweep(tmp_path)
    manifest = read_manifest(tmp_path / ".sweeps" / "grid.json")
    again = [{**e, "origin": "kept"} for e in manifest["runs"]]
    write_manifest(tmp_path, name="grid", spec_file="s", spec={}, backend="local", address=None,
                   ray=None, runs=again)
    rewritten = read_manifest(tmp_path / ".sweeps" / "grid.json")
    assert {e["origin"] for e in rewritten["runs"]} == {"new"}
    assert rewritten["created"] == manifest["created"]


# -- a real local Ray cluster against the local job queue ------------------------------------
CLUSTER_SPEC = """name = "determinism"
tasks = ["digits"]
methods = ["linear", "lora"]
seeds = [0, 1, 2]
[train]
epochs = 1
[ray]
num_cpus = 1
max_retries = 2
"""
SAME = ("val_acc", "test_acc", "test_loss", "best_epoch", "epochs_done", "trainable_params")


@pytest.fixture
def ray_cluster(monkeypatch):
    """A local Ray cluster with two worker processes (one CPU each), on the loopback
    interface only; shut down afterwards."""
    # Ray's single-machine mode (its default on macOS): every process binds to 127.0.0.1, not
    # to the machine's address. Read when Ray is imported, so set before, and patched too in
    # case Ray was imported already.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed: pip install -r requirements-ray.txt "
        "(`make test` installs it)")
    from ray._private import ray_constants

    from vpeft_viz.runs.sweep import ray_backend

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    ray_backend.connect(None, 1, num_cpus=2, _temp_dir=temp, object_store_memory=80 * 2**20,
                        log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _wait_for_local_workers(store: RunStore) -> None:
    deadline = time.monotonic() + 20
    for slot in queue.device_slots()["cpu"]:
        while queue.slot_is_busy(store, slot) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ray_sweep_matches_the_local_queue_and_survives_a_killed_worker(
        tmp_path, monkeypatch, capsys, ray_cluster):
    spec_path = write_spec(tmp_path, CLUSTER_SPEC)
    # One CPU thread per local run, as each Ray run has (the same arithmetic, bit for bit).
    monkeypatch.setenv(queue.CPU_WORKERS_ENV, str(max(2, len(os.sched_getaffinity(0)))))
    local = RunStore(tmp_path / "local")
    t0 = time.monotonic()
    by_queue = run_sweep(spec_path, local, backend="local")
    _wait_for_local_workers(local)
    t_local = time.monotonic() - t0
    assert set(by_queue.final.values()) == {"done"} and len(by_queue.final) == 6

    store = RunStore(tmp_path / "ray")
    killed: dict[str, int] = {}

    def kill_one_mid_run(event: dict) -> None:
        """SIGKILL the Ray worker process of the first run seen training."""
        if event["kind"] != "tick" or killed:
            return
        for run in store.list():
            status = run.status()
            progress = status.get("progress") or {}
            if (status.get("status") == "running" and progress.get("phase") == "train"
                    and progress.get("step", 0) >= 1 and status.get("pid")):
                os.kill(status["pid"], signal.SIGKILL)
                killed.update(run_id=run.id, pid=status["pid"])
                return

    t0 = time.monotonic()
    by_ray = run_sweep(spec_path, store, backend="ray", progress=kill_one_mid_run)
    t_ray = time.monotonic() - t0
    print(f"local queue {t_local:.1f} s, ray {t_ray:.1f} s")
    assert killed, "no run was seen training"
    assert set(by_ray.final.values()) == {"done"}, by_ray.final
    assert by_ray.attempts == {rid: 2 if rid == killed["run_id"] else 1 for rid in by_ray.final}
    # The dead attempt is kept whole, out of the listing; one directory per planned run.
    dead = store.root / ".attempts" / killed["run_id"] / "1"
    dead_status = json.loads((dead / "status.json").read_text())
    assert dead_status["pid"] == killed["pid"] and dead_status["status"] == "failed"
    assert not (dead / "summary.json").exists()
    assert sorted(r.id for r in store.list()) == sorted(by_ray.final)
    assert sorted(os.listdir(store.root / ".attempts")) == [killed["run_id"]]

    # The same runs, the same numbers and the same weights, whichever backend ran them.
    assert sorted(by_ray.final) == sorted(by_queue.final)
    for run_id in by_ray.final:
        a, b = local.get(run_id), store.get(run_id)
        assert {k: a.summary()[k] for k in SAME} == {k: b.summary()[k] for k in SAME}, run_id
        assert a.weights_path.read_bytes() == b.weights_path.read_bytes(), run_id

    # Running either sweep again adds nothing.
    before = sorted(os.listdir(store.root)), sorted(os.listdir(local.root))
    capsys.readouterr()
    assert cli_main(["sweep", str(spec_path), "--backend", "ray", "--store",
                     str(store.root)]) == 0
    out = capsys.readouterr()
    assert "6 runs planned, 6 already done, 0 in progress, 0 to run (ray)" in out.err
    assert out.out.startswith("sweep determinism: 6 done; 0 retried")
    again = run_sweep(spec_path, local, backend="local")
    assert again.plan.count("kept") == 6
    assert (sorted(os.listdir(store.root)), sorted(os.listdir(local.root))) == before
    manifest = read_manifest(store.root / ".sweeps" / "determinism.json")
    assert manifest["backend"] == "ray" and len(manifest["runs"]) == 6
    assert {e["origin"] for e in manifest["runs"]} == {"new"}

    # A request no node can meet is refused instead of waiting forever.
    from vpeft_viz.runs.sweep.ray_backend import RayBackendError, check_resources
    from vpeft_viz.runs.sweep.spec import RayOptions

    with pytest.raises(RayBackendError, match="num_gpus = 0.5 but no node"):
        check_resources(RayOptions(num_cpus=1, num_gpus=0.5))
    with pytest.raises(RayBackendError, match="num_cpus = 3 but no node"):
        check_resources(RayOptions(num_cpus=3))
