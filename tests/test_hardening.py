"""Hardening (issue 15, items 1-10): each class of bad input or fault is stopped at its
boundary (config validation, data reading, the run store's reader, the run executor, the
command line) with an error naming what to fix. Process kills and full disks: test_faults.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_vtab_task
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import vpeft_viz.runs as run_stores
from vpeft_viz.cli import main
from vpeft_viz.config import ConfigError
from vpeft_viz.data import DataError, check_task_files
from vpeft_viz.data.dataset import ImageDataset, decode_image
from vpeft_viz.data.formats import read_imagefolder, read_vtab
from vpeft_viz.methods import attach_method, create_method, get_method_class
from vpeft_viz.runs import queue
from vpeft_viz.runs.execute import execute_run, make_run_config
from vpeft_viz.runs.store import RunStore, RunStoreError, process_start_time
from vpeft_viz.train import DivergedError, TrainConfig, evaluate, fit
from vpeft_viz.ui.forms import MAX_SEEDS, parse_seeds


def _config(data, *, method="linear", epochs=1, **train):
    return make_run_config(method=method, data=str(data), pretrained=False,
                           train={"epochs": epochs, "batch_size": 4, "warmup_epochs": 0.0,
                                  "device": "cpu", **train})


@pytest.fixture
def task(tmp_path):
    return write_vtab_task(tmp_path / "colours", sizes=(8, 3, 3))


# -- 1. a non-finite loss fails the run ------------------------------------------------------
def test_fit_stops_on_nan_loss_before_the_step(tiny_vit):
    images = torch.rand(8, 3, 32, 32)
    images[3] = float("nan")
    loader = DataLoader(TensorDataset(images, torch.arange(8) % 5), batch_size=4)
    method = create_method("linear")
    attach_method(tiny_vit, method)
    head_before = tiny_vit.head.weight.detach().clone()
    with pytest.raises(DivergedError, match=r"epoch 1, step 1 of 2"):
        fit(tiny_vit, method, loader, loader, 5, TrainConfig(epochs=1, device="cpu"))
    assert torch.equal(tiny_vit.head.weight, head_before)  # no NaN step was taken


def test_nan_run_ends_failed_without_weights_and_json_stays_strict(task, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(ImageDataset, "_normalise", lambda self, px: px.float() * math.nan)
    store = tmp_path / "store"
    argv = ["train", "--method", "linear", "--data", str(task), "--random-init", "--epochs",
            "1", "--store", str(store), "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "loss became nan at epoch 1, step 1" in err
    assert out.strip() == ""  # nothing but valid JSON may reach stdout
    (run_dir,) = store.iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "epoch 1, step 1" in status["error"]
    assert not (run_dir / "weights.safetensors").exists()
    from vpeft_viz.cli import _print_json

    _print_json({"val_acc": math.nan, "rows": [math.inf, 1.0]})
    assert json.loads(capsys.readouterr().out) == {"val_acc": None, "rows": [None, 1.0]}
    # every run file is strict JSON: NaN is written as null
    run = RunStore(store).get(run_dir.name)
    run.write_summary({"val_acc": math.nan})
    assert "NaN" not in (run_dir / "summary.json").read_text()


# -- 2. runs whose process is gone do not stay "running" -------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_running_run_reads_failed_and_is_repaired(tmp_path):
    store = RunStore(tmp_path)
    dead = store.create({"method": "linear"})
    dead.set_status("running", pid=_dead_pid(), pid_start=1)
    reused = store.create({"method": "linear"})  # the pid lives, but it is another process
    reused.set_status("running", pid=os.getpid(), pid_start=process_start_time(os.getpid()) + 1)
    alive = store.create({"method": "linear"})
    alive.set_status("running", pid=os.getpid(), pid_start=process_start_time(os.getpid()))
    for run in (dead, reused):
        st = RunStore(tmp_path, read_only=True).get(run.id).status()
        assert st["status"] == "failed" and "ended without finishing" in st["error"]
        assert json.loads((run.path / "status.json").read_text())["status"] == "running"
        assert run.status()["status"] == "failed"  # a writable store records the repair
        assert json.loads((run.path / "status.json").read_text())["status"] == "failed"
    assert alive.status()["status"] == "running"


def test_claimed_queued_run_of_a_dead_process_fails(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"method": "linear"})
    (run.path / "claim").write_text(json.dumps({"owner": "cli", "pid": _dead_pid()}))
    st = run.status()
    assert st["status"] == "failed" and "before it started" in st["error"]


def test_full_disk_still_writes_the_final_status(tmp_path, monkeypatch):
    run = RunStore(tmp_path).create({"method": "linear"})
    run.set_status("running", pid=os.getpid())
    size = (run.path / "status.json").stat().st_size
    assert size % 4096 == 0  # padded: room to rewrite in place

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vpeft_viz.runs.store.atomic_write_bytes", full)
    run.set_status("failed", error="OSError: No space left on device " + "x" * 10_000)
    st = run.status()
    assert st["status"] == "failed" and st["disk_full"] and st["error"].startswith("OSError")
    assert (run.path / "status.json").stat().st_size == size


# -- 3. images checked before the run exists; a failing test phase keeps the training -------
def test_broken_image_refused_before_the_run_with_file_and_line(task, tmp_path):
    (task / "images" / "test_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"test\.txt, line 2: cannot read image .*test_0001"):
        _config(task)


def test_failed_test_phase_keeps_weights_and_validation(task, tmp_path):
    config = _config(task)
    (task / "images" / "test_0002.png").write_bytes(b"not an image")
    run = RunStore(tmp_path / "store").create(config)
    with pytest.raises(RuntimeError, match="test phase failed"):
        execute_run(run)
    st, summary = run.status(), run.summary()
    assert st["status"] == "failed" and "weights and validation results are kept" in st["error"]
    assert run.weights_path.is_file() and summary["val_acc"] is not None
    assert "test_acc" not in summary and len(run.metrics()) == 1


# -- 4. non-finite numbers are refused for every numeric setting -----------------------------
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_settings_refused(raw):
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig.from_strings({"lr": raw})
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig.from_dict({"warmup_epochs": float(raw)})
    lora = get_method_class("lora").Config
    with pytest.raises(ConfigError, match="finite"):
        lora.from_strings({"alpha": raw})


# -- 5. one validating reader: a corrupt run is unreadable, the rest keep working ------------
CORRUPTIONS = {
    "status.json": "[1, 2]",
    "config.json": '{"method": 5}',
    "summary.json": '{"test_acc": "high"}',
    "metrics.jsonl": '"hello"\n',
    "artifacts/eval.json": '{"test_confusion": [[1, 2]]}',
    "method_state.json": "[]",
}


def corrupt_store(root: Path) -> dict[str, str]:
    """A store with one good done run and one run per corrupted file; returns id → file."""
    from test_compare import write_run

    store = RunStore(root)
    write_run(store, method="ssf", task="digits", seed=0, test_acc=0.75)
    out = {}
    for i, (name, text) in enumerate(CORRUPTIONS.items(), 1):
        run = write_run(store, method="lora", task="digits", seed=i, test_acc=0.5)
        (run.path / name).write_text(text)
        out[run.id] = name
    pid_run = write_run(store, method="lora", task="digits", seed=99, test_acc=0.5,
                        status="running")
    status = json.loads((pid_run.path / "status.json").read_text())
    (pid_run.path / "status.json").write_text(json.dumps({**status, "pid": "abc"}))
    out[pid_run.id] = "status.json"
    return out


def test_each_corrupt_run_file_is_named_and_the_rest_still_read(tmp_path, capsys):
    bad = corrupt_store(tmp_path / "s")
    store = RunStore(tmp_path / "s")
    for run in store.list():
        problem = run.problem()
        if run.id in bad:
            assert problem is not None and bad[run.id].split("/")[-1] in problem, run.id
        else:
            assert problem is None
    state = queue.queue_state(store)  # does not raise
    assert {i for i, _ in state.unreadable} == {i for i, f in bad.items()
                                                if f in ("status.json", "config.json")}
    assert main(["runs", "--store", str(tmp_path / "s"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rows) == len(bad) + 1
    assert {r["run_id"] for r in rows if r["status"] == "unreadable"} == set(bad)
    assert [r["status"] for r in rows if r["run_id"] not in bad] == ["done"]


# -- 6. the seeds field checks sizes before expanding ----------------------------------------
def test_huge_seed_range_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"at most {MAX_SEEDS}"):
        parse_seeds("0-2147483647")
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(ConfigError, match=f"at most {MAX_SEEDS}"):
        parse_seeds(",".join(f"{i}-{i + 9}" for i in range(0, 10_000_000, 10)))
    assert parse_seeds("0-2, 7") == [0, 1, 2, 7]


# -- 7. 16-bit and float images are scaled, not saturated ------------------------------------
def test_sixteen_bit_and_float_images_scaled(tmp_path):
    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert decode_image(tmp_path / "g16.png", 8).float().mean().item() == pytest.approx(128)
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert decode_image(tmp_path / "f.tif", 8).float().mean().item() == pytest.approx(64, abs=1)
    Image.fromarray(np.full((8, 8), 1e6, dtype=np.float32), "F").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif.*float pixels range"):
        decode_image(tmp_path / "big.tif", 8)


# -- 8. class count checked against labels present; no huge dense confusion -----------------
def test_typo_label_refused_with_file_and_line(tmp_path):
    root = write_vtab_task(tmp_path / "mytask", sizes=(8, 3, 3))
    lines = (root / "train800.txt").read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 100000"
    (root / "train800.txt").write_text("\n".join(lines) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train800(val200)?\.txt, line 5 \(label 100000\)"):
        read_vtab(root)


def test_label_gap_is_a_warning(tmp_path):
    root = write_vtab_task(tmp_path / "gappy", num_classes=3, sizes=(9, 3, 3))
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        text = (root / name).read_text().replace(" 2\n", " 3\n")
        (root / name).write_text(text)
    task = read_vtab(root)
    assert task.num_classes == 4
    assert any("1 of 4 class labels never occur" in w and ": 2" in w for w in task.warnings)


def test_confusion_not_dense_for_a_huge_label_space():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5000))
    loader = DataLoader(TensorDataset(torch.rand(6, 4), torch.tensor([0, 1, 4999, 7, 7, 3])),
                        batch_size=3)
    res = evaluate(model, loader, 5000, device=torch.device("cpu"))
    assert res.confusion is None and len(res.per_class_acc) == 5000
    assert int(res.class_total.sum()) == 6


# -- 9. entries stay inside the task; one class refused; overlaps warned ---------------------
@pytest.mark.parametrize("entry", ["../outside.png", "ABS", "images/link.png"])
def test_split_entries_outside_the_task_refused(tmp_path, entry):
    root = write_vtab_task(tmp_path / "t", sizes=(6, 3, 3))
    outside = tmp_path / "outside.png"
    shutil.copy(root / "images" / "train_0000.png", outside)
    (root / "images" / "link.png").symlink_to(outside)
    entry = str(outside) if entry == "ABS" else entry
    lines = (root / "test.txt").read_text().splitlines()
    lines[1] = f"{entry} 1"
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test\.txt, line 2: image .*(absolute|outside)"):
        read_vtab(root)


def test_one_class_imagefolder_refused(tmp_path):
    (tmp_path / "cats").mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "cats" / f"{i}.png")
    with pytest.raises(DataError, match="one class"):
        read_imagefolder(tmp_path)


def test_overlapping_splits_warned_in_the_run(task, tmp_path):
    shutil.copy(task / "images" / "train_0000.png", task / "images" / "test_0000.png")
    warnings = check_task_files(str(task))
    assert len(warnings) == 1 and "of the test split also occur in the train split" in warnings[0]
    run = RunStore(tmp_path / "store").create(_config(task))
    execute_run(run)
    assert run.status()["warnings"] == warnings and run.summary()["warnings"] == warnings


# -- 10. smaller boundaries ------------------------------------------------------------------
def test_non_utf8_split_file_named(task):
    (task / "val200.txt").write_bytes(b"images/val_0000.png 0\nimages/\xff.png 1\n")
    with pytest.raises(DataError, match=r"val200\.txt, line 2: not UTF-8"):
        read_vtab(task)


@pytest.mark.parametrize("run_id", ["../x", "..", "a/b", ".hidden", "/etc"])
def test_store_refuses_path_like_run_ids(tmp_path, run_id):
    store = RunStore(tmp_path / "store")
    with pytest.raises(RunStoreError, match="invalid run id"):
        store.get(run_id)
    with pytest.raises(RunStoreError, match="invalid run id"):
        store.create({"method": "linear"}, run_id=run_id)


def test_cli_refuses_cached_store_and_missing_store(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "cached")
    assert main(["train", "--method", "linear", "--data", str(task), "--random-init",
                 "--store", str(tmp_path / "cached" / "sub")]) == 1
    assert "read-only" in capsys.readouterr().err
    assert not (tmp_path / "cached").exists()
    assert main(["runs", "--store", str(tmp_path / "typo")]) == 1
    assert "no run store" in capsys.readouterr().err


def test_cancel_during_the_data_phase(task, tmp_path, monkeypatch):
    run = RunStore(tmp_path / "store").create(_config(task))
    import vpeft_viz.runs.execute as execute

    real = execute.resolve_data

    def slow(spec, seed=0):  # the user presses Cancel while the data is read
        queue.cancel(run)
        return real(spec, seed=seed)

    monkeypatch.setattr(execute, "resolve_data", slow)
    summary = execute_run(run)
    st = run.status()
    assert summary["cancelled"] and st["status"] == "cancelled"
    assert "data phase" in st["error"]


def test_overlap_warning_shown_on_the_train_page(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from test_compare import write_run

    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(tmp_path / "user"))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(queue, "ensure_worker", lambda store: [])
    run = write_run(RunStore(tmp_path / "user"), method="ssf", task="t", seed=0, test_acc=0.5)
    warning = "2 image(s) of the test split also occur in the train split, e.g. a.png"
    run.set_status("done", warnings=[warning])
    at = AppTest.from_file(str(run_stores.REPO_ROOT / "pages" / "1_Train.py"),
                           default_timeout=120).run()
    assert not at.exception
    assert warning in [w.value for w in at.warning]
