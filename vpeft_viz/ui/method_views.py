"""Shared widgets of the method-view pages (SPT, SCT): find finished runs of a method in the
stores, load their analysis artifacts, say how to get runs, and launch new ones.

A run's ``artifacts/method.npz`` is what its method computed before training (sensitivity,
saliency), so reopening a view costs one file read; the read is cached by path and
modification time, and every view computation on it is a few array operations.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import streamlit as st

from ..runs import RunStoreError, queue, user_store
from ..runs.store import Run
from .inside import inside_link
from .stores import SOURCE_LABELS, store_roots

ARTIFACT = "method.npz"
T = TypeVar("T")


@dataclass
class MethodRun:
    """A finished run whose method left analysis artifacts."""

    source: str  # "cached" or "user"
    path: str
    method: str
    task: str
    seed: int
    backbone: str
    config: dict[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        return Path(self.path).name

    @property
    def label(self) -> str:
        where = "shipped" if self.source == "cached" else "yours"
        return f"{self.task} · {self.method} · seed {self.seed} ({where}: {self.id})"


def method_runs(methods: tuple[str, ...]) -> list[MethodRun]:
    """Finished runs of ``methods`` with a ``method.npz``, shipped ones first, by task."""
    out = []
    for source, root in store_roots().items():
        root = Path(root)
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if not (d / "artifacts" / ARTIFACT).is_file():
                continue
            run = Run(d, read_only=True)
            try:
                cfg = run.config
                done = run.status().get("status") == "done"
            except RunStoreError:
                continue
            if not done or cfg.get("method") not in methods:
                continue
            out.append(MethodRun(
                source=source, path=str(d), method=cfg["method"],
                task=str(cfg.get("data", {}).get("name", "?")),
                seed=int(cfg.get("train", {}).get("seed", 0)),
                backbone=str(cfg.get("backbone", {}).get("name", "?")), config=cfg))
    order = {s: i for i, s in enumerate(SOURCE_LABELS)}
    return sorted(out, key=lambda r: (order.get(r.source, 9), r.task, r.method, r.seed))


@st.cache_data(max_entries=32, show_spinner="Reading the run's analysis…")
def _arrays(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    return Run(Path(path), read_only=True).load_artifact(ARTIFACT)


def method_arrays(run: MethodRun) -> dict[str, np.ndarray]:
    """The run's ``method.npz`` as arrays (cached until the file changes)."""
    path = Path(run.path) / "artifacts" / ARTIFACT
    return _arrays(run.path, path.stat().st_mtime_ns)


def read_record(run: MethodRun, parse: Callable[[dict[str, np.ndarray]], T],
                what: str) -> T | None:
    """``parse`` of the run's ``method.npz``; None, after an error naming the run, when the
    file is unreadable or not the record ``parse`` expects."""
    try:
        return parse(method_arrays(run))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, RunStoreError) as e:
        st.error(f"Run {run.id} has no usable {what} record ({e}).", icon=":material/error:")
        return None


def method_state(run: MethodRun) -> dict[str, Any]:
    return Run(Path(run.path), read_only=True).method_state()


def run_summary(run: MethodRun) -> dict[str, Any]:
    """The run's ``summary.json`` (empty when unreadable: views show what they can)."""
    try:
        return Run(Path(run.path), read_only=True).summary() or {}
    except RunStoreError:
        return {}


def run_class_names(run: MethodRun) -> list[str]:
    """The class names the run's ``eval.json`` recorded (empty when absent or unreadable)."""
    try:
        return list(Run(Path(run.path), read_only=True).load_artifact("eval.json")
                    .get("class_names") or [])
    except RunStoreError:
        return []


def run_picker(runs: list[MethodRun], *, label: str, key: str, index: int = 0) -> MethodRun:
    i = st.selectbox(label, range(len(runs)), index=min(index, len(runs) - 1),
                     format_func=lambda j: runs[j].label, key=key)
    return runs[i]


def no_runs_note(what: str, methods: tuple[str, ...]) -> None:
    """What to do when no run of ``methods`` exists yet."""
    example = methods[0]
    st.info(f"No finished {what} runs yet, neither shipped (`cached_runs/`) nor yours. "
            f"Launch one below, or from the Train page, or from a terminal:\n\n"
            f"`python -m vpeft_viz train --method {example} --data embedded:digits`\n\n"
            "The shipped runs are regenerated with `python -m vpeft_viz cache-runs`.",
            icon=":material/info:")


def embedded_task_names() -> list[str]:
    try:
        from ..data.embedded import list_tasks

        return [t["name"] for t in list_tasks() if t.get("default", True)]
    except Exception:  # the suite is optional for a view page to open
        return []


def submit_run(*, method: str, data: str, method_config: dict[str, Any] | None = None,
               train: dict[str, Any] | None = None, backbone: dict[str, Any] | None = None
               ) -> Run:
    """Validate a run request, put it on the user store's queue and make sure a worker runs."""
    from ..runs.execute import make_run_config

    bb = backbone or {}
    config = make_run_config(method=method, data=data, method_config=method_config,
                             train=train, backbone=bb.get("name"),
                             checkpoint=bb.get("checkpoint"),
                             pretrained=bb.get("pretrained", True))
    store = user_store()
    run = queue.submit(store, config)
    queue.ensure_worker(store)
    return run


def launch_button(label: str, *, key: str, help: str | None = None, **request: Any) -> None:
    """A button that queues ``request`` (see :func:`submit_run`) and reports the outcome."""
    if st.button(label, key=key, help=help, type="primary"):
        try:
            run = submit_run(**request)
        except Exception as e:  # a bad request is reported, never raised into the page
            st.error(f"Could not queue the run: {e}", icon=":material/error:")
        else:
            st.session_state.setdefault("inspect-launched", []).append(run.id)
            st.success(f"Queued run `{run.id}`. It appears here when it is done; progress "
                       "below (and on the Train page).", icon=":material/schedule:")


def new_run_form(methods: tuple[str, ...], *, key: str) -> None:
    """Pick a method and an embedded task and queue a run with the default settings."""
    tasks = embedded_task_names()
    if not tasks:
        st.caption("The embedded task suite is not available here; use the Train page with a "
                   "data folder instead.")
        return
    c1, c2 = st.columns(2)
    method = c1.selectbox("Method", methods, key=f"{key}-method")
    task = c2.selectbox("Embedded task", tasks, key=f"{key}-task")
    launch_button(f"Train {method} on {task}", key=f"{key}-launch", method=method,
                  data=f"embedded:{task}")


def queue_panel() -> None:
    """Live progress of queued and running runs (phase 'preparing the method' is the
    sensitivity or saliency computation)."""
    from .live import live_panel

    live_panel(user_store())


def recorded(config: dict[str, Any]) -> dict[str, Any]:
    """The backbone part of a run's config, to launch a sibling run on the same backbone."""
    bb = config.get("backbone", {})
    return {"name": bb.get("name"), "pretrained": bb.get("pretrained", True),
            "checkpoint": bb.get("checkpoint")}


def pick_run_or_stop(methods: tuple[str, ...], *, what: str,
                     key: str) -> tuple[list[MethodRun], MethodRun]:
    """All runs of ``methods`` and the one picked to inspect; with none yet, offer to start
    one and stop the page."""
    runs = method_runs(methods)
    if not runs:
        no_runs_note(what, methods)
        new_run_form(methods, key=f"{key}-new")
        with st.expander("Queue and live runs"):
            queue_panel()
        st.stop()
    run = run_picker(runs, label="Run", key=f"{key}-run")
    inside_link(run.task, [run.id], "Inside this run: its test images, attributions, and "
                "where it changed the network")
    return runs, run
