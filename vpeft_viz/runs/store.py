"""Run store: one self-contained directory per run (format: docs/run-store.md).

::

    <store>/<run_id>/
        config.json          what was asked: method + config, backbone, data, training, versions
        status.json          queued | running | done | failed | cancelled, error text, progress
        metrics.jsonl        one JSON object per line, one line per epoch
        summary.json         final headline numbers (written once, at the end)
        weights.safetensors  trainable weights (and PEFT buffers) only
        method_state.json    what the method computed before training (selections), to rebuild it
        artifacts/           method analysis outputs: *.json and *.npz (never pickle);
                             eval.json: class names, test confusion, per-class accuracy
        error.txt            the traceback of a failed run (its status holds the message)
        cancel               present when a cancel was requested

Every file is written atomically (temp file in the same directory, then ``os.replace``), so a
crash never leaves a half-written file for the dashboard to trip on.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
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
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStoreError(f"corrupt file {path}: {e}") from e


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")[:40] or "x"


class Run:
    """A handle on one run directory; every read goes to disk (runs change while training)."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        self.id = self.path.name
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def _file(self, name: str) -> Path:
        return self.path / name

    def _writable(self) -> None:
        if self.read_only:
            raise RunStoreError(f"run {self.id} is in a read-only store")

    # -- reading ------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        cfg = read_json(self._file("config.json"))
        if cfg is None:
            raise RunStoreError(f"run {self.id} has no config.json")
        return cfg

    def status(self) -> dict[str, Any]:
        return read_json(self._file("status.json"), {"status": "queued"})

    def metrics(self) -> list[dict[str, Any]]:
        path = self._file("metrics.jsonl")
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as e:
            raise RunStoreError(f"corrupt file {path}: {e}") from e

    def summary(self) -> dict[str, Any] | None:
        return read_json(self._file("summary.json"))

    def method_state(self) -> dict[str, Any]:
        return read_json(self._file("method_state.json"), {})

    @property
    def weights_path(self) -> Path:
        return self._file("weights.safetensors")

    def cancel_requested(self) -> bool:
        return self._file("cancel").exists()

    def artifact_names(self) -> list[str]:
        d = self._file("artifacts")
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))

    def load_artifact(self, name: str) -> Any:
        """A JSON artifact as Python data, an ``.npz`` artifact as a dict of arrays."""
        path = self._file("artifacts") / name
        if not path.exists():
            raise RunStoreError(f"run {self.id} has no artifact {name!r}")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return read_json(path)

    # -- writing ------------------------------------------------------------------------
    def set_status(self, status: str, **fields: Any) -> None:
        self._writable()
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        current = self.status()
        current.update(fields, status=status, updated=time.time())
        atomic_write_json(self._file("status.json"), current)

    def update_progress(self, **progress: Any) -> None:
        self._writable()
        current = self.status()
        current["progress"] = {**current.get("progress", {}), **progress}
        current["updated"] = time.time()
        atomic_write_json(self._file("status.json"), current)

    def append_metrics(self, row: dict[str, Any]) -> None:
        # The file is rewritten whole and atomically: epochs are few, and a reader never sees
        # a half-written line.
        self._writable()
        rows = self.metrics() + [row]
        text = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
        atomic_write_bytes(self._file("metrics.jsonl"), text.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._writable()
        atomic_write_json(self._file("summary.json"), summary)

    def write_method_state(self, state: dict[str, Any]) -> None:
        self._writable()
        atomic_write_json(self._file("method_state.json"), state)

    def save_weights(self, tensors: dict[str, Any]) -> int:
        """Save tensors as safetensors atomically; returns the file size in bytes."""
        from safetensors.torch import save

        self._writable()
        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        atomic_write_bytes(self.weights_path, data)
        return self.weights_path.stat().st_size

    def load_weights(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        if not self.weights_path.exists():
            raise RunStoreError(f"run {self.id} has no saved weights")
        return load_file(str(self.weights_path))

    def save_artifact(self, name: str, value: Any) -> None:
        """``name.json`` for JSON-able values, ``name.npz`` for a dict of numpy arrays."""
        self._writable()
        d = self._file("artifacts")
        if name.endswith(".npz"):
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v) for k, v in value.items()})
            atomic_write_bytes(d / name, buf.getvalue())
        elif name.endswith(".json"):
            atomic_write_json(d / name, value)
        else:
            raise ValueError(f"artifact {name!r} must end in .json or .npz")

    def request_cancel(self) -> None:
        self._writable()
        atomic_write_bytes(self._file("cancel"), b"")


class RunStore:
    """A directory of runs. ``read_only`` stores (``cached_runs/``) refuse every write."""

    def __init__(self, root: str | Path, *, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r}, read_only={self.read_only})"

    def create(self, config: dict[str, Any], *, run_id: str | None = None) -> Run:
        if self.read_only:
            raise RunStoreError(f"store {self.root} is read-only")
        if run_id is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            task = str(config.get("data", {}).get("name", "data"))
            run_id = "-".join([stamp, _slug(config.get("method", "run")), _slug(task),
                               f"s{config.get('train', {}).get('seed', 0)}", uuid.uuid4().hex[:6]])
        path = self.root / run_id
        path.mkdir(parents=True, exist_ok=False)
        run = Run(path)
        atomic_write_json(path / "config.json", config)
        run.set_status("queued", created=time.time())
        return run

    def get(self, run_id: str) -> Run:
        path = self.root / run_id
        if not (path / "config.json").is_file():
            raise RunStoreError(f"no run {run_id!r} in {self.root}")
        return Run(path, read_only=self.read_only)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.list())

    def list(self) -> list[Run]:
        """Runs sorted oldest first; directories without a config are skipped."""
        if not self.root.is_dir():
            return []
        runs = [Run(p, read_only=self.read_only) for p in self.root.iterdir()
                if p.is_dir() and (p / "config.json").is_file()]
        return sorted(runs, key=lambda r: r.id)
