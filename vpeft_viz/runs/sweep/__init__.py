"""Sweeps: methods × tasks × seeds × settings, run locally or on a Ray cluster (docs/sweeps.md).

``python -m vpeft_viz sweep SPEC --backend local|ray`` calls :func:`run_sweep`:

1. the TOML spec is read and expanded into validated run configs (:mod:`.spec`);
2. each planned run is matched against the store by recipe hash (:mod:`.plan`): finished
   runs are kept, runs in progress are waited for, the rest are created (an earlier failed
   attempt is moved aside, never overwritten);
3. the sweep's manifest (:mod:`.manifest`, ``<store>/.sweeps/<name>.json``) lists every
   planned run, so the dashboard's Sweeps page shows progress from the first second;
4. the backend runs them: ``local`` puts them on the store's job queue (:mod:`.local`),
   ``ray`` submits one Ray task per run with its resource request and retries
   (:mod:`.ray_backend`, the only module importing Ray).

Either way every run is an ordinary run directory of the store, written by
``execute.execute_run`` exactly as a run from the Train page or ``train`` is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..store import RunStore, RunStoreError
from .manifest import manifest_path, mark_finished, read_manifest, write_manifest
from .plan import PlanItem, SweepPlan, plan_sweep
from .spec import PlannedRun, RayOptions, SpecError, SweepSpec, expand, load_spec, parse_spec

BACKENDS = ("local", "ray")

__all__ = ["BACKENDS", "PlanItem", "PlannedRun", "RayOptions", "SpecError", "SweepPlan",
           "SweepResult", "SweepSpec", "expand", "load_spec", "manifest_path", "parse_spec",
           "plan_sweep", "read_manifest", "run_sweep"]


@dataclass
class SweepResult:
    """What a pass of the driver did: the plan and every planned run's final status."""

    name: str
    plan: SweepPlan
    final: dict[str, str] = field(default_factory=dict)  # run id → status
    # run id → attempts, of the runs this pass ran or waited for (> 1: retried)
    attempts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state in self.final.values():
            out[state] = out.get(state, 0) + 1
        return out

    def summary(self) -> dict:
        return {"sweep": self.name, "planned": len(self.plan.items),
                "kept": self.plan.count("kept"), "in_progress": self.plan.count("in progress"),
                "new": self.plan.count("new"), "restarted": self.plan.count("restarted"),
                "final": self.counts(),
                "retried": sorted(r for r, n in self.attempts.items() if n > 1),
                "seconds": round(self.seconds, 1),
                "runs": [i.entry() | {"status": self.final.get(i.run_id)}
                         for i in self.plan.items]}


def run_sweep(spec: SweepSpec | str | Path, store: RunStore, *, backend: str = "local",
              address: str | None = None, num_cpus: int | None = None, dry_run: bool = False,
              progress: Callable[[dict], None] | None = None) -> SweepResult:
    """Run every planned run of ``spec`` not already done in ``store`` (see the module).

    ``progress`` receives events: ``{"kind": "plan", "plan": SweepPlan}`` once, then
    ``{"kind": "finished", "run_id", "label", "status", "summary", "error", "attempt"}`` per
    run as it ends, ``{"kind": "retry", ..., "retry": n}`` when the local backend queues a
    run whose worker died again, and ``{"kind": "tick", "states": {run id: status}}`` while
    waiting.
    ``dry_run`` plans without writing anything. ``address`` and ``num_cpus`` are the Ray
    cluster's (None: a local Ray instance with ``num_cpus`` CPUs, default all).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if store.read_only:
        raise RunStoreError(f"store {store.root} is read-only; a sweep needs a writable store")
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    emit = progress or (lambda event: None)
    start = time.time()
    plan = plan_sweep(spec, store)
    result = SweepResult(spec.name, plan)
    emit({"kind": "plan", "plan": plan})
    if dry_run:
        return result
    if backend == "ray":  # fail on a missing Ray before anything is written
        from .ray_backend import import_ray

        import_ray()
    store.root.mkdir(parents=True, exist_ok=True)
    write_manifest(store.root, name=spec.name, spec_file=spec.source, spec=spec.raw,
                   backend=backend, address=address,
                   ray=asdict(spec.ray) if backend == "ray" else None,
                   runs=[i.entry() for i in plan.items])
    try:
        if backend == "local":
            from .local import run_local

            result.final = run_local(store, plan, progress=emit)
        else:
            from .ray_backend import run_ray

            owner = f"sweep {spec.name} (ray, driver {uuid.uuid4().hex[:12]})"
            result.final = run_ray(store, plan, owner=owner, address=address,
                                   progress=emit, num_cpus=num_cpus)
    finally:
        result.seconds = time.time() - start
        result.attempts = _attempts(store, [i.run_id for i in plan.items
                                            if i.origin != "kept"])
        try:
            mark_finished(store.root, spec.name, {"final": result.counts(),
                                                   "seconds": round(result.seconds, 1)})
        except (RunStoreError, OSError):
            pass
    return result


def _attempts(store: RunStore, run_ids: list[str]) -> dict[str, int]:
    out = {}
    for run_id in run_ids:
        try:
            out[run_id] = int(store.get(run_id).status().get("attempt") or 1)
        except (RunStoreError, TypeError, ValueError):
            out[run_id] = 0
    return out
