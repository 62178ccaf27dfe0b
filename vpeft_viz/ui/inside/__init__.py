"""Widgets of the Inside page (``pages/12_Inside.py``, docs/inside.md): which runs, their
per-image predictions (gallery and filters), attributions, and what changed in the network.

Every view lives in the URL (``?task=&runs=&tab=&filter=&true=&pred=&image=…``), so
Compare's confusion matrix can open the images of a cell and a view can be shared. Models are
cached per server process (``st.cache_resource``, never mutated; a lock per model guards the
measurements that hook it), computed records on disk (:mod:`vpeft_viz.analysis.inside.records`:
with the run, or in the user cache for the read-only ``cached_runs/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st
from streamlit.errors import StreamlitAPIException

from ...analysis.inside import examples as ex
from ...analysis.inside import models as mdl
from ...analysis.inside import records
from ...plots import group_label
from ..common import link_to_page
from ..stores import load_run_table

PAGE = "12_Inside.py"
TABS = ["Examples", "Attributions", "Network"]
DEFAULT_METHODS = ("linear", "lora", "vpt-deep", "ssf")
MAX_RUNS = 8


@dataclass(frozen=True)
class InsideRun:
    """A finished run as the Inside page shows it."""

    run_id: str
    path: str
    source: str  # "cached" (read-only) or "user"
    method: str
    task: str
    seed: int
    label: str

    @property
    def writable(self) -> bool:
        return self.source == "user"

    @property
    def has_weights(self) -> bool:
        return mdl.has_weights(self.path)


# -- runs and models ----------------------------------------------------------------------
def finished_runs() -> list[InsideRun]:
    """Every finished run with a test accuracy (both stores), labelled uniquely per task:
    ``lora · s0``, ``lora · s0 (yours)`` beside a shipped one, then the run id if needed."""
    table = load_run_table().runs
    out: list[InsideRun] = []
    taken: set[tuple[str, str]] = set()
    for r in table.sort_values("source", kind="stable").to_dict("records"):  # cached first
        label = f"{group_label(r['method'], r['setting'])} · s{int(r['seed'])}"
        if (r["task"], label) in taken and r["source"] == "user":
            label += " (yours)"
        if (r["task"], label) in taken:
            label += f" ({r['run_id']})"
        taken.add((r["task"], label))
        out.append(InsideRun(run_id=r["run_id"], path=r["path"], source=r["source"],
                             method=r["method"], task=r["task"], seed=int(r["seed"]),
                             label=label))
    return sorted(out, key=lambda r: (r.task, r.method, r.label))


def default_runs(on_task: list[InsideRun]) -> list[str]:
    """A few runs to start from: the first seed of some common methods, with weights."""
    picked = []
    for m in DEFAULT_METHODS:
        picked += [r.run_id for r in on_task if r.method == m and r.has_weights][:1]
    if not picked:
        picked = [r.run_id for r in on_task if r.has_weights][:4]
    return picked or [r.run_id for r in on_task][:1]


@st.cache_resource(max_entries=12, show_spinner="Rebuilding the run's model…")
def _view_model(path: str, fingerprint: str):
    return mdl.load_view_model(path)


def view_model(run: InsideRun):
    return _view_model(run.path, records.run_fingerprint(run.path))


@st.cache_resource(max_entries=3, show_spinner="Building the frozen backbone…")
def _frozen(spec: mdl.FrozenSpec, key: str):
    return mdl.load_frozen(spec)


def frozen_of(run: InsideRun):
    spec = mdl.FrozenSpec.of(mdl.run_config(run.path))
    return spec, _frozen(spec, spec.key())


def progress_bar(what: str):
    """A progress bar and a ``(stage, done, total)`` callback that drives it."""
    bar = st.progress(0.0, text=what)

    def step(stage: str, done: int, total: int) -> None:
        bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{what} — {stage} "
                     f"{done}/{total}")
    return bar, step


# -- picking ------------------------------------------------------------------------------
def pick_runs(runs: list[InsideRun]) -> tuple[str, list[InsideRun]]:
    """Task and runs (bound to ``?task=`` and ``?runs=``)."""
    tasks = sorted({r.task for r in runs})
    c1, c2 = st.columns([1, 3])
    task = c1.selectbox("Task", tasks, index=tasks.index("digits") if "digits" in tasks else 0,
                        key="task", bind="query-params")
    on_task = [r for r in runs if r.task == task]
    by_id = {r.run_id: r for r in on_task}
    _sync_runs(by_id, default_runs(on_task))
    chosen_ids = c2.multiselect(
        "Runs (methods, seeds)", list(by_id), format_func=lambda i: by_id[i].label + (
            "" if by_id[i].source == "user" else " · shipped"),
        max_selections=MAX_RUNS, key="runs", help="Finished runs on this task, shipped "
        "(cached_runs/) and yours.")
    st.query_params["runs"] = chosen_ids  # the URL names runs by id (shareable links)
    st.session_state[_RUNS_URL] = list(chosen_ids)
    chosen = [by_id[i] for i in chosen_ids]
    without = [r for r in chosen if not r.has_weights]
    if without:
        st.info("No stored weights, so nothing can be recomputed for: "
                + ", ".join(f"**{r.label}**" for r in without)
                + ". Shipped full fine-tuning keeps only its summary (its weights are over "
                "cached_runs/' size limit); a run you train yourself keeps them. Runs made "
                "now also store their test predictions, so their examples show without "
                "weights.", icon=":material/info:")
    return task, chosen


_RUNS_URL = "inside-runs-url"  # the runs this page last wrote into the URL
_OPENED = "inside-opened-view"  # a view another page opened this one on


def _sync_runs(by_id: dict[str, InsideRun], default: list[str]) -> None:
    """Set the run picker's value: the URL's ``runs`` when it was set from outside (a link),
    else what the picker held (if all on this task), else ``default``.

    Not ``bind="query-params"``: with a ``format_func`` the URL would hold the labels."""
    url = [i for i in st.query_params.get_all("runs") if i in by_id]
    held = st.session_state.get("runs")
    if url and url != st.session_state.get(_RUNS_URL):
        st.session_state["runs"] = url[:MAX_RUNS]
    elif held is not None and set(held) <= set(by_id):
        pass
    else:
        st.session_state["runs"] = [i for i in (held or []) if i in by_id] or default


def compare_link(task: str) -> None:
    link_to_page("2_Compare.py", f"Compare every run on {task}", icon=":material/compare:",
                 query_params={"task": task})


def inside_link(task: str, run_ids: list[str], label: str, **extra: str) -> None:
    """A link to this page with ``run_ids`` chosen (from Compare and the method views)."""
    link_to_page(PAGE, label, icon=":material/search_insights:",
                 query_params={"task": task, "runs": list(run_ids), **extra})


def open_confusion_cell(event: Any, class_names: list[str], *, task: str,
                        run_ids: list[str]) -> None:
    """Compare's confusion matrix: a clicked cell opens its images here.

    The view travels in the session, not in ``switch_page``'s query parameters: Streamlit
    refuses to set parameters that widgets of the current page are bound to (Compare's
    ``task`` and ``tab``). :func:`apply_opened_view` sets the pickers on arrival, and
    their bindings write the view into the URL."""
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    query = ex.cell_query(points, class_names, task=task, run_ids=run_ids)
    if query is None:
        return
    st.session_state[_OPENED] = query
    try:
        st.switch_page(f"pages/{PAGE}")
    except StreamlitAPIException:  # a page run alone knows no other page
        st.session_state.pop(_OPENED, None)
        inside_link(task, run_ids, "Open the images of this cell", **{
            k: v for k, v in query.items() if k not in ("task", "runs")})


def apply_opened_view() -> None:
    """Set the pickers to the view another page opened this one on (see
    :func:`open_confusion_cell`); called before any of them is drawn."""
    query = st.session_state.pop(_OPENED, None)
    if not query:
        return
    for key, value in query.items():
        st.session_state[key] = value
    st.session_state[_RUNS_URL] = list(query.get("runs", []))
