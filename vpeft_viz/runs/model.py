"""A finished run's test images, prepared as the run saw them, for views that measure the
rebuilt model again (attention maps); the model itself comes from
:func:`vpeft_viz.runs.weights.load_run_model` (never downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbones import image_size, input_stats
from ..data import resolve_data
from ..data.dataset import ImageDataset, resolve_normalization
from .store import Run


def run_test_images(path: str | Path, model: nn.Module, n: int, task=None,
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` test images of the run's task, prepared as the run saw them:
    (images, labels, class names). ``task``: the run's data when already read (e.g.
    :attr:`vpeft_viz.runs.weights.TrainedModel.task`), else it is read here."""
    run = Run(Path(path), read_only=True)
    cfg = run.config
    if task is None:
        task = resolve_data(cfg["data"]["spec"], seed=int(cfg.get("train", {}).get("seed", 0)))
    mean, std = resolve_normalization(cfg["data"].get("normalization", "backbone"),
                                      *input_stats(model))
    ds = ImageDataset(task.splits["test"][:n], image_size=image_size(model), mean=mean,
                      std=std, num_classes=task.num_classes, cache=False)
    images, labels = ds[list(range(len(ds)))]
    return images, labels, class_names(task)


def class_names(task) -> list[str]:
    """What to call each class in ``eval.json``: the folder's names, the embedded task's
    (generated tasks are read back as plain VTAB folders, without them), or the class ids."""
    if task.class_names:
        return [str(c) for c in task.class_names]
    if task.format == "embedded":
        from ..data.embedded import get_task

        names = [str(c) for c in get_task(task.name).class_names]
        if len(names) == task.num_classes:
            return names
    return [str(i) for i in range(task.num_classes)]
