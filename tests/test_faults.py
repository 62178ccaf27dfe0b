"""Fault injection: real runs killed with SIGTERM and SIGKILL (command line and queued), a disk
that fills mid-run, and every run file corrupted; afterwards no run reads ``running``, and the
readers, the command line and the pages (AppTest) keep working.

Runs are tiny (random-init embedded backbone, linear probe, a 3-class 14-image folder task on
CPU): each subprocess spends most of its time importing torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_vtab_task
from streamlit.testing.v1 import AppTest
from test_hardening import corrupt_store

import vpeft_viz.runs as run_stores
from vpeft_viz.cli import main
from vpeft_viz.runs import REPO_ROOT, queue
from vpeft_viz.runs.execute import execute_run, make_run_config
from vpeft_viz.runs.store import RunStore
from vpeft_viz.train import Callback

TIMEOUT_S = 90


@pytest.fixture
def task(tmp_path):
    return write_vtab_task(tmp_path / "colours", sizes=(8, 3, 3))


def _until(what, predicate, timeout=TIMEOUT_S, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    extra = log.read_text() if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{extra}")


def _one_run(store: Path):
    runs = RunStore(store).list()
    return runs[0] if len(runs) == 1 else None


def _training(run) -> bool:
    """At least one epoch recorded and the run still running (a kill lands mid-training).
    The runs use LoRA, not a linear probe: a probe trains its head on cached features, and
    its 1,000 epochs on 8 images can finish before a quiet machine's first poll sees them."""
    return bool(run.metrics()) and run.status()["status"] == "running"


def _start_cli(task: Path, store: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vpeft_viz", "train", "--method", "lora", "--data", str(task),
         "--random-init", "--epochs", "1000", "--train-set", "batch_size=4",
         "--store", str(store), "--json"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log.open("wb"))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path, Path]]:
    """Two command-line runs started together (their torch imports overlap): one to be
    stopped with SIGTERM, one with SIGKILL. name → (process, store, log)."""
    root = tmp_path_factory.mktemp("cli")
    task = write_vtab_task(root / "colours", sizes=(8, 3, 3))
    procs = {}
    for name in ("term", "kill"):
        store, log = root / f"store-{name}", root / f"{name}.log"
        procs[name] = (_start_cli(task, store, log), store, log)
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def queued(tmp_path_factory, cli_runs):
    """Two queued runs and the worker executing them, started beside the CLI runs."""
    root = tmp_path_factory.mktemp("queued")
    task = write_vtab_task(root / "colours", sizes=(8, 3, 3))
    store = RunStore(root / "runs")
    config = make_run_config(method="lora", data=str(task), pretrained=False,
                             train={"epochs": 1000, "batch_size": 4, "warmup_epochs": 0.0,
                                    "device": "cpu"})
    runs = [queue.submit(store, config), queue.submit(store, config)]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(queue.CPU_WORKERS_ENV, raising=False)
        (worker,) = queue.ensure_worker(store)
    yield store, runs, worker
    if queue.pid_alive(worker):
        os.kill(worker, signal.SIGKILL)


def _training_run(entry: tuple[subprocess.Popen, Path, Path]):
    proc, store, log = entry
    return _until("the CLI run to start training",
                  lambda: (r := _one_run(store)) is not None and _training(r) and r, log=log)


@pytest.mark.usefixtures("queued")  # started now, so the three torch imports overlap
def test_cli_run_sigterm_ends_cancelled_with_metrics(cli_runs):
    proc = cli_runs["term"][0]
    run = _training_run(cli_runs["term"])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 143
    status = run.status()
    assert status["status"] == "cancelled" and status["error"] == "stopped by SIGTERM"
    summary = json.loads(out.decode().strip().splitlines()[-1])  # valid JSON on stdout
    assert summary["cancelled"] and summary["epochs_done"] == len(run.metrics()) >= 1


def test_cli_run_sigkill_reads_failed(cli_runs, capsys):
    proc, store, _ = cli_runs["kill"]
    run = _training_run(cli_runs["kill"])
    proc.kill()
    proc.wait(timeout=TIMEOUT_S)
    raw = json.loads((run.path / "status.json").read_text())
    assert raw["status"] == "running" and raw["pid"] == proc.pid  # what the kill left behind
    assert main(["runs", "--store", str(store), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["status"] == "failed" and f"pid {proc.pid}" in row["error"]
    repaired = json.loads((run.path / "status.json").read_text())
    assert repaired["status"] == "failed" and repaired["owner_gone"]  # a sweep retries it
    assert len(run.metrics()) >= 1  # finished epochs stay


def test_queued_runs_killed_with_sigterm_and_sigkill(queued):
    store, (first, second), worker = queued
    log = store.root / queue.WORKER_LOG
    # SIGTERM to the run's process: it stops cleanly, keeping its epochs.
    _until("the first queued run to train", lambda: _training(first), log=log)
    os.kill(first.status()["pid"], signal.SIGTERM)
    _until("the first run to end", lambda: first.status()["status"] != "running", log=log)
    assert first.status()["status"] == "cancelled" and first.summary()["cancelled"]
    # SIGKILL to the worker and then to the run's process: nobody is left to record it.
    _until("the second queued run to train", lambda: _training(second), log=log)
    child = second.status()["pid"]
    os.kill(worker, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    _until("the killed processes to go", lambda: not queue.pid_alive(child)
           and not queue.slot_is_busy(store, "cpu:0"))
    status = second.status()
    assert status["status"] == "failed" and f"pid {child}" in status["error"]
    assert status["owner_gone"]  # died, not an error of the run: a sweep queues it again
    state = queue.queue_state(store)
    assert not state.running and not state.queued


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that allows the mount; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class FillDisk(Callback):
    """After the first epoch, fill the disk the run store lives on."""

    def __init__(self, disk: Path):
        self.disk, self.filled = disk, False

    def on_epoch(self, row: dict) -> None:
        if self.filled:
            return
        self.filled = True
        with open(self.disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass


def test_full_disk_leaves_a_readable_final_status(task, small_disk):
    store = RunStore(small_disk / "store")
    config = make_run_config(method="lora", data=str(task), pretrained=False,
                             train={"epochs": 50, "batch_size": 4, "warmup_epochs": 0.0,
                                    "device": "cpu"})
    run = store.create(config)
    with pytest.raises(OSError, match="No space left"):
        execute_run(run, callbacks=[FillDisk(small_disk)])
    status = json.loads((run.path / "status.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["error"]
    assert status["disk_full"] and run.status()["status"] == "failed"
    assert len(run.metrics()) == 1  # the epoch written before the disk filled


# -- every run file corrupted: readers, command line and pages keep working ------------------
def test_corrupt_runs_listed_and_the_rest_shown(tmp_path, capsys):
    bad = corrupt_store(tmp_path / "s")
    assert main(["runs", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.count("unreadable:") == len(bad)
    for run_id, name in bad.items():
        line = next(x for x in out.splitlines() if x.startswith(run_id))
        assert name.split("/")[-1] in line


@pytest.fixture
def corrupt_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(tmp_path / "user"))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "cached")
    monkeypatch.setattr(queue, "ensure_worker", lambda store: [])
    corrupt_store(tmp_path / "cached")
    return corrupt_store(tmp_path / "user")


@pytest.mark.parametrize("page", [None, "1_Train.py", "2_Compare.py"])
def test_pages_survive_corrupt_runs(corrupt_stores, page):
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=180)
    if page:
        at.switch_page(f"pages/{page}")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page == "2_Compare.py":
        text = "\n".join(str(e.value) for e in at.code)
        assert sum(run_id in text for run_id in corrupt_stores) >= 3
