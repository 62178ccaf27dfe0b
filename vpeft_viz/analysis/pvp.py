"""PVP's two questions, answered from finished runs: do pre-trained prompts help when there
are few training images, and how far do the prompts move from where they started?

* :func:`shot_curves`: test (and validation) accuracy of PVP runs against the number of
  training images per class (``train.shots``; docs/cli.md), for pre-trained and for
  random-initialised prompts (``pvp.init``), mean ± sample standard deviation over seeds,
  each seed on its own few-shot split; runs on the whole training split give the reference.
* :func:`paired_gain`: pre-trained minus random, seed by seed (same seed, same split), per k;
  :func:`vpt_deep_reference`: VPT-deep on the whole training split, the random-init
  reference when no ``init=random`` PVP run was trained on it.
* :class:`PromptRecord`, :func:`layer_similarity`: what one run stored
  (:class:`vpeft_viz.methods.pvp.PVP`): initial and tuned prompts per layer, the cosine
  similarity of each tuned prompt with its initial value, the relative change per layer.

Everything here reads the run table (:func:`vpeft_viz.analysis.compare.load_runs`) and the
runs' ``method.npz``; no model is loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

METHOD = "pvp"
INITS = ("pretrained", "random")
# Setting entries that are the view's axes, not part of what makes two curves different.
_AXES = ("method_config.init", "train.shots", "train.epochs")
_LAYER_KEY = re.compile(r"(prompts|initial)/(\d+)")
CURVE_COLUMNS = ["variant", "init", "shots", "epochs", "n_seeds", "seeds", "test_acc",
                 "test_acc_std", "val_acc", "val_acc_std", "train_size", "run_ids"]


def _setting(key: str) -> dict:
    try:
        return json.loads(key)
    except (TypeError, ValueError):
        return {}


def variant_of(setting_key: str) -> str:
    """What a PVP run's curve is, apart from the view's axes (init, shots, epochs): a JSON
    key of the remaining settings (prompt count, source, backbone, recipe...)."""
    s = _setting(setting_key)
    return json.dumps({k: v for k, v in s.items() if k not in _AXES}, sort_keys=True)


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def shot_curves(runs: pd.DataFrame, *, task: str, backbone: str) -> pd.DataFrame:
    """PVP runs of one task and backbone, one row per (variant, init, shots, epochs) with
    seed means and spreads. ``shots`` is NaN for runs on the whole training split.

    ``runs``: the run table (one row per finished run, with ``setting_key``); ``train_size``
    is the mean number of training images (summary field; NaN for runs recorded without it).
    """
    if runs.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    mine = runs[(runs["method"] == METHOD) & (runs["task"] == task)
                & (runs["backbone"] == backbone)]
    groups: dict[tuple, list[dict]] = {}
    for rec in mine.to_dict("records"):
        s = _setting(rec["setting_key"])
        shots = s.get("train.shots")
        key = (variant_of(rec["setting_key"]), s.get("method_config.init", "pretrained"),
               math.nan if shots is None else float(shots), s.get("train.epochs"))
        groups.setdefault(key, []).append(rec)
    rows = []
    for (variant, init, shots, epochs), recs in groups.items():
        test = np.array([r["test_acc"] for r in recs], dtype=float)
        val = np.array([r["val_acc"] for r in recs], dtype=float)
        size = np.array([r.get("train_size", math.nan) for r in recs], dtype=float)
        rows.append({"variant": variant, "init": init, "shots": shots, "epochs": epochs,
                     "n_seeds": len(recs), "seeds": sorted(int(r["seed"]) for r in recs),
                     "test_acc": float(test.mean()), "test_acc_std": _std(test),
                     "val_acc": float(val.mean()), "val_acc_std": _std(val),
                     "train_size": float(np.nanmean(size)) if np.isfinite(size).any()
                     else math.nan,
                     "run_ids": [r["run_id"] for r in recs]})
    out = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    return out.sort_values(["variant", "init", "shots"], na_position="last",
                           kind="stable").reset_index(drop=True)


def vpt_deep_reference(runs: pd.DataFrame, *, task: str, backbone: str,
                       variant: str | None = None) -> pd.DataFrame:
    """VPT-deep runs of the task on the whole training split with the prompt count of the
    PVP ``variant`` (default 10): PVP's modules with VPT's random initialisation (what
    ``init=random`` trains), one row per epoch count with the seed mean and spread."""
    num_tokens = _setting(variant or "{}").get("method_config.num_tokens", 10)
    cols = ["epochs", "n_seeds", "test_acc", "test_acc_std", "val_acc", "val_acc_std"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    mine = runs[(runs["method"] == "vpt-deep") & (runs["task"] == task)
                & (runs["backbone"] == backbone)]
    groups: dict[int, list[dict]] = {}
    for rec in mine.to_dict("records"):
        s = _setting(rec["setting_key"])
        if s.get("train.shots") is None and s.get("method_config.num_tokens") == num_tokens:
            groups.setdefault(s.get("train.epochs"), []).append(rec)
    rows = []
    for epochs, recs in sorted(groups.items()):
        test = np.array([r["test_acc"] for r in recs], dtype=float)
        val = np.array([r["val_acc"] for r in recs], dtype=float)
        rows.append({"epochs": epochs, "n_seeds": len(recs), "test_acc": float(test.mean()),
                     "test_acc_std": _std(test), "val_acc": float(val.mean()),
                     "val_acc_std": _std(val)})
    return pd.DataFrame(rows, columns=cols)


def paired_gain(runs: pd.DataFrame, *, task: str, backbone: str,
                variant: str | None = None, epochs: int | None = None) -> pd.DataFrame:
    """Pre-trained minus random-initialised test accuracy per k (few-shot runs only), from
    the seeds both inits ran (same seed: same split): mean, sample std, and the seeds used.
    ``variant`` and ``epochs`` keep only the runs of those settings (both: all of them, and
    a k trained for several epoch counts then mixes them)."""
    cols = ["shots", "gain", "gain_std", "n_pairs", "seeds"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    mine = runs[(runs["method"] == METHOD) & (runs["task"] == task)
                & (runs["backbone"] == backbone)]
    acc: dict[tuple, dict[str, float]] = {}
    for rec in mine.to_dict("records"):
        s = _setting(rec["setting_key"])
        if s.get("train.shots") is None:
            continue
        if variant is not None and variant_of(rec["setting_key"]) != variant:
            continue
        if epochs is not None and s.get("train.epochs") != epochs:
            continue
        key = (int(s["train.shots"]), s.get("train.epochs"), int(rec["seed"]))
        acc.setdefault(key, {})[s.get("method_config.init", "pretrained")] = rec["test_acc"]
    by_shots: dict[int, list[tuple[int, float]]] = {}
    for (shots, _epochs, seed), pair in acc.items():
        if all(i in pair for i in INITS):
            by_shots.setdefault(shots, []).append((seed, pair["pretrained"] - pair["random"]))
    rows = []
    for shots in sorted(by_shots):
        seeds, diffs = zip(*sorted(by_shots[shots]))
        d = np.array(diffs, dtype=float)
        rows.append({"shots": shots, "gain": float(d.mean()), "gain_std": _std(d),
                     "n_pairs": len(d), "seeds": list(seeds)})
    return pd.DataFrame(rows, columns=cols)


def gain_overview(runs: pd.DataFrame, tasks: Iterable[str], *, backbone: str,
                  variant: str | None = None, epochs: int | None = None) -> pd.DataFrame:
    """Tasks × k table of :func:`paired_gain` means (points of accuracy, ×100)."""
    table = {}
    for task in tasks:
        g = paired_gain(runs, task=task, backbone=backbone, variant=variant, epochs=epochs)
        if len(g):
            table[task] = {int(k): 100 * v for k, v in zip(g["shots"], g["gain"])}
    return pd.DataFrame(table).T.sort_index(axis=1) if table else pd.DataFrame()


@dataclass
class PromptRecord:
    """One PVP run's prompts: L layers of p prompts, D wide."""

    initial: np.ndarray  # (L, p, D) what training started from
    tuned: np.ndarray  # (L, p, D) what it ended with (the selected epoch)
    cosine: np.ndarray  # (L, p) cosine of each tuned prompt with its initial value
    change: np.ndarray  # (L,) ‖tuned − initial‖ / ‖initial‖ per layer
    from_source: bool  # whether the initial prompts came from a source run

    @classmethod
    def from_artifacts(cls, arrays: Mapping[str, np.ndarray]) -> PromptRecord:
        layers: dict[str, dict[int, np.ndarray]] = {"prompts": {}, "initial": {}}
        for k, v in arrays.items():
            if m := _LAYER_KEY.fullmatch(k):
                layers[m.group(1)][int(m.group(2))] = np.asarray(v, dtype=float)
        missing = [k for k in ("cosine", "change", "from_source") if k not in arrays]
        if not layers["initial"] or missing:
            raise KeyError("not a PVP prompt record (missing "
                           f"{', '.join(missing or ['initial/<layer>'])})")
        if sorted(layers["initial"]) != sorted(layers["prompts"]):
            raise ValueError(f"initial prompts in layers {sorted(layers['initial'])}, tuned "
                             f"ones in {sorted(layers['prompts'])}")
        order = sorted(layers["initial"])
        initial = np.stack([layers["initial"][i] for i in order])
        tuned = np.stack([layers["prompts"][i] for i in order])
        cosine = np.asarray(arrays["cosine"], dtype=float)
        if initial.shape != tuned.shape or cosine.shape != initial.shape[:2]:
            raise ValueError(f"inconsistent PVP record: initial {initial.shape}, tuned "
                             f"{tuned.shape}, cosine {cosine.shape}")
        return cls(initial, tuned, cosine, np.asarray(arrays["change"], dtype=float),
                   bool(np.asarray(arrays["from_source"])))

    @property
    def depth(self) -> int:
        return int(self.initial.shape[0])


def layer_similarity(rec: PromptRecord) -> pd.DataFrame:
    """Per layer: mean, min and max over its prompts of the cosine between tuned and
    initial prompt, and the relative change of the layer's prompts."""
    return pd.DataFrame({"layer": np.arange(rec.depth), "cosine": rec.cosine.mean(1),
                         "cosine_min": rec.cosine.min(1), "cosine_max": rec.cosine.max(1),
                         "change": rec.change})


def similarity_by_shots(records: Iterable[tuple[str, float, PromptRecord]]) -> pd.DataFrame:
    """Mean cosine (tuned vs initial) per layer, averaged over the runs of each (init, k):
    ``records`` holds (init, shots or NaN, record) for runs of one task and variant."""
    rows = []
    for init, shots, rec in records:
        for layer, cos in enumerate(rec.cosine.mean(1)):
            rows.append({"init": init, "shots": shots, "layer": layer, "cosine": float(cos)})
    df = pd.DataFrame(rows, columns=["init", "shots", "layer", "cosine"])
    if df.empty:
        return df.assign(runs=pd.Series(dtype=int))
    return (df.groupby(["init", "shots", "layer"], dropna=False)
            .agg(cosine=("cosine", "mean"), runs=("cosine", "size")).reset_index())


def run_facts(config: Mapping) -> dict:
    """What tells PVP runs apart in a picker: init, shots (None: whole split), seed, epochs."""
    train = config.get("train", {})
    return {"init": config.get("method_config", {}).get("init", "pretrained"),
            "shots": train.get("shots"), "seed": train.get("seed", 0),
            "epochs": train.get("epochs")}


def run_label(config: Mapping, run_id: str) -> str:
    """'pretrained · 4-shot · seed 1 · 30 epochs (run id)'."""
    f = run_facts(config)
    shots = f"{f['shots']}-shot" if f["shots"] else "whole training split"
    return f"{f['init']} · {shots} · seed {f['seed']} · {f['epochs']} epochs ({run_id})"
