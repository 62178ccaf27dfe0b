"""Widgets of the Flatness page: which runs can be measured, their cached records, and
computing missing records with a progress bar.

Any finished run whose weights are stored can be measured (not only low-bit ones); a run
whose weights were not shipped (full fine-tuning in ``cached_runs/``) still shows when its
record was computed before the weights were dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from ..analysis import flatness as fl
from ..runs import RunStoreError
from ..runs.store import Run, read_json
from .method_views import MethodRun
from .stores import SOURCE_LABELS, store_roots


def label(run: MethodRun) -> str:
    """``digits · bi-adaptformer · 1 bit · s0 (shipped)``."""
    where = "shipped" if run.source == "cached" else "yours"
    name = fl.run_label(run.method, run.config.get("method_config", {}))
    return f"{run.task} · {name} · s{run.seed} ({where}: {run.id})"


def measurable_runs() -> list[MethodRun]:
    """Finished runs with stored weights or a flatness record, shipped ones first."""
    out = []
    for source, root in store_roots().items():
        root = Path(root)
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            has_weights = (d / "weights.safetensors").is_file()
            if not (has_weights or fl.load_record(d) is not None):
                continue
            try:
                run = Run(d, read_only=True)
                cfg = run.config
                if run.status().get("status") != "done":
                    continue
            except RunStoreError:
                continue
            out.append(MethodRun(
                source=source, path=str(d), method=cfg.get("method", "?"),
                task=str(cfg.get("data", {}).get("name", "?")),
                seed=int(cfg.get("train", {}).get("seed", 0)),
                backbone=str(cfg.get("backbone", {}).get("name", "?")), config=cfg))
    order = {s: i for i, s in enumerate(SOURCE_LABELS)}
    return sorted(out, key=lambda r: (order.get(r.source, 9), r.task, r.method, r.id))


def summary(run: MethodRun) -> dict[str, Any] | None:
    """The run's summary; None when it is missing or unreadable (left out of the frontier)."""
    try:
        return read_json(Path(run.path) / "summary.json")
    except RunStoreError:
        return None


def record(run: MethodRun, settings: fl.FlatnessSettings | None = None) -> dict | None:
    return fl.load_record(Path(run.path), settings)


def compute(runs: list[MethodRun], settings: fl.FlatnessSettings) -> int:
    """Measure ``runs`` one after the other with a progress bar; returns how many failed
    (each failure is shown, naming the run)."""
    failed = 0
    bar = st.progress(0.0, text="starting…")
    for i, run in enumerate(runs):
        def progress(stage: str, done: int, total: int, i: int = i, run: MethodRun = run
                     ) -> None:
            frac = (i + (done / total if total else 0.0)) / len(runs)
            bar.progress(min(frac, 1.0), text=f"{label(run)} — {stage} {done}/{total}")

        try:
            fl.compute_flatness(Path(run.path), settings, progress=progress,
                                writable=run.source != "cached")
        except Exception as e:  # one bad run is reported, the others still run
            failed += 1
            st.error(f"Flatness of run {run.id} failed: {e}", icon=":material/error:")
    bar.progress(1.0, text="done")
    return failed
