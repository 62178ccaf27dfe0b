"""The "pixels, no backbone" reference: logistic regression on raw standardised pixels.

A task a backbone cannot beat with this is not being helped by the backbone at all, so the
Compare page shows it next to the methods, with each task's chance level. The protocol is
the suite's own: fit on ``train`` (train800), choose the inverse regularisation ``C`` on
``val`` (val200) from a small grid, score ``test`` once with the chosen fit.

Chance level: the majority-class rate of the test split. On a balanced test split this is
``1 / num_classes``; on an unbalanced one it is the higher bar (always predicting the most
common class scores it), and ``chance_rule`` says which case applies.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..runs import PIXEL_REFERENCE_FILE

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strength; 3,072 inputs vs 800 images
MAX_ITER = 1000
PROTOCOL = ("StandardScaler (fit on train800) + LogisticRegression(C, lbfgs, "
            f"max_iter={MAX_ITER}) on the raw pixels; C chosen on val200 from {list(C_GRID)} "
            "(ties: smaller C); test scored once with the train800 fit")

Split = tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W, C), int labels (N,)


def chance_level(labels: np.ndarray, num_classes: int) -> tuple[float, str]:
    """The accuracy of always answering the test split's most common class, and why."""
    counts = np.bincount(labels, minlength=num_classes)
    rate = float(counts.max() / counts.sum())
    if counts.min() == counts.max():
        return rate, "1/num_classes (balanced test split)"
    return rate, "majority-class rate (unbalanced test split)"


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def pixel_baseline(train: Split, val: Split, test: Split, num_classes: int,
                   c_grid: Sequence[float] = C_GRID, max_iter: int = MAX_ITER) -> dict:
    """Fit on ``train`` for each ``C``, keep the best on ``val`` (ties: smaller ``C``), test once.

    Pixels are scaled by the train split's per-pixel mean and standard deviation. Returns
    ``val_acc``, ``test_acc``, ``C``, ``val_acc_by_C``, ``chance``, ``chance_rule``,
    ``converged`` (whether the chosen fit met its tolerance within ``max_iter``) and sizes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_pixels(train[0]))
    xtr, xva = scaler.transform(_pixels(train[0])), scaler.transform(_pixels(val[0]))
    best, best_acc, by_c = None, -1.0, {}
    for c in sorted(c_grid):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the record
            model = LogisticRegression(C=c, max_iter=max_iter).fit(xtr, train[1])
        by_c[c] = float(model.score(xva, val[1]))
        if by_c[c] > best_acc:
            best, best_acc = model, by_c[c]
    test_acc = float(best.score(scaler.transform(_pixels(test[0])), test[1]))
    chance, rule = chance_level(test[1], num_classes)
    return {"val_acc": best_acc, "test_acc": test_acc, "C": float(best.C),
            "val_acc_by_C": {f"{c:g}": a for c, a in by_c.items()},
            "chance": chance, "chance_rule": rule,
            "converged": bool(best.n_iter_.max() < max_iter),
            "n_train": len(train[1]), "n_val": len(val[1]), "n_test": len(test[1]),
            "n_inputs": int(xtr.shape[1]), "num_classes": num_classes}


def task_pixel_baseline(task: str, **kwargs) -> dict:
    """:func:`pixel_baseline` on an embedded task's train800 / val200 / test splits."""
    from ..data.embedded import get_task, load_arrays

    t0 = time.time()
    splits = [load_arrays(task, split) for split in ("train", "val", "test")]
    record = pixel_baseline(*splits, num_classes=get_task(task).num_classes, **kwargs)
    return {"task": task, **record, "seconds": round(time.time() - t0, 1)}


def suite_pixel_baseline(tasks: Iterable[str] | None = None, **kwargs) -> list[dict]:
    """One :func:`task_pixel_baseline` record per task (default: the default suite)."""
    from ..data.embedded import EMBEDDED_TASKS

    return [task_pixel_baseline(t, **kwargs) for t in (tasks or EMBEDDED_TASKS)]


REFERENCE_FILE = PIXEL_REFERENCE_FILE  # in a store's root: the shipped one is cached_runs/


def write_reference(path: Path, records: list[dict], *, protocol: str = "") -> Path:
    """Store ``records`` (one per task) as a store's pixel reference, atomically."""
    path = Path(path)
    payload = {"kind": "pixel_baseline", "version": 1, "protocol": protocol or PROTOCOL,
               "tasks": {r["task"]: r for r in records}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_reference(path: Path) -> dict[str, dict]:
    """Task → record from a reference file written by :func:`write_reference`; ``{}`` if the
    file is absent. A file that is not a pixel reference raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as a pixel reference ({e}); regenerate it "
                         "with `python -m vpeft_viz pixels`") from e
    tasks = payload.get("tasks") if isinstance(payload, dict) else None
    if payload.get("kind") != "pixel_baseline" or not isinstance(tasks, dict) or not all(
            isinstance(r, dict) and {"test_acc", "val_acc", "chance"} <= r.keys()
            for r in tasks.values()):
        raise ValueError(f"{path}: not a pixel reference (kind, tasks with test_acc, val_acc "
                         "and chance expected); regenerate it with `python -m vpeft_viz pixels`")
    return tasks


REFERENCE_METHOD = "pixels, no backbone"


def reference_rows(agg, records: dict[str, dict]):
    """Rows shaped like :func:`~vpeft_viz.analysis.compare.aggregate`'s, one per task of
    ``agg`` that has a pixel reference: method "pixels, no backbone", backbone "none (raw
    pixels)", its test and validation accuracy, and the logistic regression's weight count
    (pixels × classes + classes) as its trainable parameters; the other costs are missing."""
    import pandas as pd

    rows = []
    for task in dict.fromkeys(agg["task"]):
        r = records.get(task)
        if r is None:
            continue
        groups = agg.loc[agg["task"] == task, "task_group"]
        k = int(r.get("num_classes") or 0)
        pixels = int(r.get("n_inputs") or 32 * 32 * 3)
        rows.append({"task": task, "task_group": groups.iloc[0] if len(groups) else None,
                     "backbone": "none (raw pixels)", "method": REFERENCE_METHOD,
                     "setting": f"C={r['C']:g}" if "C" in r else "", "n_seeds": 1,
                     "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                     "trainable_params": pixels * k + k if k else None,
                     "num_classes": k or None})
    return pd.DataFrame(rows, columns=list(agg.columns)) if rows else agg.iloc[0:0]


def as_table(records: list[dict]):
    """The records as a DataFrame (task, test_acc, chance, val_acc, C, chance_rule) to show."""
    import pandas as pd

    cols = ["task", "test_acc", "chance", "val_acc", "C", "chance_rule"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in records], columns=cols)
