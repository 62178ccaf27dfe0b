"""A sweep's identity in the store: ``<store>/.sweeps/<name>.json`` (docs/run-store.md).

Written by the sweep's driver (``python -m vpeft_viz sweep``) before any run is created and
rewritten when the sweep is run again (an edited spec replaces the plan). It lists every run
the spec expands to, by run id, with the grid values that made it; the runs themselves are
ordinary run directories of the store, so the dashboard reads a sweep's progress from their
``status.json`` and its results from their ``summary.json``. A run the store already had
(same recipe hash, finished) is listed under its own id. Torch-free: the dashboard reads it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..store import RunStoreError, atomic_write_json, owner_fields, read_json

SWEEPS_DIR = ".sweeps"
ORIGINS = ("new", "kept", "in progress", "restarted")  # how the planned run came to be
_ENTRY_FIELDS = {"run_id": str, "config_hash": str, "task": str, "method": str, "seed": int,
                 "set": dict, "train": dict}


def manifest_path(store_root: str | Path, name: str) -> Path:
    return Path(store_root) / SWEEPS_DIR / f"{name}.json"


def manifest_paths(store_root: str | Path) -> list[Path]:
    """Every sweep manifest of a store, by name."""
    d = Path(store_root) / SWEEPS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.json") if not p.name.startswith("."))


def check_manifest(m: Any, path: Path) -> dict[str, Any]:
    """The manifest, or :class:`RunStoreError` naming the file and the bad field."""
    if not isinstance(m, dict):
        raise RunStoreError(f"{path}: a sweep manifest must be a JSON object")
    for key, kind in (("name", str), ("runs", list), ("backend", str)):
        if not isinstance(m.get(key), kind):
            raise RunStoreError(f"{path}: field {key!r} must be a {kind.__name__}")
    for i, entry in enumerate(m["runs"]):
        if not isinstance(entry, dict):
            raise RunStoreError(f"{path}: runs[{i}] must be an object")
        for key, kind in _ENTRY_FIELDS.items():
            v = entry.get(key)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise RunStoreError(f"{path}: runs[{i}].{key} must be a {kind.__name__}")
    for key in ("created", "started", "finished"):
        if m.get(key) is not None and not isinstance(m[key], (int, float)):
            raise RunStoreError(f"{path}: field {key!r} must be a number or null")
    return m


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    m = read_json(path)
    if m is None:
        raise RunStoreError(f"no sweep manifest at {path}")
    return check_manifest(m, path)


def write_manifest(store_root: str | Path, *, name: str, spec_file: str, spec: dict[str, Any],
                   backend: str, address: str | None, ray: dict[str, Any] | None,
                   runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Write (or replace) a sweep's manifest before its runs start; returns it."""
    path = manifest_path(store_root, name)
    try:
        previous = read_json(path, None)
    except RunStoreError:
        previous = None
    now = time.time()
    created = previous.get("created") if isinstance(previous, dict) else None
    # A run this sweep planned before keeps the origin it had then (a re-run finds its own
    # finished runs in the store: they were not "already there" when the sweep began).
    before = {e.get("run_id"): e.get("origin") for e in (previous or {}).get("runs") or []
              if isinstance(e, dict)} if isinstance(previous, dict) else {}
    runs = [{**e, "origin": before[e["run_id"]]} if e.get("origin") in ("kept", "in progress")
            and before.get(e["run_id"]) in ORIGINS else e for e in runs]
    manifest = {"name": name, "spec_file": spec_file, "spec": spec, "backend": backend,
                "address": address, "ray": ray, "created": created or now, "started": now,
                "finished": None, "driver": owner_fields(), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)
    return manifest


def mark_finished(store_root: str | Path, name: str, outcome: dict[str, Any]) -> None:
    """Record the end of a driver's pass (counts per final state, time)."""
    path = manifest_path(store_root, name)
    manifest = read_manifest(path)
    manifest.update(finished=time.time(), outcome=outcome)
    atomic_write_json(path, manifest)
