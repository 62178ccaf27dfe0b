"""What a sweep still has to run, and how a run directory is (re)created for it.

:func:`plan_sweep` expands the spec and matches every planned run against the store by
recipe hash (``runs/recipe.py``): a finished run with the same hash is *kept* (under
whatever id it has); a queued or running one is *in progress* (the sweep waits for it, and
the Ray backend takes over a queued one nobody claimed); otherwise the run is *new*, or
*restarted* when its directory holds an earlier attempt that failed or was cancelled.

Attempts: a run directory is never reused in place. An earlier attempt is moved, whole, to
``<store>/.attempts/<run_id>/<n>/`` (one rename: readers see the old directory or none) and
a fresh directory is created with the same config; its ``status.json`` carries ``attempt``.
So a retried run leaves exactly one run directory in the store, with the files of one
attempt only, and nothing of the earlier attempts is deleted.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..owner import HOST, owner_gone
from ..queue import CLAIM_FILE, try_claim
from ..recipe import config_hash
from ..store import FINISHED, Run, RunStore, RunStoreError
from .spec import PlannedRun, SweepSpec, expand

ATTEMPTS_DIR = ".attempts"
# Files an attempt writes after its directory was created (config.json, status.json, claim).
_ATTEMPT_OUTPUTS = ("metrics.jsonl", "summary.json", "weights.safetensors", "weights.packed",
                    "method_state.json", "artifacts", "error.txt", "cancel")


@dataclass
class PlanItem:
    """One planned run and the run directory that holds (or will hold) it."""

    run: PlannedRun
    origin: str  # "kept", "in progress", "new" or "restarted" (manifest.ORIGINS)
    run_id: str

    def entry(self) -> dict[str, Any]:
        return {**self.run.entry(), "run_id": self.run_id, "origin": self.origin}


@dataclass
class SweepPlan:
    spec: SweepSpec
    items: list[PlanItem] = field(default_factory=list)

    def count(self, origin: str) -> int:
        return sum(i.origin == origin for i in self.items)


def index_store(store: RunStore) -> dict[str, list[tuple[Run, str]]]:
    """Recipe hash → [(run, status)] over every readable run of the store (a run whose owner
    died reads as failed)."""
    out: dict[str, list[tuple[Run, str]]] = {}
    for run in store.list():
        try:
            h = config_hash(run.config)
            state = run.status().get("status", "queued")
            if state == "done" and run.summary() is None:
                state = "failed"  # done without its summary: not a usable result
        except (RunStoreError, TypeError, ValueError):
            continue
        out.setdefault(h, []).append((run, state))
    return out


def plan_sweep(spec: SweepSpec, store: RunStore) -> SweepPlan:
    """Expand ``spec`` and decide, for each run, what the store already has (see module)."""
    plan = SweepPlan(spec)
    index = index_store(store)
    for run in expand(spec):
        matches = index.get(run.config_hash, [])
        # Prefer the sweep's own directory, then the oldest other run with the same recipe.
        matches = sorted(matches, key=lambda m: (m[0].id != run.run_id, m[0].id))
        done = [r for r, s in matches if s == "done"]
        active = [r for r, s in matches if s not in FINISHED]
        if done:
            plan.items.append(PlanItem(run, "kept", done[0].id))
        elif active:
            plan.items.append(PlanItem(run, "in progress", active[0].id))
        elif (store.root / run.run_id).exists():
            plan.items.append(PlanItem(run, "restarted", run.run_id))
        else:
            plan.items.append(PlanItem(run, "new", run.run_id))
    return plan


# -- run directories ----------------------------------------------------------------------------
def _attempt_dir(store: RunStore, run_id: str) -> Path:
    d = store.root / ATTEMPTS_DIR / run_id
    d.mkdir(parents=True, exist_ok=True)
    used = [int(p.name) for p in d.iterdir() if p.name.isdigit()]
    return d / str(max(used, default=0) + 1)


def move_aside(store: RunStore, run_id: str, why: str) -> Path | None:
    """Move an earlier attempt's directory out of the store's listing (kept whole under
    ``.attempts/``); an attempt still marked queued or running is marked failed first."""
    src = store.root / run_id
    if not src.exists():
        return None
    with contextlib.suppress(RunStoreError, OSError):
        run = Run(src)
        if run.status().get("status") not in FINISHED:
            run.set_status("failed", error=why, finished=time.time())
    dest = _attempt_dir(store, run_id)
    os.rename(src, dest)
    return dest


def create_run(store: RunStore, item: PlanItem, *, claim_owner: str | None = None) -> Run | None:
    """Create the run directory of a new or restarted item (an earlier attempt is moved
    aside); ``claim_owner`` claims it at once (the Ray backend: no local worker may take it).
    None when another process created it first."""
    attempt = 1
    if item.origin == "restarted":
        try:
            attempt = int(Run(store.root / item.run_id).status().get("attempt") or 1) + 1
        except (RunStoreError, TypeError, ValueError):
            attempt = 2
        move_aside(store, item.run_id, "replaced by a new attempt of its sweep")
    try:
        run = store.create(item.run.config, run_id=item.run_id)
    except FileExistsError:
        return None
    if attempt > 1:
        run.set_status("queued", attempt=attempt)
    if claim_owner is not None and not try_claim(run, claim_owner):
        return None
    return run


def claim_queued(store: RunStore, run_id: str, owner: str) -> Run | None:
    """Take over a queued run nobody claimed (left by an interrupted local sweep)."""
    try:
        run = store.get(run_id)
        if run.status().get("status") != "queued":
            return None
    except RunStoreError:
        return None
    return run if try_claim(run, owner) else None


# -- executing a claimed run (the body of a Ray task) -------------------------------------------
def _started(run: Run, status: dict[str, Any]) -> bool:
    return (status.get("status", "queued") != "queued"
            or any((run.path / name).exists() for name in _ATTEMPT_OUTPUTS))


def execute_claimed(store_root: str, run_id: str, owner: str, threads: int) -> dict[str, Any]:
    """Execute a run the sweep's driver created and claimed as ``owner``; returns its summary.

    Ray calls this once per attempt. Finding the run already started means an earlier
    attempt of this task died (Ray retries a task only once its worker is gone): that
    attempt is moved aside and the run starts again in a fresh directory, so nothing is
    duplicated or half-written. A run already done is returned as it is.
    """
    import torch

    from ..execute import execute_run

    store = RunStore(store_root)
    run = store.get(run_id)
    claim = run.claim() or {}
    if claim.get("owner") != owner:
        raise RunStoreError(f"run {run_id} is not this sweep's to execute (claimed by "
                            f"{claim.get('owner', 'nobody')!r}, expected {owner!r})")
    status = run.status()
    state = status.get("status", "queued")
    if state == "done" and run.summary() is not None:
        return {**run.summary(), "attempt": status.get("attempt", 1)}
    if state == "cancelled":  # by a user (the dashboard's cancel), not by a dead worker
        return {"run_id": run_id, "cancelled": True, "attempt": status.get("attempt", 1)}
    if _started(run, status):
        if (state == "running" and status.get("host") == HOST and not owner_gone(status)
                and status.get("pid") != os.getpid()):
            raise RunStoreError(f"run {run_id} is still being executed by pid "
                                f"{status.get('pid')} on this host")
        config, claim_bytes = run.config, (run.path / CLAIM_FILE).read_bytes()
        attempt = int(status.get("attempt") or 1) + 1
        move_aside(store, run_id, f"its worker died; retried as attempt {attempt}")
        run = store.create(config, run_id=run_id)
        with open(run.path / CLAIM_FILE, "xb") as f:
            f.write(claim_bytes)
        run.set_status("queued", attempt=attempt)
    torch.set_num_threads(max(1, int(threads)))
    summary = execute_run(run)
    return {**summary, "attempt": run.status().get("attempt", 1)}


# -- watching -----------------------------------------------------------------------------------
def snapshot(store: RunStore, run_ids: list[str]) -> dict[str, str]:
    """Run id → status now ("missing" while a directory is being replaced)."""
    out = {}
    for run_id in run_ids:
        try:
            out[run_id] = store.get(run_id).status().get("status", "queued")
        except RunStoreError:
            out[run_id] = "missing"
    return out
