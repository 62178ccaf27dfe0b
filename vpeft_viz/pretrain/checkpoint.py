"""Checkpoints of a pretraining run, so a long run can stop and continue bit for bit.

A checkpoint holds everything the loop's future depends on: the student, the distillation
heads, the optimiser's moments, the number of steps done, the random states (the shift
generator, torch's global and CUDA generators) and the recipe. The data stream needs no
state of its own: batch ``b`` is a pure function of ``(seed, b)``, so the step count is its
position. A checkpoint is written to a temporary file and renamed over the old one, so a
run killed while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "vpeft_viz.pretrain checkpoint v1"
# Settings that change where or how fast the run goes, not what it computes: a run may be
# resumed with other values (on CPU, other thread counts can change float rounding, so
# bit-for-bit equality holds only with the same ones).
EXECUTION_SETTINGS = ("threads", "device")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or for a different recipe."""


def recipe_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"field: checkpoint X, now Y"`` for every recipe field that differs (sorted)."""
    keys = sorted((set(saved) | set(now)) - set(EXECUTION_SETTINGS))
    return [f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now {now.get(k, '(absent)')!r}"
            for k in keys if saved.get(k) != now.get(k)]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe a checkpoint was made with (to resume it without repeating every flag)."""
    return read_checkpoint(Path(path))["recipe"]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's whole state (tensors on the CPU), checked to be one; no recipe check."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear error
        raise CheckpointError(f"{path} is not a readable pretraining checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pretraining checkpoint ({FORMAT})")
    return state


def load_checkpoint(path: Path, recipe: dict[str, Any], photos: str | None) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors on the CPU), after checking it continues this recipe.

    Loading always maps to the CPU: random-generator states must stay CPU tensors, and
    ``load_state_dict`` moves weights and optimiser moments to the model's device.

    ``photos`` is the fingerprint of the photo set the recipe reads now (None: no photos);
    a checkpoint made on another photo set is refused too, as its batches would differ.
    """
    path = Path(path)
    state = read_checkpoint(path)
    diffs = recipe_differences(state["recipe"], recipe)
    if state.get("photos") != photos:
        diffs.append(f"photo set: checkpoint {state.get('photos')!r}, now {photos!r}")
    if diffs:
        raise CheckpointError(f"cannot resume {path}: it was made with a different recipe ("
                              + "; ".join(diffs) + "). Resume with the checkpoint's settings "
                              "or start a new run.")
    return state
