"""The models and images the Inside views measure: a run's trained model, the frozen
backbone it started from, and the images of its splits prepared as the run saw them.

Rebuilding is :func:`vpeft_viz.runs.weights.load_run_model` (local backbones only, never a
download); a run without stored weights raises :class:`WeightsNotStored`, which the views
turn into a sentence instead of a failure. View models are in eval mode with every parameter
frozen (``requires_grad`` off): attributions take gradients with respect to the input only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...runs import RunStoreError
from . import records


class WeightsNotStored(RunStoreError):
    """The run's weights are not in its directory (shipped full fine-tuning drops them)."""


def has_weights(run_path: str | Path) -> bool:
    return (Path(run_path) / "weights.safetensors").is_file()


def run_config(run_path: str | Path) -> dict[str, Any]:
    from ...runs.store import Run

    return Run(Path(run_path), read_only=True).config


def load_view_model(run_path: str | Path):
    """The run's trained model (:class:`~vpeft_viz.runs.weights.TrainedModel`), frozen, in
    eval mode; :class:`WeightsNotStored` when its weights are not stored."""
    from ...runs.store import Run
    from ...runs.weights import load_run_model

    run = Run(Path(run_path), read_only=True)
    if not has_weights(run_path):
        summary = run.summary() or {}
        why = ("its weights were not shipped (over the size limit of cached_runs/)"
               if summary.get("weights_shipped") is False else "its weights are not stored")
        raise WeightsNotStored(f"run {run.id}: {why}; train it again to look inside it")
    trained = load_run_model(run)
    trained.model.requires_grad_(False)
    return trained


@dataclass(frozen=True)
class FrozenSpec:
    """The backbone a run started from, before any method touched it."""

    name: str
    pretrained: bool
    checkpoint: str | None
    seed: int  # matters only for a random-init backbone
    data_spec: str
    normalization: str

    @classmethod
    def of(cls, config: dict[str, Any]) -> FrozenSpec:
        bb, data = config["backbone"], config["data"]
        return cls(name=bb["name"], pretrained=bool(bb.get("pretrained", True)),
                   checkpoint=bb.get("checkpoint"), seed=int(config["train"]["seed"]),
                   data_spec=data["spec"], normalization=data.get("normalization", "backbone"))

    def key(self) -> str:
        """Stable name of the backbone, its weights and the task's images."""
        from ...backbones import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS

        h = hashlib.sha1(json.dumps(
            [self.name, self.pretrained, self.checkpoint,
             None if self.pretrained else self.seed, self.data_spec,
             self.normalization]).encode())
        if self.checkpoint:
            records.file_fingerprint(Path(self.checkpoint), h)
        elif self.pretrained and self.name == EMBEDDED_BACKBONE:
            records.file_fingerprint(EMBEDDED_WEIGHTS, h)
        return f"{self.name}-{h.hexdigest()[:16]}"


def load_frozen(spec: FrozenSpec):
    """(frozen backbone in eval mode, the task), built the way the run built it before the
    method was attached (same seeding, so a random-init backbone comes back identical)."""
    from ...backbones import EMBEDDED_BACKBONE, create_backbone
    from ...data import resolve_data
    from ...train import seed_everything

    if spec.pretrained and not spec.checkpoint and spec.name != EMBEDDED_BACKBONE:
        raise RunStoreError(f"the frozen {spec.name} would be downloaded from the hub (views "
                            "rebuild local backbones only)")
    seed_everything(spec.seed)
    task = resolve_data(spec.data_spec, seed=spec.seed)
    model = create_backbone(spec.name, num_classes=task.num_classes,
                            pretrained=spec.pretrained, checkpoint=spec.checkpoint)
    return model.eval().requires_grad_(False), task


def class_names(task) -> list[str]:
    """What the run's ``eval.json`` calls the classes (folder names, the embedded task's
    names, or the class ids)."""
    from ...runs.model import class_names as names

    return names(task)


def split_dataset(task, model, normalization: str, split: str, n: int | None = None):
    """The first ``n`` images of ``split`` (all when None), prepared as in training."""
    from ...backbones import image_size, input_stats
    from ...data.dataset import ImageDataset, resolve_normalization

    samples = task.splits[split] if n is None else task.splits[split][:n]
    if not samples:
        raise ValueError(f"task {task.name} has no {split} images")
    mean, std = resolve_normalization(normalization, *input_stats(model))
    return ImageDataset(samples, image_size=image_size(model), mean=mean, std=std,
                        num_classes=task.num_classes, cache=False)


def batches(dataset, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """``(images, labels)`` of ``dataset`` in order, ``batch_size`` at a time."""
    for start in range(0, len(dataset), batch_size):
        yield dataset[list(range(start, min(start + batch_size, len(dataset))))]


def thumbnail(path: str | Path, size: int = 96) -> np.ndarray:
    """A test image for the gallery, (size, size, 3) uint8: a small image enlarged with
    nearest-neighbour pixels (its pixels stay visible), a large one reduced."""
    from PIL import Image

    from ...data.dataset import to_rgb8

    with Image.open(path) as image:
        rgb = to_rgb8(image, path)
        resample = (Image.Resampling.NEAREST if max(rgb.size) < size
                    else Image.Resampling.BILINEAR)
        return np.asarray(rgb.resize((size, size), resample)).copy()


def display_image(image, mean, std) -> np.ndarray:
    """A normalised (3, H, W) tensor back to pixels in [0, 1], (H, W, 3)."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.clip(np.asarray(image, dtype=np.float32) * s + m, 0, 1).transpose(1, 2, 0)


def test_image(trained, index: int) -> dict[str, Any]:
    """Test image ``index`` of the run's task as the run saw it: ``x`` (1 × 3 × H × W,
    normalised), ``label``, ``shown`` (H × W × 3 in [0, 1]), ``mean``, ``std``."""
    from ...backbones import input_stats
    from ...data.dataset import resolve_normalization

    norm = trained.config["data"].get("normalization", "backbone")
    data = split_dataset(trained.task, trained.model, norm, "test")
    if not 0 <= index < len(data):
        raise ValueError(f"test image {index} does not exist: the test split has "
                         f"{len(data)} images (0 to {len(data) - 1})")
    x, label = data[index]
    mean, std = resolve_normalization(norm, *input_stats(trained.model))
    return {"x": x[None], "label": int(label), "shown": display_image(x, mean, std),
            "mean": mean, "std": std}
