"""Cached loaders of the run stores, and the run picker the pages share.

The shipped ``cached_runs/`` store changes only when it is regenerated, so its table is kept
until its fingerprint changes; the user store changes while runs train, so its table also
expires after a few seconds. Both caches are bounded.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from .. import runs as run_stores
from ..analysis.compare import (
    RunTable,
    SeedEval,
    known_task_groups,
    label_settings,
    load_curves,
    load_runs,
    seed_eval,
)
from ..analysis.pixel_baseline import read_reference
from ..runs.store import RunStore, RunStoreError, read_metrics

SOURCE_LABELS = {"cached": "shipped cached_runs/", "user": "your runs"}


def _fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a run starts, ends or is added: ids and status/summary mtimes."""
    if not root.is_dir():
        return ()
    out = []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        stamps = []
        for name in ("status.json", "summary.json"):
            try:
                stamps.append((d / name).stat().st_mtime_ns)
            except OSError:
                stamps.append(0)
        out.append((d.name, *stamps))
    return tuple(out)


@st.cache_data(ttl=600, show_spinner=False)
def embedded_task_groups() -> dict[str, str]:
    """Embedded task → group (natural / specialized / structured)."""
    return known_task_groups()


@st.cache_data(max_entries=4, show_spinner=False)
def _cached_table(root: str, fingerprint: tuple, groups: dict[str, str]) -> RunTable:
    return load_runs({"cached": RunStore(root, read_only=True)}, groups)


@st.cache_data(ttl=10, max_entries=16, show_spinner=False)
def _user_table(root: str, fingerprint: tuple, groups: dict[str, str]) -> RunTable:
    return load_runs({"user": RunStore(root, read_only=True)}, groups)


def store_roots() -> dict[str, Path]:
    """Where each source lives now (read at call time, so tests can point elsewhere)."""
    return {"cached": run_stores.cached_store().root, "user": run_stores.user_store_path()}


@st.cache_data(max_entries=8, show_spinner=False)
def _reference(path: str, mtime_ns: int) -> tuple[dict[str, dict], str | None]:
    try:
        return read_reference(Path(path)), None
    except ValueError as e:
        return {}, str(e)


def pixel_reference() -> tuple[dict[str, dict], list[str]]:
    """Task → "pixels, no backbone" record (``python -m vpeft_viz pixels``) from the shipped
    store and the user store (the user's own wins), and the problems met reading them."""
    records: dict[str, dict] = {}
    problems = []
    for root in store_roots().values():
        path = Path(root) / run_stores.PIXEL_REFERENCE_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        found, problem = _reference(str(path), mtime)
        records.update(found)
        if problem:
            problems.append(problem)
    return records, problems


def load_run_table(sources: tuple[str, ...] = ("cached", "user")) -> RunTable:
    """Finished runs of the chosen sources, one row per run (see ``analysis.compare``)."""
    groups = embedded_task_groups()
    roots = store_roots()
    loaders = {"cached": _cached_table, "user": _user_table}
    tables = [loaders[s](str(roots[s]), _fingerprint(roots[s]), groups) for s in sources]
    frames = [t.runs for t in tables if not t.runs.empty]
    runs = pd.concat(frames, ignore_index=True) if frames else tables[0].runs.iloc[0:0]
    # Settings are labelled over every store together: a run of yours that differs from a
    # shipped one only by its epochs must not carry the same label.
    return RunTable(label_settings(runs), [s for t in tables for s in t.skipped])


def run_counts() -> dict[str, dict[str, int]]:
    """Runs per status in each store (the home page's counts)."""
    out: dict[str, dict[str, int]] = {}
    for source, root in store_roots().items():
        counts: dict[str, int] = {}
        for run in RunStore(root, read_only=True).list():
            try:
                status = run.status().get("status", "queued")
            except run_stores.RunStoreError:
                status = "unreadable"
            counts[status] = counts.get(status, 0) + 1
        out[source] = counts
    return out


def run_filters(runs: pd.DataFrame, *, key: str = "runs") -> pd.DataFrame:
    """Sidebar filters by source, task, backbone and method; returns the chosen rows."""
    st.sidebar.subheader("Choose runs")
    chosen = runs
    for col, label in (("source", "Source"), ("task", "Task"), ("backbone", "Backbone"),
                       ("method", "Method")):
        options = list(dict.fromkeys(runs[col].dropna()))
        if not options:
            continue
        fmt = (lambda s: SOURCE_LABELS.get(s, s)) if col == "source" else str
        picked = st.sidebar.multiselect(label, options, default=options, format_func=fmt,
                                        key=f"{key}-filter-{col}")
        chosen = chosen[chosen[col].isin(picked)]
    return chosen


# Finished runs do not change, so their curves and evaluations are cached by run path.
@st.cache_data(max_entries=64, show_spinner=False)
def run_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of the given runs (see ``analysis.compare.load_curves``); runs whose
    ``metrics.jsonl`` does not pass the store's reader are left out instead of breaking the
    figure."""
    return load_curves(runs[[_metrics_readable(p) for p in runs["path"]]])


def _metrics_readable(path: str) -> bool:
    try:
        read_metrics(Path(path) / "metrics.jsonl")
    except RunStoreError:
        return False
    return True


@st.cache_data(max_entries=256, show_spinner=False)
def group_eval(paths: tuple[str, ...],
               class_names: tuple[str, ...] | None = None) -> SeedEval | None:
    """Per-class accuracy and confusion of runs that differ only by seed (``class_names``
    names the classes of runs recorded without them)."""
    return seed_eval(paths, class_names)
