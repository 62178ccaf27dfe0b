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
crash never leaves a half-written file for the dashboard to trip on. Non-finite floats are
written as ``null``: every file is strict JSON.

Every run file is read through :func:`read_json` (``metrics.jsonl`` through
:meth:`Run.metrics`), which checks its shape against :data:`RUN_FILE_CHECKS` and raises
:class:`RunStoreError` naming the file and the bad field, so one corrupt run is reported as
unreadable and never crashes a page, the queue or the command line.

Every run records the process that owns it (``pid``, ``pid_start`` from ``/proc`` so a
reused pid is not mistaken for it, and ``host``): in ``status.json`` while running, in
``claim`` while a claimed run starts. :meth:`Run.status` reports a ``running`` (or claimed
``queued``) run whose owner is gone as ``failed`` and, in a writable store, records it.
``status.json`` is padded to whole blocks so that on a full disk the final status can still
be written in place (see :meth:`Run.set_status`).
"""

from __future__ import annotations

import errno
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .files import (  # noqa: F401  (re-exported: the store's public reading/writing API)
    FINISHED,
    RUN_FILE_CHECKS,
    STATUSES,
    RunStoreError,
    atomic_write_bytes,
    atomic_write_json,
    check_claim,
    check_config,
    check_eval,
    check_metrics_row,
    check_status,
    check_summary,
    finite_json,
    json_bytes,
    read_json,
    read_metrics,
)
from .owner import HOST, owner_fields, owner_gone, process_start_time  # noqa: F401

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
STATUS_BLOCK = 4096  # status.json is padded to whole blocks (see Run.set_status)


def check_run_id(run_id: str) -> str:
    """A run id is one plain directory name: no separators, no ``..``, no leading dot."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise RunStoreError(f"invalid run id {run_id!r}: letters, digits, '.', '_' and '-' "
                            "only, starting with a letter or digit, no '..'")
    return run_id


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
        """``status.json``, checked; a run whose owning process is gone reads as ``failed``
        (and is recorded so when the store is writable)."""
        for _ in range(3):
            current = read_json(self._file("status.json"), {"status": "queued"})
            why = self._owner_gone(current)
            if why is None:
                return current
            # The owner may have finished the run between the read and the check: re-read.
            again = read_json(self._file("status.json"), {"status": "queued"})
            if again != current:
                continue
            repaired = {**current, "status": "failed", "error": why, "finished": time.time(),
                        "updated": time.time(), "owner_gone": True}
            if not self.read_only:
                try:
                    self._write_status(repaired)
                except OSError:
                    pass  # a full or read-only disk: still report what happened
            return repaired
        return current

    def _owner_gone(self, status: dict[str, Any]) -> str | None:
        """Why a running (or claimed queued) run can never finish, or None."""
        state = status.get("status", "queued")
        if state == "running" and owner_gone(status):
            return (f"the process running it (pid {status['pid']}) ended without finishing "
                    "it (killed, out of memory, or the machine stopped)")
        if state == "queued":
            claim = self.claim()
            if claim and owner_gone(claim):
                return (f"the process that took it from the queue (pid {claim['pid']}, "
                        f"{claim.get('owner', '?')}) ended before it started")
        return None

    def claim(self) -> dict[str, Any] | None:
        """Who took this run (see ``queue.try_claim``); {} while being written or unreadable."""
        try:
            return read_json(self._file("claim"))
        except RunStoreError:
            return {}

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self._file("metrics.jsonl"))

    def summary(self) -> dict[str, Any] | None:
        return read_json(self._file("summary.json"))

    def method_state(self) -> dict[str, Any]:
        return read_json(self._file("method_state.json"), {})

    @property
    def weights_path(self) -> Path:
        return self._file("weights.safetensors")

    def problem(self) -> str | None:
        """Why this run cannot be read (the first corrupt file, named), or None when every
        run file reads and checks."""
        try:
            _ = self.config
            self.status()
            self.summary()
            self.metrics()
            self.method_state()
            read_json(self._file("artifacts") / "eval.json")
        except RunStoreError as e:
            return str(e)
        return None

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
        current = self._status_for_update()
        current.update(fields, status=status, updated=time.time())
        self._write_status(current)

    def update_progress(self, **progress: Any) -> None:
        self._writable()
        current = self._status_for_update()
        current["progress"] = {**current.get("progress", {}), **progress}
        current["updated"] = time.time()
        self._write_status(current)

    def _status_for_update(self) -> dict[str, Any]:
        """The status to update; a corrupt one is replaced (the writer knows the truth)."""
        try:
            return read_json(self._file("status.json"), {"status": "queued"})
        except RunStoreError:
            return {"status": "queued"}

    def _write_status(self, status: dict[str, Any]) -> None:
        """Write ``status.json`` padded to whole blocks; on a full disk, overwrite it in place.

        A full disk fails the atomic write (its temp file needs new space), but the blocks the
        padded file already holds can be rewritten: the final ``failed`` (or a trimmed status)
        still reaches the disk. Should even that not fit, the reader reports the run from
        what is there.
        """
        path = self._file("status.json")
        data = json_bytes(status)
        data = data[:-1] + b" " * (-len(data) % STATUS_BLOCK) + b"\n"
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._overwrite_status(status):
                raise

    def _overwrite_status(self, status: dict[str, Any]) -> bool:
        keep = ("status", "error", "created", "started", "finished", "updated", "pid",
                "pid_start", "host")
        trimmed = {k: status[k] for k in keep if k in status}
        if isinstance(trimmed.get("error"), str):
            trimmed["error"] = trimmed["error"][:1000]
        trimmed["disk_full"] = True
        try:
            size = self._file("status.json").stat().st_size
        except OSError:
            return False
        for candidate in ({**status, "disk_full": True}, trimmed):
            data = json_bytes(candidate, indent=None)[:-1]
            if len(data) < size:
                with open(self._file("status.json"), "r+b") as f:
                    f.write(data + b" " * (size - len(data) - 1) + b"\n")
                return True
        return False

    def append_metrics(self, row: dict[str, Any]) -> None:
        # The file is rewritten whole and atomically: epochs are few, and a reader never sees
        # a half-written line.
        self._writable()
        rows = self.metrics() + [row]
        atomic_write_bytes(self._file("metrics.jsonl"),
                           b"".join(json_bytes(r, indent=None) for r in rows))

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
        path = self.root / check_run_id(run_id)
        path.mkdir(parents=True, exist_ok=False)
        run = Run(path)
        atomic_write_json(path / "config.json", config)
        run.set_status("queued", created=time.time())
        return run

    def get(self, run_id: str) -> Run:
        path = self.root / check_run_id(run_id)
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
