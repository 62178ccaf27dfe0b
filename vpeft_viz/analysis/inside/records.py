"""Where the Inside page's computed records live, and how a stale one is recognised.

A record is computed once per run and image set and kept:

* a run of the user store: in the run, ``<run>/artifacts/inside/<name>``;
* a run of a read-only store (the shipped ``cached_runs/``, never written into): in the user
  cache, ``$VPEFT_VIZ_CACHE/inside/runs/<run_id>-<hash of the run's path>/<name>``
  (``~/.cache/vpeft_viz`` without the variable);
* a frozen backbone's record (shared by every run on that backbone and task):
  ``$VPEFT_VIZ_CACHE/inside/frozen/<key>-<name>``.

Every record carries the version of its format, the settings it was computed with and the
*fingerprint* of what it was computed from (the run's weights files and method state, or the
backbone's weights): a record whose fingerprint or settings differ is ignored and computed
again, so regenerating ``cached_runs/`` or retraining never shows an old measurement.
Records are ``.npz`` (arrays, ``allow_pickle=False``, with the metadata as a JSON string
under ``meta``) or ``.json``, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...runs.files import atomic_write_bytes, json_bytes

VERSION = 1
FOLDER = "inside"
# Files hashed whole up to this size; larger ones (ViT-B full fine-tuning) by size and time.
HASH_LIMIT = 64 * 2**20
RUN_FILES = ("weights.safetensors", "weights.packed", "method_state.json")


def cache_root() -> Path:
    base = os.environ.get("VPEFT_VIZ_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "vpeft_viz") / FOLDER


def run_dir(run_path: str | Path, *, writable: bool) -> Path:
    """The folder of a run's records (see the module docstring)."""
    run_path = Path(run_path)
    if writable:
        return run_path / "artifacts" / FOLDER
    tag = hashlib.sha1(str(run_path.resolve()).encode()).hexdigest()[:8]
    return cache_root() / "runs" / f"{run_path.name}-{tag}"


def frozen_dir() -> Path:
    return cache_root() / "frozen"


def file_fingerprint(path: Path, h: Any) -> None:
    """Feed ``path`` into the hash ``h``: its bytes, or its size and time when large."""
    try:
        st = path.stat()
    except OSError:
        h.update(f"{path.name}:absent;".encode())
        return
    if st.st_size <= HASH_LIMIT:
        h.update(f"{path.name}:".encode())
        h.update(path.read_bytes())
    else:
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())


def run_fingerprint(run_path: str | Path) -> str:
    """What a run's records depend on: its weights (packed or not) and its method state."""
    h = hashlib.sha1()
    for name in RUN_FILES:
        file_fingerprint(Path(run_path) / name, h)
    return h.hexdigest()


def key_text(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.asarray(json_bytes({**meta, "version": VERSION},
                                                        indent=None).decode()),
                        **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: Path, *, fingerprint: str | None,
             settings: dict[str, Any] | None) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of a record, or None when it is absent, unreadable, of another
    version, or computed from other weights (``fingerprint``) or ``settings``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if not _current(meta, fingerprint, settings):
        return None
    return arrays, meta


def save_json(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, json_bytes({**record, "version": VERSION}))


def load_json(path: Path, *, fingerprint: str | None,
              settings: dict[str, Any] | None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and _current(rec, fingerprint, settings) else None


def _current(meta: dict[str, Any], fingerprint: str | None,
             settings: dict[str, Any] | None) -> bool:
    if meta.get("version") != VERSION:
        return False
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        return False
    return settings is None or key_text(meta.get("settings", {})) == key_text(settings)
