"""Run files on disk: atomic writes, strict JSON, and one validating reader per file kind.

Every file of a run directory (docs/run-store.md) is written through
:func:`atomic_write_bytes` and read back through :func:`read_json` / :func:`read_metrics`
with the checks in :data:`RUN_FILE_CHECKS`, so a truncated, hand-edited or wrongly typed
file is reported as unreadable (with the reason) instead of crashing a reader.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


class RunStoreError(RuntimeError):
    """A run or store is missing, unreadable or read-only."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any, indent: int | None = 1) -> bytes:
    """Strict JSON (NaN and infinities become ``null``), numpy values and paths converted."""
    text = json.dumps(finite_json(obj), indent=indent, default=_jsonable, allow_nan=False)
    return (text + "\n").encode()


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- validation of what is read ------------------------------------------------------------
class _Bad(ValueError):
    """A field of a run file has the wrong type (message: which field, what it holds)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(d: dict, key: str, *, integer: bool = False, where: str = "") -> None:
    v = d.get(key)
    if v is None:
        return
    ok = isinstance(v, int) and not isinstance(v, bool) if integer else _is_number(v)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise _Bad(f"{where}{key} must be {kind} or null, got {v!r:.60}")


def _string(d: dict, key: str, *, required: bool = False, where: str = "") -> None:
    v = d.get(key)
    if v is None and not required:
        return
    if not isinstance(v, str):
        raise _Bad(f"{where}{key} must be a string, got {v!r:.60}")


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string_list(d: dict, key: str) -> None:
    v = d.get(key)
    if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise _Bad(f"{key} must be a list of strings, got {v!r:.60}")


_STATUS_TIMES = ("created", "started", "finished", "updated")
_PROGRESS_NUMBERS = ("step", "steps", "epochs", "loss", "elapsed_s", "eta_s", "prepare_done",
                     "prepare_total")
_SUMMARY_NUMBERS = ("num_classes", "seed", "epochs", "epochs_done", "best_epoch", "val_acc",
                    "trainable_params", "trainable_params_excl_head", "total_params",
                    "backbone_params", "train_time_s", "images_per_s", "test_acc", "test_loss",
                    "weight_bytes", "peak_memory_bytes", "flops_per_image")
_METRIC_NUMBERS = ("step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time_s")


def check_status(value: Any) -> dict:
    d = _object(value, "status.json")
    status = d.get("status", "queued")
    if status not in STATUSES:
        raise _Bad(f"status must be one of {', '.join(STATUSES)}, got {status!r:.60}")
    for key in _STATUS_TIMES:
        _number(d, key)
    for key in ("pid", "worker_pid", "pid_start"):
        _number(d, key, integer=True)
    for key in ("error", "host", "slot"):
        _string(d, key)
    _string_list(d, "warnings")
    progress = _object(d.get("progress", {}), "status.json progress")
    for key in _PROGRESS_NUMBERS:
        _number(progress, key, where="progress.")
    _string(progress, "phase", where="progress.")
    return d


def check_config(value: Any) -> dict:
    d = _object(value, "config.json")
    _string(d, "method")
    for key in ("method_config", "train", "backbone", "data"):
        _object(d.get(key, {}), f"config.json {key}")
    _string(d.get("backbone", {}), "name", where="backbone.")
    for key in ("spec", "name"):
        _string(d.get("data", {}), key, where="data.")
    _string_list(d.get("data", {}), "warnings")
    return d


def check_summary(value: Any) -> dict:
    d = _object(value, "summary.json")
    for key in _SUMMARY_NUMBERS:
        _number(d, key)
    for key in ("run_id", "method", "backbone", "task", "device", "error"):
        _string(d, key)
    _string_list(d, "warnings")
    return d


def check_metrics_row(value: Any) -> dict:
    d = _object(value, "a metrics line")
    _number(d, "epoch", integer=True)
    for key in _METRIC_NUMBERS:
        _number(d, key)
    return d


def check_eval(value: Any) -> dict:
    d = _object(value, "eval.json")
    names = d.get("class_names")
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(n, str | int) for n in names)):
        raise _Bad(f"class_names must be a list of names or null, got {names!r:.60}")
    confusion = d.get("test_confusion")
    if confusion is not None:
        if not (isinstance(confusion, list) and all(
                isinstance(row, list) and len(row) == len(confusion)
                and all(_is_number(c) for c in row) for row in confusion)):
            raise _Bad("test_confusion must be a square list of lists of counts or null")
    acc = d.get("test_per_class_acc")
    if acc is not None and not (isinstance(acc, list)
                                and all(a is None or _is_number(a) for a in acc)):
        raise _Bad(f"test_per_class_acc must be a list of numbers or null, got {acc!r:.60}")
    return d


def check_claim(value: Any) -> dict:
    d = _object(value, "claim")
    _string(d, "owner")
    _string(d, "host")
    _number(d, "pid", integer=True)
    _number(d, "pid_start", integer=True)
    _number(d, "time")
    return d


def _check_object(value: Any) -> dict:
    return _object(value, "the file")


# Run file name → its check; read_json applies it to any file of that name it reads.
RUN_FILE_CHECKS = {"status.json": check_status, "config.json": check_config,
                   "summary.json": check_summary, "eval.json": check_eval,
                   "method_state.json": _check_object, "claim": check_claim}


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file, checked when it is a run file (:data:`RUN_FILE_CHECKS`); ``default`` when
    absent. Anything unreadable or wrongly shaped raises :class:`RunStoreError` naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RunStoreError(f"corrupt file {path}: {e}") from e
    except OSError as e:
        raise RunStoreError(f"cannot read {path}: {e.strerror or e}") from e
    check = RUN_FILE_CHECKS.get(path.name)
    if check is not None:
        try:
            check(value)
        except _Bad as e:
            raise RunStoreError(f"corrupt file {path}: {e}") from None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty when absent), each checked; RunStoreError names
    the file and line of the first bad one."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:
        raise RunStoreError(f"corrupt file {path}: {e}") from e
    except OSError as e:
        raise RunStoreError(f"cannot read {path}: {e.strerror or e}") from e
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(check_metrics_row(json.loads(line)))
        except (json.JSONDecodeError, RecursionError, _Bad) as e:
            raise RunStoreError(f"corrupt file {path}, line {no}: {e}") from None
    return rows
