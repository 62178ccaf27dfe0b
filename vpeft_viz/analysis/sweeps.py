"""What the Sweeps page computes: each sweep's progress, settings → accuracy, best settings.

A sweep (``python -m vpeft_viz sweep``, docs/sweeps.md) is identified by its manifest,
``<store>/.sweeps/<name>.json``, which lists every planned run by id with the grid values
that made it. Everything here reads the manifest and the runs' own ``status.json`` and
``summary.json`` (never writing: a run whose process died reads as failed without being
rewritten), so the page can watch a sweep while a cluster fills the store.

Model selection follows the lab's protocol: a run's reported test accuracy is its
validation-selected epoch's; a method's best setting is the one with the highest *mean
validation* accuracy over its finished seeds, and only then is that setting's test accuracy
read. Test accuracies never take part in the choice (:func:`best_settings`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..runs.store import FINISHED, Run, RunStoreError
from ..runs.sweep.manifest import manifest_paths, read_manifest

STATUS_ORDER = ("done", "running", "queued", "failed", "cancelled", "missing")
ACTIVE = ("running", "queued")
RUN_COLUMNS = ["run_id", "order", "task", "backbone", "method", "seed", "origin", "status",
               "attempt", "phase", "step", "steps", "error", "started", "finished", "val_acc",
               "test_acc", "train_time_s", "setting"]


@dataclass
class SweepView:
    """One sweep: its manifest and one row per planned run (settings as ``set.*``/``train.*``
    columns)."""

    name: str
    manifest: dict[str, Any]
    runs: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # runs that could not be read

    @property
    def active(self) -> bool:
        return bool(self.runs["status"].isin(ACTIVE).any())


def load_sweeps(store_root: str | Path) -> tuple[list[SweepView], list[str]]:
    """Every sweep of a store (by name) and the manifests that could not be read."""
    sweeps, problems = [], []
    for path in manifest_paths(store_root):
        try:
            manifest = read_manifest(path)
        except RunStoreError as e:
            problems.append(str(e))
            continue
        runs, run_problems = sweep_runs(manifest, store_root)
        sweeps.append(SweepView(manifest["name"], manifest, runs, run_problems))
    return sweeps, problems


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    out = {f"set.{k}": v for k, v in (entry.get("set") or {}).items()}
    out.update({f"train.{k}": v for k, v in (entry.get("train") or {}).items()})
    return out


def sweep_runs(manifest: dict[str, Any], store_root: str | Path,
               ) -> tuple[pd.DataFrame, list[str]]:
    """One row per planned run: where it stands now, and its accuracies once done."""
    rows, problems = [], []
    for order, entry in enumerate(manifest["runs"]):
        row: dict[str, Any] = {
            "run_id": entry["run_id"], "order": order, "task": entry["task"],
            "backbone": entry.get("backbone"), "method": entry["method"],
            "seed": entry["seed"], "origin": entry.get("origin", "new"), "status": "missing",
            "attempt": 1, "phase": None, "step": None, "steps": None, "error": None,
            "started": None, "finished": None, "val_acc": math.nan, "test_acc": math.nan,
            "train_time_s": math.nan, **_settings(entry)}
        run = Run(Path(store_root) / entry["run_id"], read_only=True)
        try:
            if (run.path / "config.json").is_file():
                status = run.status()
                progress = status.get("progress") or {}
                row.update(status=status.get("status", "queued"),
                           attempt=int(status.get("attempt") or 1), error=status.get("error"),
                           phase=progress.get("phase"), step=progress.get("step"),
                           steps=progress.get("steps"), started=status.get("started"),
                           finished=status.get("finished"))
                if row["status"] == "done":
                    summary = run.summary() or {}
                    for key in ("val_acc", "test_acc", "train_time_s"):
                        value = summary.get(key)
                        row[key] = math.nan if value is None else float(value)
        except (RunStoreError, TypeError, ValueError) as e:
            row.update(status="failed", error=f"unreadable: {e}")
            problems.append(f"{entry['run_id']}: {e}")
        rows.append(row)
    extra = sorted({k for r in rows for k in r} - set(RUN_COLUMNS))
    df = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *extra])
    for c in extra:  # grid values as written (an int axis with gaps must not turn float)
        df[c] = pd.Series([r.get(c) for r in rows], index=df.index, dtype=object)
    df["setting"] = setting_labels(df)
    return df, problems


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The ``set.*`` and ``train.*`` columns whose value differs somewhere in the sweep."""
    cols = [c for c in runs.columns if c.startswith(("set.", "train."))]
    return [c for c in cols if runs[c].map(_key).nunique() > 1]


def _key(value: Any) -> str:
    return json.dumps(None if _missing(value) else value, default=str)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def setting_labels(runs: pd.DataFrame) -> pd.Series:
    """Per run, what sets its setting apart: ``"rank=8, lr=0.01"`` over the grid axes that
    vary and apply to its method; empty when the method was run in one setting."""
    cols = setting_columns(runs)

    def label(row: pd.Series) -> str:
        return ", ".join(f"{c.split('.', 1)[1]}={row[c]}" for c in cols if not _missing(row[c]))

    return runs.apply(label, axis=1) if len(runs) else pd.Series([], dtype=object)


# -- progress -----------------------------------------------------------------------------------
def progress_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Runs per status, every status of :data:`STATUS_ORDER` present (0 when none)."""
    counts = runs["status"].value_counts()
    return {s: int(counts.get(s, 0)) for s in STATUS_ORDER}


def eta_s(runs: pd.DataFrame, manifest: dict[str, Any], now: float | None = None,
          ) -> float | None:
    """Seconds left at the rate runs have ended since this pass of the sweep started (None
    before the first one ends, or when nothing is left)."""
    now = time.time() if now is None else now
    started = manifest.get("started")
    left = int(runs["status"].isin((*ACTIVE, "missing")).sum())
    if not started or not left or now <= started:
        return None
    ended = runs[runs["status"].isin(FINISHED) & (runs["origin"] != "kept")]
    ended = ended[pd.to_numeric(ended["finished"], errors="coerce") >= started]
    if ended.empty:
        return None
    return left / (len(ended) / (now - started))


def method_status(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per method and status (rows: methods in plan order; columns: statuses)."""
    methods = list(dict.fromkeys(runs["method"]))
    table = pd.crosstab(runs["method"], runs["status"])
    return table.reindex(index=methods, columns=list(STATUS_ORDER), fill_value=0)


def running_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The running runs: id, what they are, phase and step."""
    r = runs[runs["status"] == "running"]
    step = [f"{int(a)}/{int(b)}" if not (_missing(a) or _missing(b)) else ""
            for a, b in zip(r["step"], r["steps"])]
    return pd.DataFrame({"run": r["run_id"], "method": r["method"], "task": r["task"],
                         "setting": r["setting"], "seed": r["seed"], "phase": r["phase"],
                         "step": step, "attempt": r["attempt"]})


# -- results ------------------------------------------------------------------------------------
def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Done runs with both accuracies."""
    return runs[(runs["status"] == "done") & runs["val_acc"].notna()
                & runs["test_acc"].notna()]


def parallel_axes(runs: pd.DataFrame) -> list[str]:
    """The grid axes of a parallel-coordinates view: backbone, task and method when they
    vary, then every varying setting (accuracy axes are added by the figure)."""
    axes = [c for c in ("backbone", "task", "method") if runs[c].nunique() > 1]
    return axes + setting_columns(runs)


def setting_means(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, backbone, method, setting): mean validation and test accuracy over
    the finished seeds, the test spread, seeds finished and planned."""
    cols = ["task", "backbone", "method", "setting", "order", "val_acc", "test_acc",
            "test_std", "seeds_done", "seeds_planned"]
    rows = []
    for keys, group in runs.groupby(["task", "backbone", "method", "setting"], sort=False,
                                    dropna=False):
        done = finished(group)
        rows.append({**dict(zip(cols[:4], keys)), "order": int(group["order"].min()),
                     "val_acc": float(done["val_acc"].mean()) if len(done) else math.nan,
                     "test_acc": float(done["test_acc"].mean()) if len(done) else math.nan,
                     "test_std": float(done["test_acc"].std(ddof=1)) if len(done) > 1
                     else math.nan,
                     "seeds_done": len(done), "seeds_planned": len(group)})
    return pd.DataFrame(rows, columns=cols)


def best_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task, backbone and method, the setting with the best mean *validation* accuracy
    (ties: the first in the spec's order) and that setting's mean test accuracy.

    Only validation accuracies are compared; the test column is read after the choice.
    ``complete`` says whether every planned seed of every setting of the method has
    finished (until then the choice may still change).
    """
    cols = ["task", "backbone", "method", "setting", "val_acc", "test_acc", "test_std",
            "seeds", "settings", "complete"]
    means = setting_means(runs)
    rows = []
    for keys, group in means.groupby(["task", "backbone", "method"], sort=False, dropna=False):
        scored = group[group["val_acc"].notna()]
        if scored.empty:
            continue
        order = np.lexsort((scored["order"].to_numpy(), -scored["val_acc"].to_numpy()))
        best = scored.iloc[int(order[0])]
        rows.append({**dict(zip(cols[:3], keys)), "setting": best["setting"],
                     "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "test_std": best["test_std"],
                     "seeds": f"{int(best['seeds_done'])}/{int(best['seeds_planned'])}",
                     "settings": f"{len(scored)}/{len(group)}",
                     "complete": bool((group["seeds_done"] == group["seeds_planned"]).all())})
    return pd.DataFrame(rows, columns=cols)
