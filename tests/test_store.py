"""Run store contract: layout, atomic writes, statuses, read-only stores, artifacts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vpeft_viz.runs.store import RunStore, RunStoreError


def _config(method="lora", task="colours", seed=0):
    return {"method": method, "data": {"name": task}, "train": {"seed": seed}}


def test_create_list_get(tmp_path):
    store = RunStore(tmp_path / "runs")
    assert store.list() == []
    a = store.create(_config())
    b = store.create(_config(method="ssf", seed=1))
    assert [r.id for r in store.list()] == sorted([a.id, b.id])
    assert "lora" in a.id and "colours" in a.id and "s0" in a.id
    assert store.get(a.id).config["method"] == "lora"
    assert a.status()["status"] == "queued"
    with pytest.raises(RunStoreError, match="no run 'missing'"):
        store.get("missing")


def test_status_metrics_summary(tmp_path):
    run = RunStore(tmp_path).create(_config())
    run.set_status("running", pid=os.getpid())  # a live owner: the run stays running
    run.update_progress(step=3, steps=10)
    run.append_metrics({"epoch": 1, "val_acc": 0.5})
    run.append_metrics({"epoch": 2, "val_acc": 0.75})
    run.write_summary({"val_acc": 0.75})
    st = run.status()
    assert st["status"] == "running" and st["pid"] == os.getpid() and st["progress"]["step"] == 3
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert (run.path / "metrics.jsonl").read_text().count("\n") == 2
    assert run.summary() == {"val_acc": 0.75}
    with pytest.raises(ValueError):
        run.set_status("exploded")
    # no temp files are left behind by atomic writes
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_weights_and_artifacts_round_trip(tmp_path):
    run = RunStore(tmp_path).create(_config())
    size = run.save_weights({"a.b": torch.arange(6.0).view(2, 3)})
    assert size == run.weights_path.stat().st_size > 0
    assert torch.equal(run.load_weights()["a.b"], torch.arange(6.0).view(2, 3))
    run.save_artifact("scores.npz", {"x": np.eye(3)})
    run.save_artifact("eval.json", {"confusion": np.eye(2, dtype=np.int64)})
    assert run.artifact_names() == ["eval.json", "scores.npz"]
    assert np.array_equal(run.load_artifact("scores.npz")["x"], np.eye(3))
    assert run.load_artifact("eval.json") == {"confusion": [[1, 0], [0, 1]]}
    with pytest.raises(ValueError, match=".json or .npz"):
        run.save_artifact("bad.pkl", {})


def test_read_only_store_refuses_writes(tmp_path):
    run = RunStore(tmp_path).create(_config())
    ro = RunStore(tmp_path, read_only=True)
    with pytest.raises(RunStoreError, match="read-only"):
        ro.create(_config())
    with pytest.raises(RunStoreError, match="read-only"):
        ro.get(run.id).set_status("done")


def test_cancel_flag(tmp_path):
    run = RunStore(tmp_path).create(_config())
    assert not run.cancel_requested()
    run.request_cancel()
    assert run.cancel_requested()


def test_corrupt_file_is_reported(tmp_path):
    run = RunStore(tmp_path).create(_config())
    (run.path / "summary.json").write_text("{not json")
    with pytest.raises(RunStoreError, match="corrupt file"):
        run.summary()


def test_missing_files_read_as_empty(tmp_path):
    run = RunStore(tmp_path).create(_config())
    assert run.metrics() == [] and run.summary() is None and run.method_state() == {}
    with pytest.raises(RunStoreError, match="no saved weights"):
        run.load_weights()
