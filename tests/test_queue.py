"""Job queue and worker processes: real ``python -m vpeft_viz.runs.worker`` subprocesses.

Runs are tiny (random-init embedded backbone on a 3-class, 24-image folder task, CPU), so
each test spends most of its time starting the worker (importing torch and timm).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_vtab_task

from vpeft_viz.runs import RunStore, queue
from vpeft_viz.runs.execute import make_run_config

TIMEOUT_S = 120


@pytest.fixture
def task(tmp_path):
    """A 3-class VTAB-1k-layout folder small enough for a CPU step to take a blink."""
    return write_vtab_task(tmp_path / "colours", sizes=(8, 3, 3))


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    """The user store in a tmp dir; workers inherit the environment pointing there."""
    root = tmp_path / "runs"
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(root))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(queue.CPU_WORKERS_ENV, raising=False)
    yield RunStore(root)
    _stop_workers(RunStore(root))


def _stop_workers(store: RunStore) -> None:
    """Wait for this test's workers to exit (they do once idle); kill any left over."""
    deadline = time.monotonic() + 15
    for slot in queue.device_slots()["cpu"]:
        while queue.slot_is_busy(store, slot) and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = queue.worker_pid(store, slot)
        if pid:
            subprocess.run(["kill", str(pid)], check=False)


def _config(data, *, method="linear", epochs=1, batch_size=4, **train):
    return make_run_config(method=method, data=str(data), pretrained=False,
                           train={"epochs": epochs, "batch_size": batch_size,
                                  "warmup_epochs": 0.0, "device": "cpu", **train})


def _wait(runs, states=("done", "failed", "cancelled"), timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.status()["status"] in states for r in runs):
            return [r.status() for r in runs]
        time.sleep(0.2)
    log = ""
    if runs:
        path = runs[0].path.parent / queue.WORKER_LOG
        log = path.read_text() if path.exists() else "(no worker log)"
    raise AssertionError(f"timed out: {[r.status() for r in runs]}\nworker log:\n{log}")


def test_queue_runs_one_at_a_time_and_survives_a_failure(store, task, tmp_path):
    broken = shutil.copytree(task, tmp_path / "broken")
    bad_config = _config(broken)  # checked while whole; the image goes missing afterwards
    (broken / "images" / "test_0002.png").unlink()  # found only when the run reads its data
    bad = queue.submit(store, bad_config)
    first = queue.submit(store, _config(task, method="linear"))
    second = queue.submit(store, _config(task, method="lora", epochs=2))
    assert [j.id for j in queue.queue_state(store).queued] == [bad.id, first.id, second.id]

    pids = queue.ensure_worker(store)
    assert len(pids) == 1
    deadline = time.monotonic() + 30
    while not queue.slot_is_busy(store, "cpu:0") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.ensure_worker(store) == []  # the CPU slot is taken: no second worker

    statuses = _wait([bad, first, second])
    assert [s["status"] for s in statuses] == ["failed", "done", "done"]
    assert "test_0002.png" in statuses[0]["error"] and "does not exist" in statuses[0]["error"]
    assert (bad.path / "error.txt").is_file()
    # one at a time, in submission order, each in its own process
    assert statuses[1]["started"] >= statuses[0]["finished"]
    assert statuses[2]["started"] >= statuses[1]["finished"]
    assert statuses[1]["pid"] != statuses[2]["pid"]
    assert statuses[1]["worker_pid"] == statuses[2]["worker_pid"] == pids[0]
    assert len(second.metrics()) == 2 and second.summary()["test_acc"] >= 0.0
    assert statuses[2]["progress"]["step"] == statuses[2]["progress"]["steps"]

    state = queue.queue_state(store)
    assert not state.active
    assert [j.id for j in state.recent] == [second.id, first.id, bad.id]  # newest first
    # everything the queue wrote is inside the store
    assert (store.root / queue.WORKER_LOG).is_file()


def test_cancel_queued_run_never_starts(store, task):
    run = queue.submit(store, _config(task))
    assert queue.cancel(run) == "cancelled"
    assert run.status()["status"] == "cancelled"
    assert queue.ensure_worker(store) == []  # nothing left to do: no worker
    assert queue.cancel(run) == "cancelled"  # idempotent


def _wait_for_metrics(run) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not run.metrics() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.metrics(), run.status()


def test_cancel_running_run_then_stop_the_worker(store, task):
    first = queue.submit(store, _config(task, epochs=200))
    second = queue.submit(store, _config(task, epochs=200))
    (pid,) = queue.ensure_worker(store)

    # Cancel: training stops after the current step, finished epochs are kept.
    _wait_for_metrics(first)
    assert first.status()["status"] == "running"
    assert queue.cancel(first) == "running"  # asked; it stops after the current step
    (status,) = _wait([first], timeout=60)
    assert status["status"] == "cancelled"
    summary = first.summary()
    assert summary["cancelled"] and 1 <= summary["epochs_done"] < 200
    assert len(first.metrics()) == summary["epochs_done"]

    # The worker goes on with the next run; stopping the worker stops that run and says so.
    _wait_for_metrics(second)
    child = second.status()["pid"]
    assert second.status()["worker_pid"] == pid
    os.kill(pid, signal.SIGTERM)
    (status,) = _wait([second], timeout=30)
    # The worker passes SIGTERM on: the run stops cleanly, keeping its finished epochs.
    assert status["status"] == "cancelled" and status["error"] == "stopped by SIGTERM"
    assert second.summary()["cancelled"] and len(second.metrics()) >= 1
    deadline = time.monotonic() + 15
    while (queue.pid_alive(child) or queue.slot_is_busy(store, "cpu:0")) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not queue.pid_alive(child) and not queue.slot_is_busy(store, "cpu:0")


def test_dead_process_marks_run_failed(store, task):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = queue.submit(store, _config(task))
    run.set_status("running", pid=dead.pid)
    alive = queue.submit(store, _config(task))
    alive.set_status("running", pid=None)  # not started by a worker (e.g. the command line)
    state = queue.queue_state(store)
    assert [j.id for j in state.running] == [alive.id]
    status = run.status()
    assert status["status"] == "failed"
    assert status["error"].startswith(f"the process running it (pid {dead.pid}) ended")
    assert alive.status()["status"] == "running"


def test_run_for_a_missing_device_fails_instead_of_waiting(store, task, monkeypatch):
    monkeypatch.setattr(queue, "cuda_device_count", lambda: 0)
    run = queue.submit(store, _config(task, device="cuda"))
    assert queue.ensure_worker(store) == []
    assert run.status()["status"] == "failed"
    assert run.status()["error"] == "no cuda device here to run on (train.device)"


def test_claim_is_exclusive(store, task):
    run = queue.submit(store, _config(task))
    assert queue.try_claim(run, "worker cpu:0")
    assert not queue.try_claim(run, "cancel")
    # claimed by a live worker that has not started it yet: cancelling sets the flag
    assert queue.cancel(run) == "queued" and run.cancel_requested()


def test_slots_and_device_kinds(monkeypatch):
    assert queue.normalise_slot("cpu") == "cpu:0"
    assert queue.normalise_slot("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="slot"):
        queue.normalise_slot("tpu:0")
    monkeypatch.setenv(queue.CPU_WORKERS_ENV, "2")
    assert queue.device_slots()["cpu"] == ["cpu:0", "cpu:1"]
    assert queue.run_device_kind({"train": {"device": "auto"}}, has_cuda=False) == "cpu"
    assert queue.run_device_kind({"train": {"device": "auto"}}, has_cuda=True) == "cuda"
    assert queue.run_device_kind({"train": {"device": "cpu"}}, has_cuda=True) == "cpu"
