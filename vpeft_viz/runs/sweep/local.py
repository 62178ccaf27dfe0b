"""The ``local`` backend: the sweep's runs go on the store's job queue (``runs/queue.py``).

Every run to do is created ``queued`` at once, so the dashboard shows the whole sweep from
the start; the queue's workers (one per device slot: ``$VPEFT_VIZ_CPU_WORKERS`` CPU slots,
one per GPU) execute them oldest first, each in a forked child (``runs/worker.py``). The
driver only watches the store, and puts a run whose worker process died (killed, out of
memory; the store marks it ``failed`` with ``owner_gone``) back on the queue as a new
attempt, up to ``[ray] max_retries`` times — the same budget the Ray backend gives Ray.
Interrupting the driver stops the watching, not the runs: they stay on the queue (cancel
them on the Train page).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import queue
from ..store import FINISHED, RunStore
from .plan import PlanItem, SweepPlan, create_run, snapshot

MISSING_GIVE_UP_S = 60.0  # a run directory absent this long was removed: stop waiting for it


def tick_s(n_runs: int) -> float:
    """How often the driver reads every unfinished run's status: at most ~200 files a second
    on the store (a sweep of 2,000 runs reads them every 10 s)."""
    return max(0.5, n_runs / 200)


def run_local(store: RunStore, plan: SweepPlan, *, progress: Callable[[dict], None],
              poll_s: float = 0.5) -> dict[str, str]:
    """Queue the plan's new and restarted runs, then wait for every planned run; returns
    run id → final status."""
    for item in plan.items:
        if item.origin in ("new", "restarted"):
            create_run(store, item)  # None: another driver created it first; watched all the same
    labels = {i.run_id: i.run.label for i in plan.items}
    items = {i.run_id: i for i in plan.items}
    retries: dict[str, int] = {}
    waiting = [i.run_id for i in plan.items if i.origin != "kept"]
    final = {i.run_id: "done" for i in plan.items if i.origin == "kept"}
    missing_since: dict[str, float] = {}
    next_workers = 0.0
    while waiting:
        if time.monotonic() >= next_workers:  # reads every queued run: not at every poll
            queue.ensure_worker(store)  # a worker per free slot while runs wait
            next_workers = time.monotonic() + tick_s(len(waiting))
        states = snapshot(store, waiting)
        now = time.monotonic()
        for run_id, state in states.items():
            if state == "missing":
                if now - missing_since.setdefault(run_id, now) < MISSING_GIVE_UP_S:
                    continue
            else:
                missing_since.pop(run_id, None)
            if state == "failed" and _worker_died(store, run_id) \
                    and retries.get(run_id, 0) < plan.spec.ray.max_retries:
                retries[run_id] = retries.get(run_id, 0) + 1
                event = finished_event(store, run_id, labels[run_id], state)
                progress({**event, "kind": "retry", "retry": retries[run_id]})
                create_run(store, PlanItem(items[run_id].run, "restarted", run_id))
                continue
            if state in FINISHED or state == "missing":
                final[run_id] = state
                waiting.remove(run_id)
                progress(finished_event(store, run_id, labels[run_id], state))
        progress({"kind": "tick", "states": {**final, **{r: states[r] for r in waiting}}})
        if waiting:
            time.sleep(max(poll_s, tick_s(len(waiting))))
    return final


def _worker_died(store: RunStore, run_id: str) -> bool:
    """Whether the run failed because the process running it ended, not by an error."""
    try:
        return bool(store.get(run_id).status().get("owner_gone"))
    except Exception:  # noqa: BLE001 - unreadable: not a retry
        return False


def finished_event(store: RunStore, run_id: str, label: str, state: str,
                   error: str | None = None) -> dict[str, Any]:
    """What the driver reports when a run ends: its status, summary or error, attempt."""
    event: dict[str, Any] = {"kind": "finished", "run_id": run_id, "label": label,
                             "status": state, "summary": None, "error": error, "attempt": 1}
    try:
        run = store.get(run_id)
        status = run.status()
        event.update(summary=run.summary(), attempt=int(status.get("attempt") or 1))
        event["error"] = error or status.get("error")
    except Exception:  # noqa: BLE001 - a report, never a reason to stop the sweep
        pass
    return event
