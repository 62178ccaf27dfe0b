"""The ``ray`` backend: each run is a Ray task writing into the shared store (docs/sweeps.md).

Ray is imported here only (``requirements-ray.txt``; the dashboard never needs it). The
driver creates and claims every run directory first (status ``queued``, ``claim`` naming the
sweep), so the dashboard shows the whole sweep at once and no local queue worker takes a
run. Each run is then submitted as one task of :func:`plan.execute_claimed` with the spec's
resource request (``[ray] num_cpus``, fractional ``num_gpus``) and ``max_retries``: Ray
re-runs a task whose worker process or node died (never one whose run raised), and the
retry moves the dead attempt's directory aside before starting afresh.

Every node must see the store at the same path (a shared mount) and import this
repository's ``vpeft_viz`` with the same packages; the driver passes its repository on
``PYTHONPATH`` and the run's thread count in the job's runtime environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .. import REPO_ROOT
from ..store import FINISHED, RunStore
from .local import finished_event, tick_s
from .plan import SweepPlan, claim_queued, create_run, execute_claimed, snapshot
from .spec import RayOptions

INSTALL_HINT = "pip install -r requirements-ray.txt"


class RayBackendError(RuntimeError):
    """Ray is missing, unreachable, or cannot give a run what it asks for."""


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RayBackendError(f"the ray backend needs Ray ({INSTALL_HINT}): {e}") from None
    return ray


def runtime_env(threads: int) -> dict[str, Any]:
    """The job's environment on every worker: this repository importable, N threads."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": str(threads),
                         "MKL_NUM_THREADS": str(threads)}}


def connect(address: str | None, threads: int, *, num_cpus: int | None = None,
            **init_kwargs: Any) -> bool:
    """Connect to the cluster at ``address`` (``auto``: the one ``ray start`` runs here), or
    start a local Ray instance (``num_cpus`` CPUs, default all) when it is None. Returns
    whether this call started Ray (so the caller shuts it down); an already initialised Ray
    (a test's cluster) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(threads), **init_kwargs}
    if address is None:
        kwargs.setdefault("include_dashboard", False)
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise RayBackendError(f"cannot reach a Ray cluster at {address!r}: {e} (start one "
                              "with `ray start --head`, see docs/sweeps.md)") from None
    return True


def check_resources(opts: RayOptions) -> None:
    """Fail now, not hang: a run asking for more CPUs or GPUs than any node has would wait
    forever (Ray keeps infeasible tasks pending)."""
    ray = import_ray()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    best_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    if opts.num_gpus > best_gpu:
        raise RayBackendError(f"each run asks for num_gpus = {opts.num_gpus:g} but no node of "
                              f"the cluster has that many GPUs (most: {best_gpu:g}); set [ray] "
                              "num_gpus = 0 to train on CPUs")
    if opts.num_cpus > best_cpu:
        raise RayBackendError(f"each run asks for num_cpus = {opts.num_cpus:g} but no node of "
                              f"the cluster has that many CPUs (most: {best_cpu:g}); lower "
                              "[ray] num_cpus")


def run_ray(store: RunStore, plan: SweepPlan, *, owner: str, address: str | None,
            progress: Callable[[dict], None], num_cpus: int | None = None,
            poll_s: float = 0.25) -> dict[str, str]:
    """Submit the plan's runs as Ray tasks and wait for all of them; run id → final status."""
    ray = import_ray()
    opts = plan.spec.ray
    started_here = connect(address, opts.threads, num_cpus=num_cpus)
    try:
        check_resources(opts)
        return _submit_and_wait(ray, store, plan, owner, progress, poll_s)
    finally:
        if started_here:
            ray.shutdown()


def _submit_and_wait(ray, store: RunStore, plan: SweepPlan, owner: str,
                     progress: Callable[[dict], None], poll_s: float) -> dict[str, str]:
    opts = plan.spec.ray
    task = ray.remote(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                      max_retries=opts.max_retries, retry_exceptions=False)(execute_claimed)
    labels = {i.run_id: i.run.label for i in plan.items}
    final = {i.run_id: "done" for i in plan.items if i.origin == "kept"}
    refs: dict[Any, str] = {}
    watched: list[str] = []  # in progress elsewhere (another driver, a local worker)
    for item in plan.items:
        run = None
        if item.origin in ("new", "restarted"):
            run = create_run(store, item, claim_owner=owner)
        elif item.origin == "in progress":
            run = claim_queued(store, item.run_id, owner)
        if run is not None:
            refs[task.remote(str(store.root), run.id, owner, opts.threads)] = run.id
        elif item.origin != "kept":
            watched.append(item.run_id)
    pending = list(refs)
    next_tick = 0.0
    try:
        while pending or watched:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s) \
                if pending else ([], [])
            for ref in ready:
                run_id = refs[ref]
                final[run_id], error = _outcome(ray, store, ref, run_id, opts)
                progress(finished_event(store, run_id, labels[run_id], final[run_id], error))
            for run_id, state in snapshot(store, watched).items():
                if state in FINISHED:
                    final[run_id] = state
                    watched.remove(run_id)
                    progress(finished_event(store, run_id, labels[run_id], state))
            if not pending and watched:
                time.sleep(poll_s)
            if time.monotonic() >= next_tick:  # every planned run's status.json: throttled
                live = snapshot(store, [refs[r] for r in pending] + watched)
                progress({"kind": "tick", "states": {**final, **live}})
                next_tick = time.monotonic() + tick_s(len(live))
    except BaseException:  # Ctrl-C or an error: stop this sweep's tasks, record why
        for ref in pending:
            ray.cancel(ref, force=True)
        _cancel_unfinished(store, [refs[r] for r in pending], "the sweep's driver stopped")
        raise
    return final


def _outcome(ray, store: RunStore, ref, run_id: str, opts: RayOptions) -> tuple[str, str | None]:
    """A finished task's run status, and the error when its retries ran out."""
    try:
        summary = ray.get(ref)
        return ("cancelled" if summary.get("cancelled") else "done"), None
    except ray.exceptions.RayTaskError as e:  # the run raised: execute_run recorded why
        state = snapshot(store, [run_id])[run_id]
        if state in FINISHED:
            return state, None
        cause = getattr(e, "cause", None) or e  # raised before the run started
        text = str(cause).strip()
        why = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
        _fail_unfinished(store, run_id, why)
        return "failed", why
    except ray.exceptions.RayError as e:  # worker or node died on every attempt
        why = (f"its Ray worker died on all {opts.max_retries + 1} attempt(s) "
               f"({type(e).__name__})")
        _fail_unfinished(store, run_id, why)
        return "failed", why


def _fail_unfinished(store: RunStore, run_id: str, why: str) -> None:
    try:
        run = store.get(run_id)
        if run.status().get("status") not in FINISHED:
            run.set_status("failed", error=why, finished=time.time())
    except Exception:  # noqa: BLE001 - best effort: the status read repairs it on this host
        pass


def _cancel_unfinished(store: RunStore, run_ids: list[str], why: str) -> None:
    for run_id in run_ids:
        try:
            run = store.get(run_id)
            if run.status().get("status") not in FINISHED:
                run.set_status("cancelled", error=why, finished=time.time())
        except Exception:  # noqa: BLE001 - best effort while stopping
            pass
