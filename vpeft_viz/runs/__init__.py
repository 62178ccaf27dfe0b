"""Run store, run execution and the job queue.

Where runs live: the user store (``$VPEFT_VIZ_RUNS``, default ``runs/`` at the repository
root, git-ignored) and the shipped read-only ``cached_runs/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .store import FINISHED, STATUSES, Run, RunStore, RunStoreError

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHED_STORE = REPO_ROOT / "cached_runs"
# A store-level file beside the runs: the "pixels, no backbone" reference per embedded task
# (written by ``python -m vpeft_viz pixels``; independent of the backbone, so a regenerated
# cached store keeps it). Format: vpeft_viz/analysis/pixel_baseline.py, docs/run-store.md.
PIXEL_REFERENCE_FILE = "pixel_baseline.json"


def user_store_path() -> Path:
    return Path(os.environ.get("VPEFT_VIZ_RUNS", REPO_ROOT / "runs"))


def user_store() -> RunStore:
    return RunStore(user_store_path())


def cached_store() -> RunStore:
    return RunStore(CACHED_STORE, read_only=True)


__all__ = ["CACHED_STORE", "FINISHED", "PIXEL_REFERENCE_FILE", "REPO_ROOT", "STATUSES", "Run",
           "RunStore", "RunStoreError", "cached_store", "user_store", "user_store_path"]
