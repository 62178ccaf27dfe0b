"""Per-test-image predictions of finished runs, and the filters of the drill-down.

Where a run's predictions come from, in order:

1. ``artifacts/predictions.npz``, written by the run's own test phase (runs made since it
   exists): exactly the predictions behind its ``eval.json``;
2. a record computed earlier from the stored weights (see :mod:`.records`);
3. the stored weights now: the rebuilt model on the whole test split, in split order,
   batched, then kept as 2. A run with neither 1. nor weights raises
   :class:`~.models.WeightsNotStored`.

:func:`agreement` compares recomputed predictions with the run's ``eval.json`` confusion
matrix, so a view says when they differ (another device or precision can flip a near tie).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import records
from .models import batches, class_names, load_view_model, split_dataset

STORED = "predictions.npz"  # written by the run's test phase (runs/execute.py)
RECORD = "predictions.npz"  # recomputed from the weights, in the record folder
Progress = Callable[[str, int, int], None]  # (stage, done, total)

FILTERS = {  # key (what the URL holds) → what it shows
    "all": "every test image",
    "A-not-B": "misclassified by A, not by B",
    "all-wrong": "wrong for every chosen run",
    "class": "one true class",
    "cell": "a confusion cell: true → predicted",
}
ANY_RUN = "any"  # the confusion-cell filter on any of the chosen runs


@dataclass
class Predictions:
    """One run's prediction for every test image, in split order."""

    labels: np.ndarray  # (n,) true class
    predictions: np.ndarray  # (n,) predicted class
    confidence: np.ndarray  # (n,) softmax probability of the prediction
    class_names: list[str]
    source: str  # "test phase" or "recomputed from the weights"

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    def confusion(self) -> np.ndarray:
        n = len(self.class_names)
        out = np.zeros((n, n), dtype=np.int64)
        np.add.at(out, (self.labels, self.predictions), 1)
        return out


def _from_arrays(arrays: Mapping[str, np.ndarray], names: list[str], source: str,
                 ) -> Predictions:
    missing = [k for k in ("labels", "predictions", "confidence") if k not in arrays]
    if missing:
        raise KeyError(f"predictions record lacks {', '.join(missing)}")
    labels = np.asarray(arrays["labels"], dtype=np.int64)
    preds = np.asarray(arrays["predictions"], dtype=np.int64)
    conf = np.asarray(arrays["confidence"], dtype=np.float32)
    if not (labels.shape == preds.shape == conf.shape) or labels.ndim != 1:
        raise ValueError("predictions record: labels, predictions and confidence differ in "
                         "shape")
    if len(labels) and max(labels.max(), preds.max()) >= len(names):
        raise ValueError(f"predictions record names a class beyond the {len(names)} known")
    return Predictions(labels, preds, conf, list(names), source)


def stored_class_names(run_path: str | Path) -> list[str] | None:
    """Class names from the run's ``eval.json`` (None when it has none)."""
    from ..compare import load_eval

    ev = load_eval(run_path) or {}
    names = ev.get("class_names")
    return [str(c) for c in names] if names else None


def cached_predictions(run_path: str | Path, *, writable: bool) -> Predictions | None:
    """What is already known without a forward pass (1. or 2. of the module docstring)."""
    run_path = Path(run_path)
    stored = run_path / "artifacts" / STORED
    if stored.is_file():
        try:
            with np.load(stored, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            names = stored_class_names(run_path) or [
                str(i) for i in range(int(max(arrays["labels"].max(),
                                              arrays["predictions"].max())) + 1)]
            return _from_arrays(arrays, names, "test phase")
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recompute from the weights instead
    rec = records.load_npz(records.run_dir(run_path, writable=writable) / RECORD,
                           fingerprint=records.run_fingerprint(run_path), settings={})
    if rec is None:
        return None
    arrays, meta = rec
    try:
        return _from_arrays(arrays, meta["class_names"], "recomputed from the weights")
    except (KeyError, ValueError):
        return None


def run_predictions(run_path: str | Path, *, writable: bool, progress: Progress | None = None,
                    batch_size: int = 256, save: bool = True) -> Predictions:
    """The run's predictions (see the module docstring), computed when not known yet."""
    import torch

    known = cached_predictions(run_path, writable=writable)
    if known is not None:
        return known
    step = progress or (lambda stage, done, total: None)
    step("loading the model", 0, 1)
    trained = load_view_model(run_path)
    data = split_dataset(trained.task, trained.model, trained.config["data"]
                         .get("normalization", "backbone"), "test")
    labels, preds, conf = [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in batches(data, batch_size):
            logits = trained.model(x)
            top = logits.argmax(1)
            labels.append(y.numpy())
            preds.append(top.numpy())
            conf.append(logits.softmax(1).gather(1, top[:, None])[:, 0].numpy())
            step("predicting the test images", sum(len(a) for a in labels), len(data))
    arrays = {"labels": np.concatenate(labels), "predictions": np.concatenate(preds),
              "confidence": np.concatenate(conf).astype(np.float32)}
    names = class_names(trained.task)
    if save:
        records.save_npz(records.run_dir(run_path, writable=writable) / RECORD, arrays, {
            "fingerprint": records.run_fingerprint(run_path), "settings": {},
            "class_names": names, "run_id": Path(run_path).name,
            "seconds": round(time.perf_counter() - t0, 3)})
    return _from_arrays(arrays, names, "recomputed from the weights")


def agreement(preds: Predictions, run_path: str | Path) -> str | None:
    """None when ``preds`` give the run's stored test confusion matrix; else a sentence."""
    from ..compare import load_eval

    ev = load_eval(run_path) or {}
    stored = ev.get("test_confusion")
    if not stored:
        return None
    stored = np.asarray(stored, dtype=np.int64)
    mine = preds.confusion()
    if stored.shape != mine.shape:
        return (f"the stored evaluation has {len(stored)} classes, the predictions "
                f"{len(mine)}")
    if np.array_equal(stored, mine):
        return None
    moved = int(np.abs(stored - mine).sum() // 2)
    return (f"{moved} of {int(stored.sum())} test predictions differ from the run's stored "
            "evaluation (rebuilt on another device or precision: near ties can flip)")


# -- the drill-down's filters ------------------------------------------------------------
def select(preds: Mapping[str, Predictions], kind: str, *, a: str | None = None,
           b: str | None = None, true: int | None = None, predicted: int | None = None,
           by: str = ANY_RUN) -> np.ndarray:
    """Indices of the test images a filter keeps (see :data:`FILTERS`), in split order.

    ``a``/``b`` are run keys of ``preds`` ("misclassified by A but not by B"); ``true`` the
    class of "one true class" and, with ``predicted``, of a confusion cell, whose images are
    those the run ``by`` (or any chosen run) predicted that way.
    """
    if not preds:
        return np.zeros(0, dtype=np.int64)
    first = next(iter(preds.values()))
    n = len(first.labels)
    for key, p in preds.items():
        if len(p.labels) != n or not np.array_equal(p.labels, first.labels):
            raise ValueError(f"run {key} was tested on other images; compare runs of one "
                             "test split")
    labels = first.labels
    if kind == "all":
        keep = np.ones(n, dtype=bool)
    elif kind == "A-not-B":
        if a not in preds or b not in preds:
            raise ValueError("pick two of the chosen runs as A and B")
        keep = ~preds[a].correct & preds[b].correct
    elif kind == "all-wrong":
        keep = np.logical_and.reduce([~p.correct for p in preds.values()])
    elif kind == "class":
        keep = labels == _class(true, first)
    elif kind == "cell":
        t, q = _class(true, first), _class(predicted, first)
        runs = list(preds.values()) if by == ANY_RUN else [preds[by]]
        keep = (labels == t) & np.logical_or.reduce([p.predictions == q for p in runs])
    else:
        raise ValueError(f"unknown filter {kind!r}; known: {', '.join(FILTERS)}")
    return np.flatnonzero(keep)


def _class(index: int | None, p: Predictions) -> int:
    if index is None or not 0 <= int(index) < len(p.class_names):
        raise ValueError(f"pick a class (0 to {len(p.class_names) - 1})")
    return int(index)


def cell_pairs(preds: Mapping[str, Predictions], true: int, predicted: int,
               by: str = ANY_RUN) -> int:
    """(image, run) pairs in a confusion cell: what Compare's cell counts when ``preds`` are
    the runs of its group (seeds summed)."""
    runs = list(preds.values()) if by == ANY_RUN else [preds[by]]
    return int(sum(((p.labels == true) & (p.predictions == predicted)).sum() for p in runs))


def caption(preds: Mapping[str, Predictions], labels: Mapping[str, str], i: int) -> str:
    """``#12 · true 3`` then one ``✓ lora: 3 (91%)`` line per run."""
    first = next(iter(preds.values()))
    lines = [f"#{i} · true {first.class_names[first.labels[i]]}"]
    for key, p in preds.items():
        mark = "✓" if p.correct[i] else "✗"
        lines.append(f"{mark} {labels.get(key, key)}: {p.class_names[p.predictions[i]]} "
                     f"({100 * float(p.confidence[i]):.0f}%)")
    return "\n".join(lines)


def accuracy_table(preds: Mapping[str, Predictions], labels: Mapping[str, str],
                   shown: np.ndarray) -> list[dict[str, Any]]:
    """Per run: accuracy on the whole test split and on the images a filter keeps."""
    rows = []
    for key, p in preds.items():
        rows.append({"run": labels.get(key, key), "predictions": p.source,
                     "test accuracy": float(p.correct.mean()) if len(p.correct) else np.nan,
                     "on these images": float(p.correct[shown].mean()) if len(shown)
                     else np.nan,
                     "mean confidence here": float(p.confidence[shown].mean()) if len(shown)
                     else np.nan})
    return rows


def cell_query(points: Sequence[Mapping[str, Any]], class_names: Sequence[str], *, task: str,
               run_ids: Sequence[str]) -> dict[str, Any] | None:
    """The Inside page's query parameters for a clicked cell of Compare's confusion matrix
    (the first selected point: its ``customdata`` is ``[true, predicted, count]``)."""
    for point in points:
        data = point.get("customdata")
        if data is None or len(data) < 2:
            continue
        t, q = int(data[0]), int(data[1])
        if not (0 <= t < len(class_names) and 0 <= q < len(class_names)):
            continue
        return {"task": task, "runs": list(run_ids), "tab": "Examples", "filter": "cell",
                "true": str(class_names[t]), "pred": str(class_names[q]), "by": ANY_RUN}
    return None
