"""Side-by-side comparison of finished runs: a tidy table, seed statistics, Pareto frontiers.

The pipeline the Compare page (and the guided tour, :mod:`.tour`) runs:

1. :func:`load_runs` reads every finished run of some stores into one row per run
   (config, summary, derived cost columns) — no torch import, only small JSON files;
2. :func:`aggregate` groups runs that differ only by seed into one row per
   (task, backbone, method, setting) with mean, sample standard deviation and count;
3. :func:`pareto_front` marks the rows no other row beats on accuracy *and* cost;
4. :func:`multi_task_means` averages over tasks and says which mean it is: a *plain* mean of
   the tasks, or a *group* mean (mean of the natural / specialized / structured group means,
   VTAB-1k's "G"), which exists only when every task's group is known;
5. :func:`export_json` / :func:`read_export_json` write and read the whole comparison.

Protocol: every run keeps the epoch with the best *validation* accuracy; its test accuracy
is measured once, on that checkpoint (:data:`PROTOCOL_NOTE`).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.formats import VTAB_GROUPS
from ..runs.recipe import canonical_config
from ..runs.store import RunStore, RunStoreError, read_json
from .cost import percent_of_backbone, ppt_score

PROTOCOL_NOTE = ("Selected on validation; test reported once: each run keeps the epoch with "
                 "the best validation accuracy, and its test accuracy is measured once, on "
                 "that checkpoint. ± is the sample standard deviation over seeds.")

GROUPS = ("natural", "specialized", "structured")

# Summary fields copied into the run table (see runs/execute.py).
SUMMARY_FIELDS = ("num_classes", "epochs", "best_epoch", "val_acc", "test_acc", "test_loss",
                  "trainable_params", "trainable_params_excl_head", "total_params",
                  "backbone_params", "weight_bytes", "train_time_s", "images_per_s",
                  "peak_memory_bytes", "flops_per_image", "device", "train_size")
# Quantities that vary from seed to seed: mean and spread are reported.
SEED_METRICS = ("val_acc", "test_acc", "test_loss", "train_time_s", "images_per_s",
                "peak_memory_bytes")
# Quantities fixed by the setting (equal across seeds up to data-dependent selections).
FIXED_METRICS = ("trainable_params", "trainable_params_excl_head", "backbone_params",
                 "weight_bytes", "flops_per_image", "num_classes", "epochs", "shots")
GROUP_KEYS = ("task", "backbone", "method", "setting_key")
# Config entries that never make two runs a different experiment.
_NOT_SETTING = {"train.seed", "train.shots_seed", "train.device", "train.eval_batch_size",
                "data.spec", "data.name", "versions"}
# Per-epoch columns of metrics.jsonl shown as curves.
CURVE_METRICS = ("val_acc", "train_loss", "val_loss", "train_acc")


@dataclass
class RunTable:
    """Finished runs of some stores, one row each, and the runs that could not be read."""

    runs: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # "run_id: reason"


# -- loading ------------------------------------------------------------------------------
def known_task_groups() -> dict[str, str]:
    """Embedded task → group, from the embedded suite (empty while it is unavailable)."""
    try:
        from ..data.embedded import list_tasks
    except ImportError:
        return {}
    return {t["name"]: t["group"] for t in list_tasks()}


def task_group(spec: str, name: str, embedded_groups: Mapping[str, str]) -> str | None:
    """Group of a task: the embedded suite's for ``embedded:`` specs, VTAB-1k's for folders."""
    if spec.startswith("embedded:"):
        return embedded_groups.get(name)
    return VTAB_GROUPS.get(name)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _setting(cfg: Mapping[str, Any], device: str) -> dict[str, Any]:
    """What defines the experiment apart from task and seed (device type included: cost
    figures and precision depend on it)."""
    cfg = canonical_config(cfg)  # older runs' implicit backbone weights and learning rate
    flat = _flatten({k: v for k, v in cfg.items() if k != "versions"})
    # An unset (null) entry reads as absent: runs made before a setting existed (e.g.
    # train.shots, few-shot splits) group with today's runs that leave it unset.
    flat = {k: v for k, v in flat.items() if k not in _NOT_SETTING and v is not None}
    flat["device"] = device.split(":")[0]
    return flat


def _short(key: str, keys: Iterable[str]) -> str:
    if key == "backbone.name":
        return "backbone"
    last = key.rsplit(".", 1)[-1]
    clash = sum(k.rsplit(".", 1)[-1] == last for k in keys) > 1
    return key if clash else last


# Entries whose values belong to a method (each method has its own default learning rate):
# named, like its ``method_config``, only when settings of that method differ in them.
PER_METHOD_ENTRIES = ("train.lr",)


def _own_entry(name: str) -> bool:
    return name.startswith("method_config.") or name in PER_METHOD_ENTRIES


_UNSET = "\x00unset"  # an entry a setting lacks, when counting its usual value


def setting_labels(setting_keys: Iterable[str],
                   stores_of: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
    """A short label per setting (``setting_key`` JSON → ``"epochs=3, rank=4"``).

    A run's label names what sets it apart among *all* the settings given (every store
    loaded together; ``stores_of``: setting key → the stores holding runs of it).

    * A shared entry (epochs, backbone, device...) that tells stores apart — a store has an
      unusual value of it that no other store has, e.g. your 3-epoch runs beside the shipped
      10-epoch ones — is named on every setting.
    * Any other shared entry that differs anywhere is named where a setting departs from its
      usual value (the one strictly more settings have than any other; a tie: everywhere)
      and on every setting of a method whose settings differ in it: 20-epoch few-shot runs
      say ``epochs=20`` without making every 10-epoch group say ``epochs=10``.
    * A method's own entries (``method_config.*``, and the learning rate, since each method
      has its own default) are named when settings of that method differ in them.

    Empty when nothing differs. An entry a setting lacks (unset, e.g. a run on the whole
    training split has no ``shots``) is never named; "unset" counts as a value when finding
    the usual one.
    """
    settings = {k: json.loads(k) for k in dict.fromkeys(setting_keys)}
    by_method: dict[Any, list[str]] = {}
    for key, setting in settings.items():
        by_method.setdefault(setting.get("method"), []).append(key)

    def varying(keys: list[str], own: bool) -> list[str]:
        names = {n for key in keys for n in settings[key]
                 if n != "method" and _own_entry(n) == own}
        return sorted(n for n in names
                      if len({json.dumps(settings[key].get(n)) for key in keys}) > 1)

    def usual(n: str) -> str | None:
        counts = Counter(json.dumps(s.get(n, _UNSET)) for s in settings.values())
        (top, k), *rest = counts.most_common(2)
        return top if not rest or k > rest[0][1] else None

    def tells_stores_apart(n: str) -> bool:
        values: dict[str, set[str]] = {}
        for key, setting in settings.items():
            for store in (stores_of or {}).get(key, ()):
                values.setdefault(store, set()).add(json.dumps(setting.get(n, _UNSET)))
        return len(values) > 1 and any(
            vals - set().union(*(v for s, v in values.items() if s != store)) - {usual_value[n]}
            for store, vals in values.items())

    shared = varying(list(settings), own=False)
    usual_value = {n: usual(n) for n in shared}
    everywhere = {n for n in shared if tells_stores_apart(n)}
    labels = {}
    for keys in by_method.values():
        own = varying(keys, own=True)
        within = set(varying(keys, own=False))  # shared entries this method's settings vary in
        entries = [*shared, *own]
        for key in keys:  # an entry a setting lacks is unset (its default): not named
            named = {n for n in own if n in settings[key]} | {
                n for n in shared if n in settings[key]
                and (n in within or n in everywhere
                     or json.dumps(settings[key][n]) != usual_value[n])}
            labels[key] = ", ".join(f"{_short(n, entries)}={settings[key][n]}"
                                    for n in entries if n in named)
    return labels


def label_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with its ``setting`` column relabelled over all its rows (see
    :func:`setting_labels`): call it on tables of several stores after joining them."""
    if len(runs):
        runs = runs.copy()
        stores_of = runs.groupby("setting_key")["source"].agg(set).to_dict()
        runs["setting"] = runs["setting_key"].map(setting_labels(runs["setting_key"], stores_of))
    return runs


def load_runs(stores: Mapping[str, RunStore],
              embedded_groups: Mapping[str, str] | None = None) -> RunTable:
    """Every finished (``done``) run of ``stores`` (source label → store), one row per run.

    Runs with a corrupt file are listed in ``skipped`` instead of breaking the table; queued,
    running, failed and cancelled runs are left out (they have no test accuracy).
    """
    groups = known_task_groups() if embedded_groups is None else embedded_groups
    rows, skipped = [], []
    for source, store in stores.items():
        for run in store.list():
            try:
                if run.status().get("status") != "done":
                    continue
                cfg, summary = run.config, run.summary()
            except RunStoreError as e:
                skipped.append(f"{run.id}: {e}")
                continue
            if not summary or summary.get("test_acc") is None:
                skipped.append(f"{run.id}: done but no test accuracy in summary.json")
                continue
            data = cfg.get("data", {})
            backbone = cfg.get("backbone", {}).get("name", summary.get("backbone", "?"))
            setting = _setting(cfg, str(summary.get("device", "cpu")))
            key = json.dumps(setting, sort_keys=True, default=str)
            task = data.get("name", summary.get("task", "?"))
            row = {"source": source, "run_id": run.id, "path": str(run.path),
                   "task": task, "task_group": task_group(data.get("spec", ""), task, groups),
                   "backbone": backbone, "method": cfg.get("method", summary.get("method")),
                   "pretrained": cfg.get("backbone", {}).get("pretrained"),
                   "normalization": data.get("normalization"),
                   "seed": cfg.get("train", {}).get("seed", summary.get("seed")),
                   # few-shot training images per class; None: the whole training split
                   "shots": cfg.get("train", {}).get("shots"),
                   "setting_key": key}
            row.update({f: summary.get(f) for f in SUMMARY_FIELDS})
            rows.append(row)
    df = pd.DataFrame(rows, columns=_RUN_COLUMNS)
    if len(df):
        df = _with_costs(label_settings(df))
        df = df.sort_values(["task", "backbone", "method", "setting", "seed"], kind="stable")
    return RunTable(df.reset_index(drop=True), skipped)


_RUN_COLUMNS = ["source", "run_id", "path", "task", "task_group", "backbone", "method",
                "setting", "pretrained", "normalization", "seed", "shots", "setting_key",
                *SUMMARY_FIELDS, "pct_backbone", "ppt"]


def _with_costs(df: pd.DataFrame) -> pd.DataFrame:
    num = list(set(SUMMARY_FIELDS) - {"device"})
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    df["pct_backbone"] = [percent_of_backbone(t, b) for t, b in
                          zip(df["trainable_params_excl_head"], df["backbone_params"])]
    df["ppt"] = ppt_score(df["test_acc"].to_numpy(float), df["trainable_params"].to_numpy(float))
    return df


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of the given runs (rows of a run table), one row per (run, epoch)."""
    ident = ("run_id", *GROUP_KEYS, "setting", "seed")
    rows = []
    for r in runs.to_dict("records"):
        try:
            text = (Path(r["path"]) / "metrics.jsonl").read_text()
            epochs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            continue
        for e in epochs:
            rows.append({"epoch": e.get("epoch"), **{m: e.get(m, math.nan) for m in CURVE_METRICS},
                         **{k: r[k] for k in ident}})
    return pd.DataFrame(rows, columns=["epoch", *CURVE_METRICS, *ident])


def load_eval(path: str | Path) -> dict[str, Any] | None:
    """A run's ``artifacts/eval.json`` (class names, test confusion, per-class accuracy)."""
    try:
        return read_json(Path(path) / "artifacts" / "eval.json")
    except RunStoreError:
        return None


@dataclass
class SeedEval:
    """Test evaluation of a group of seeds: per-class accuracy mean/std, summed confusion."""

    class_names: list[str]
    per_class_acc: np.ndarray  # mean over seeds, one value per class
    per_class_std: np.ndarray  # sample std over seeds (NaN with one seed)
    confusion: np.ndarray  # counts summed over seeds (rows: true class)
    n_runs: int


def seed_eval(paths: Iterable[str | Path],
              class_names: Sequence[str] | None = None) -> SeedEval | None:
    """Combine the ``eval.json`` of runs that differ only by seed (None when none has one).

    Class names come from the runs; ``class_names`` (e.g. the embedded task's) stands in for
    runs recorded without them, when the class count matches; class ids are the last resort.
    """
    evals = [e for e in (load_eval(p) for p in paths) if e and e.get("test_confusion")]
    if not evals:
        return None
    n = len(evals[0]["test_confusion"])
    stored = evals[0].get("class_names")
    fallback = class_names if class_names is not None and len(class_names) == n else None
    names = [str(c) for c in (stored or fallback or range(n))]
    evals = [e for e in evals if len(e["test_confusion"]) == len(names)]
    per_class = np.array([e["test_per_class_acc"] for e in evals], dtype=float)
    with warnings.catch_warnings():  # a class absent from the test split is NaN in every run
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(per_class, axis=0)
        std = (np.nanstd(per_class, axis=0, ddof=1) if len(evals) > 1
               else np.full(len(names), np.nan))
    confusion = np.sum([np.asarray(e["test_confusion"], dtype=float) for e in evals], axis=0)
    return SeedEval(names, mean, std, confusion, len(evals))


# -- statistics over seeds ----------------------------------------------------------------
def _mean_std(values: Iterable[Any]) -> tuple[float, float]:
    v = np.array([math.nan if x is None else x for x in values], dtype=float)
    v = v[~np.isnan(v)]
    mean = float(v.mean()) if len(v) else math.nan
    return mean, float(v.std(ddof=1)) if len(v) > 1 else math.nan


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, backbone, method, setting): seed means, spreads and costs.

    ``<metric>`` is the mean over seeds, ``<metric>_std`` the sample standard deviation
    (NaN with one seed), ``n_seeds`` the count; PPT and the parameter share are computed on
    the means.
    """
    cols = ["task", "task_group", "backbone", "method", "setting", "setting_key", "n_seeds",
            "seeds", "sources", "run_ids",
            *[c for m in SEED_METRICS for c in (m, f"{m}_std")], *FIXED_METRICS,
            "pct_backbone", "ppt"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in runs.to_dict("records"):  # plain Python: a few dozen rows, pandas is slower
        groups.setdefault(tuple(rec[k] for k in GROUP_KEYS), []).append(rec)
    rows = []
    for keys, recs in groups.items():
        row: dict[str, Any] = dict(zip(GROUP_KEYS, keys))
        row.update(task_group=recs[0]["task_group"], setting=recs[0]["setting"],
                   n_seeds=len(recs), seeds=sorted(int(r["seed"]) for r in recs
                                                   if pd.notna(r["seed"])),
                   sources=sorted({r["source"] for r in recs}),
                   run_ids=[r["run_id"] for r in recs])
        for m in SEED_METRICS:
            row[m], row[f"{m}_std"] = _mean_std(r[m] for r in recs)
        for m in FIXED_METRICS:
            row[m] = _mean_std(r[m] for r in recs)[0]
        row["pct_backbone"] = percent_of_backbone(row["trainable_params_excl_head"],
                                                  row["backbone_params"])
        row["ppt"] = ppt_score(row["test_acc"], row["trainable_params"])
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# -- Pareto frontier ----------------------------------------------------------------------
def pareto_front(accuracy: Iterable[float], cost: Iterable[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (accuracy ≥ and cost ≤, one of
    them strictly). Points with a missing value are never on the frontier; exact duplicates
    of a frontier point are all kept."""
    acc = np.asarray(list(accuracy), dtype=float)
    c = np.asarray(list(cost), dtype=float)
    ok = ~(np.isnan(acc) | np.isnan(c))
    front = np.zeros(len(acc), dtype=bool)
    for i in np.flatnonzero(ok):
        better_or_equal = ok & (acc >= acc[i]) & (c <= c[i])
        strictly = (acc > acc[i]) | (c < c[i])
        front[i] = not np.any(better_or_equal & strictly)
    return front


# -- averages over tasks ------------------------------------------------------------------
def mean_label(kind: str, n_tasks: int, group_counts: Mapping[str, int] | None = None) -> str:
    """How a multi-task mean was formed, in words for a table header or caption."""
    if kind == "plain":
        return f"plain mean over {n_tasks} task{'s' if n_tasks != 1 else ''}"
    parts = ", ".join(f"{g} {n}" for g, n in (group_counts or {}).items())
    return f"group mean: mean of {len(group_counts or {})} group means ({parts} tasks)"


def multi_task_means(agg: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Average ``metric`` over the tasks each (backbone, method, setting) was run on.

    ``plain_mean`` is the plain mean of the per-task means; ``group_mean`` is the mean of the
    group means (natural / specialized / structured) and is NaN unless every task's group is
    known. ``plain_label`` / ``group_label`` say which is which; ``tasks`` lists the tasks,
    because two rows averaged over different task sets are not comparable.
    """
    cols = ["backbone", "method", "setting", "setting_key", "n_tasks", "tasks", "plain_mean",
            "plain_label", "group_mean", "group_label"]
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for rec in agg.to_dict("records"):
        if pd.notna(rec[metric]):
            settings.setdefault((rec["backbone"], rec["method"], rec["setting_key"]),
                                []).append(rec)
    rows = []
    for (backbone, method, key), recs in settings.items():
        n = len(recs)
        row = {"backbone": backbone, "method": method, "setting": recs[0]["setting"],
               "setting_key": key, "n_tasks": n,
               "tasks": ", ".join(sorted(r["task"] for r in recs)),
               "plain_mean": float(np.mean([r[metric] for r in recs])),
               "plain_label": mean_label("plain", n), "group_mean": math.nan,
               "group_label": ""}
        groups = [r["task_group"] for r in recs]
        if n > 1 and all(isinstance(g, str) for g in groups):
            by_group: dict[str, list[float]] = {}
            for g, r in sorted(zip(groups, recs), key=lambda gr: _group_rank(gr[0])):
                by_group.setdefault(g, []).append(r[metric])
            row["group_mean"] = float(np.mean([np.mean(v) for v in by_group.values()]))
            row["group_label"] = mean_label("group", n, {g: len(v) for g, v in by_group.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUPS.index(group) if group in GROUPS else len(GROUPS), group)


# -- export -------------------------------------------------------------------------------
EXPORT_COLUMNS = ("task", "task_group", "backbone", "method", "setting", "shots", "n_seeds",
                  "seeds",
                  "val_acc", "val_acc_std", "test_acc", "test_acc_std", "test_loss",
                  "test_loss_std", "trainable_params", "trainable_params_excl_head",
                  "backbone_params", "pct_backbone", "weight_bytes", "train_time_s",
                  "train_time_s_std", "images_per_s", "images_per_s_std", "peak_memory_bytes",
                  "peak_memory_bytes_std", "flops_per_image", "ppt", "run_ids")


def export_csv(agg: pd.DataFrame) -> str:
    """The per-task comparison as CSV (lists joined with ``;``)."""
    out = agg[list(EXPORT_COLUMNS)].copy()
    for col in ("seeds", "run_ids"):
        out[col] = out[col].map(lambda v: ";".join(str(x) for x in v))
    return out.to_csv(index=False)


def export_json(agg: pd.DataFrame, runs: pd.DataFrame, means: pd.DataFrame | None = None) -> str:
    """The whole comparison as one JSON document: protocol, per-task rows, runs, means."""
    doc = {
        "protocol": PROTOCOL_NOTE,
        "ppt": "PPT = acc × exp(−log10(P/1e7 + 1)), P = trainable parameters (V-PETL Bench)",
        "per_task": _records(agg[list(EXPORT_COLUMNS)]),
        "runs": _records(runs.drop(columns=["setting_key", "path"], errors="ignore")),
        "multi_task_means": _records(means.drop(columns=["setting_key"], errors="ignore"))
        if means is not None else [],
    }
    return json.dumps(doc, indent=1, allow_nan=False)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    # NaN is not JSON: it becomes null (pandas' own writer does the conversion).
    return json.loads(df.to_json(orient="records"))


def read_export_json(text: str) -> dict[str, Any]:
    """Read :func:`export_json` output back: tables as DataFrames, notes as strings."""
    doc = json.loads(text)
    out: dict[str, Any] = dict(doc)
    for key in ("per_task", "runs", "multi_task_means"):
        out[key] = pd.read_json(io.StringIO(json.dumps(doc[key])), orient="records",
                                dtype=False)
    return out
