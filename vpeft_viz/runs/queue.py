"""The job queue: runs waiting in the user store, executed by worker processes.

There is no separate queue file: the queue *is* the store. Runs whose status is ``queued``
wait their turn, oldest first (by ``status.json``'s ``created`` time). A worker process
(:mod:`vpeft_viz.runs.worker`) owns one device *slot* (``cpu:0``, ``cuda:0``, …), proven by
an ``fcntl.flock`` on ``<store>/.worker-<slot>.lock`` that the kernel drops when the process
dies, so liveness needs no heartbeat. One run at a time per slot: one slot per GPU, and one
CPU slot by default (``$VPEFT_VIZ_CPU_WORKERS`` raises it).

A run is taken by creating ``<run>/claim`` with ``O_CREAT | O_EXCL`` (atomic on a local file
system): a worker claims a run to execute it, the dashboard claims a queued run to cancel
it, and whoever comes second backs off. A worker that dies mid-run leaves ``running`` on
disk; reading the run's status notices the dead owner (pid and start time, see
:mod:`vpeft_viz.runs.store`) and marks the run ``failed``.

Everything the queue writes (lock files, the worker log) lives inside the store.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .store import FINISHED, Run, RunStore, RunStoreError, owner_fields

CLAIM_FILE = "claim"
WORKER_LOG = ".worker.log"
CPU_WORKERS_ENV = "VPEFT_VIZ_CPU_WORKERS"

# Workers this process started, by lock file: one still starting up (importing torch) has not
# taken its lock yet, but it holds the slot all the same. Exited ones are reaped on each call.
_spawned: dict[Path, subprocess.Popen] = {}


# -- slots ----------------------------------------------------------------------------------
def cuda_device_count() -> int:
    """GPUs visible to this process (asks the driver without creating a CUDA context)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch build with CUDA, no driver: CPU only
        return 0


def cpu_worker_count() -> int:
    raw = os.environ.get(CPU_WORKERS_ENV, "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise RunStoreError(f"${CPU_WORKERS_ENV} must be a positive integer, got {raw!r}") from None


def normalise_slot(slot: str) -> str:
    """``cpu`` → ``cpu:0``; ``cuda:1`` stays; anything else is refused."""
    kind, _, index = slot.partition(":")
    if kind not in ("cpu", "cuda") or not (index or "0").isdigit():
        raise ValueError(f"slot must look like cpu, cpu:N or cuda:N; got {slot!r}")
    return f"{kind}:{int(index or 0)}"


def device_slots() -> dict[str, list[str]]:
    """Worker slots per device kind: ``{"cpu": ["cpu:0"], "cuda": ["cuda:0", ...]}``."""
    return {"cpu": [f"cpu:{i}" for i in range(cpu_worker_count())],
            "cuda": [f"cuda:{i}" for i in range(cuda_device_count())]}


def run_device_kind(config: dict[str, Any], has_cuda: bool) -> str:
    """Which kind of slot executes a run: its ``train.device``, ``auto`` → cuda when present."""
    device = config.get("train", {}).get("device", "auto")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def lock_path(store: RunStore, slot: str) -> Path:
    return store.root / f".worker-{normalise_slot(slot).replace(':', '-')}.lock"


def slot_is_busy(store: RunStore, slot: str) -> bool:
    """Whether a live worker holds ``slot`` (probes the lock without keeping it)."""
    path = lock_path(store, slot)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock taken above
    return False


def worker_pid(store: RunStore, slot: str) -> int | None:
    """The pid a live worker wrote into its slot's lock file."""
    if not slot_is_busy(store, slot):
        return None
    try:
        return int(lock_path(store, slot).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


# -- processes ------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reused pid counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def ensure_worker(store: RunStore) -> list[int]:
    """Start a worker for every free slot that has queued runs waiting; returns new pids.

    A worker already holding a slot is left alone, so calling this on every launch (or every
    poll) is cheap and never starts a second worker on a device.
    """
    for path, proc in list(_spawned.items()):
        if proc.poll() is not None:  # reaps it (no zombies)
            del _spawned[path]
    if store.read_only:
        raise RunStoreError(f"store {store.root} is read-only")
    slots = device_slots()
    waiting: dict[str, int] = {}
    for job in queued_jobs(store):
        kind = run_device_kind(job.config, bool(slots["cuda"]))
        if not slots.get(kind):  # e.g. device cuda on a machine without a GPU: fail, not hang
            if try_claim(job.run, "queue"):
                job.run.set_status("failed", finished=time.time(),
                                   error=f"no {kind} device here to run on (train.device)")
            continue
        waiting[kind] = waiting.get(kind, 0) + 1
    started = []
    for kind, count in waiting.items():
        free = [s for s in slots.get(kind, [])
                if lock_path(store, s) not in _spawned and not slot_is_busy(store, s)]
        for slot in free[:count]:
            started.append(_spawn(store, slot))
    return started


def _spawn(store: RunStore, slot: str) -> int:
    store.root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    kind, _, index = slot.partition(":")
    if kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(int(index))
    with open(store.root / WORKER_LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vpeft_viz.runs.worker", "--store", str(store.root),
             "--slot", slot],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=REPO_ROOT, start_new_session=True)
    _spawned[lock_path(store, slot)] = proc
    return proc.pid


def _physical_gpu(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry for the ``index``-th GPU this process sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[index].strip()
    return str(index)


# -- claims ---------------------------------------------------------------------------------
def try_claim(run: Run, owner: str) -> bool:
    """Atomically take a run (exactly one caller wins); records who took it and when."""
    try:
        fd = os.open(run.path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.ENOENT:  # the run directory vanished
            return False
        raise
    with os.fdopen(fd, "w") as f:
        json.dump({"owner": owner, **owner_fields(), "time": time.time()}, f)
    return True


# -- the queue ------------------------------------------------------------------------------
def submit(store: RunStore, config: dict[str, Any]) -> Run:
    """Put a validated run configuration (``make_run_config``) on the queue."""
    return store.create(config)


@dataclass
class Job:
    """A snapshot of one run as the queue sees it (status read once)."""

    run: Run
    status: dict[str, Any]
    config: dict[str, Any]

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def state(self) -> str:
        return self.status.get("status", "queued")

    @property
    def created(self) -> float:
        return float(self.status.get("created") or 0.0)

    @property
    def finished(self) -> float:
        return float(self.status.get("finished") or self.status.get("updated") or 0.0)

    @property
    def progress(self) -> dict[str, Any]:
        return self.status.get("progress") or {}

    @property
    def error(self) -> str | None:
        return self.status.get("error")

    @property
    def label(self) -> str:
        c = self.config
        return (f"{c.get('method', '?')} · {c.get('data', {}).get('name', '?')} · "
                f"seed {c.get('train', {}).get('seed', '?')}")


@dataclass
class QueueState:
    queued: list[Job] = field(default_factory=list)  # oldest first: the next to run leads
    running: list[Job] = field(default_factory=list)
    recent: list[Job] = field(default_factory=list)  # finished, newest first
    workers: dict[str, int | None] = field(default_factory=dict)  # slot → pid (None: idle)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (run id, reason)

    @property
    def active(self) -> bool:
        return bool(self.queued or self.running)


def _jobs(store: RunStore, unreadable: list[tuple[str, str]] | None = None) -> list[Job]:
    """Every readable run (status read once, stale owners repaired by the read); the others
    go to ``unreadable`` as (run id, reason)."""
    jobs = []
    for run in store.list():
        try:
            jobs.append(Job(run, run.status(), run.config))
        except RunStoreError as e:
            if unreadable is not None:
                unreadable.append((run.id, str(e)))
    return jobs


def queued_jobs(store: RunStore) -> list[Job]:
    """Queued runs, oldest first."""
    return sorted((j for j in _jobs(store) if j.state == "queued"),
                  key=lambda j: (j.created, j.id))


def queue_state(store: RunStore, *, recent: int = 8) -> QueueState:
    """What the dashboard shows; runs whose process died read (and are marked) ``failed``."""
    unreadable: list[tuple[str, str]] = []
    jobs = _jobs(store, unreadable)
    slots = device_slots()
    state = QueueState(workers={s: worker_pid(store, s) for kind in ("cuda", "cpu")
                                for s in slots[kind]}, unreadable=unreadable)
    for job in jobs:
        if job.state == "queued":
            state.queued.append(job)
        elif job.state == "running":
            state.running.append(job)
    state.queued.sort(key=lambda j: (j.created, j.id))
    state.running.sort(key=lambda j: (j.created, j.id))
    done = sorted((j for j in jobs if j.state in FINISHED), key=lambda j: -j.finished)
    state.recent = done[:recent]
    return state


def cancel(run: Run) -> str:
    """Cancel a run; returns its status afterwards.

    A queued run is cancelled at once (unless a worker claimed it a moment ago, which then
    counts as running). A running run gets the cancel flag: training stops after the current
    step and the run ends ``cancelled`` with the metrics of the epochs it finished.
    """
    status = run.status().get("status", "queued")
    if status in FINISHED:
        return status
    if status == "queued" and try_claim(run, "cancel"):
        run.set_status("cancelled", finished=time.time(), error=None)
        return "cancelled"
    run.request_cancel()
    return run.status().get("status", "queued")
