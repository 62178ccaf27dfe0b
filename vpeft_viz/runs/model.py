"""Rebuild a finished run's trained model, and read its test images, for views that measure
the model again (attention maps). Never downloads: only runs whose backbone is on this
machine (the embedded one, a local checkpoint, or random init) can be rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbones import EMBEDDED_BACKBONE, create_backbone, image_size, input_stats
from ..data import resolve_data
from ..data.dataset import ImageDataset, resolve_normalization
from ..methods import PeftMethod, attach_method, create_method
from .store import Run, RunStoreError


def load_run_model(path: str | Path) -> tuple[nn.Module, PeftMethod]:
    """The run's backbone with its method attached and its saved weights loaded (eval mode)."""
    run = Run(Path(path), read_only=True)
    cfg, summary = run.config, run.summary() or {}
    bb = cfg["backbone"]
    if bb.get("pretrained") and not bb.get("checkpoint") and bb["name"] != EMBEDDED_BACKBONE:
        raise RunStoreError(f"run {run.id} uses hub weights of {bb['name']}; rebuilding it "
                            "would download them (views rebuild local backbones only)")
    if "num_classes" not in summary:
        raise RunStoreError(f"run {run.id} has no summary with num_classes")
    method = create_method(cfg["method"], cfg["method_config"])
    state = run.method_state()
    if state:
        method.load_state(state)
    model = create_backbone(bb["name"], num_classes=int(summary["num_classes"]),
                            pretrained=bool(bb.get("pretrained")), checkpoint=bb.get("checkpoint"))
    attach_method(model, method)
    result = model.load_state_dict(run.load_weights(), strict=False)
    if result.unexpected_keys:
        raise RunStoreError(f"run {run.id}'s weights do not fit its model: unexpected "
                            f"{', '.join(result.unexpected_keys[:5])}")
    return model.eval(), method


def run_test_images(path: str | Path, model: nn.Module, n: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` test images of the run's task, prepared as the run saw them:
    (images, labels, class names)."""
    run = Run(Path(path), read_only=True)
    cfg = run.config
    task = resolve_data(cfg["data"]["spec"], seed=int(cfg.get("train", {}).get("seed", 0)))
    mean, std = resolve_normalization(cfg["data"].get("normalization", "backbone"),
                                      *input_stats(model))
    ds = ImageDataset(task.splits["test"][:n], image_size=image_size(model), mean=mean,
                      std=std, num_classes=task.num_classes, cache=False)
    images, labels = ds[list(range(len(ds)))]
    names = list(task.class_names or [str(c) for c in range(task.num_classes)])
    return images, labels, names
