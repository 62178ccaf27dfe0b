"""A run's trained weights: writing them (packed where the method packs) and rebuilding the
trained model from a run directory.

Most methods keep their weights in ``weights.safetensors``. A method with a packed format
(low-bit adapters, :meth:`PeftMethod.pack_weights`) writes ``weights.packed`` too, and the
safetensors file then holds only what was not packed (the classifier head). The summary
reports both sizes: ``adapter_bytes`` (the packed file), ``head_bytes`` (the safetensors
file) and ``weight_bytes`` (their sum, what a task costs on disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbones import EMBEDDED_BACKBONE, BackboneError, backbone_weights_id, create_backbone
from ..methods import PeftMethod, attach_method, create_method, trainable_state
from ..weights import recorded_weights_id
from .store import Run, RunStoreError, atomic_write_bytes

PACKED_WEIGHTS = "weights.packed"


def save_run_weights(run: Run, method: PeftMethod, model: nn.Module) -> dict[str, int]:
    """Write the run's weights; returns the summary's byte counts."""
    state = trainable_state(model)
    packed = method.pack_weights(model)
    if packed is None:
        return {"weight_bytes": run.save_weights(state)}
    data, names = packed
    path = run.path / PACKED_WEIGHTS
    atomic_write_bytes(path, data)
    head = run.save_weights({k: v for k, v in state.items() if k not in names})
    adapter = path.stat().st_size
    return {"weight_bytes": head + adapter, "adapter_bytes": adapter, "head_bytes": head}


def has_weights(run: Run) -> bool:
    """Whether the run's trained model can be rebuilt (shipped full fine-tuning runs drop
    their weights to keep the repository small)."""
    return run.weights_path.is_file()


@dataclass
class TrainedModel:
    """A run's model rebuilt from its directory, in eval mode."""

    model: nn.Module
    method: PeftMethod
    config: dict[str, Any]
    task: Any  # the run's data (``vpeft_viz.data`` task: splits, classes)


def check_same_backbone_weights(run: Run) -> None:
    """Refuse a run whose frozen backbone weights are not the ones this machine would load:
    its stored (trainable) weights only reproduce the run on top of the same backbone."""
    bb = run.config["backbone"]
    recorded = recorded_weights_id(bb)
    if recorded is None:  # random init, hub weights, or a checkpoint run from before the record
        return
    try:
        now = backbone_weights_id(bb["name"], pretrained=bb.get("pretrained", True),
                                  checkpoint=bb.get("checkpoint"))
    except BackboneError as e:
        raise RunStoreError(f"run {run.id}: {e}") from None
    if now != recorded:
        where = bb.get("checkpoint") or f"the embedded {bb['name']} weights"
        raise RunStoreError(
            f"run {run.id} was trained on backbone weights {recorded}, but {where} here are "
            f"{now} (the backbone was updated since); retrain the run on these weights "
            "(`python -m vpeft_viz cache-runs --update` for shipped runs)")


def load_run_model(run: Run, *, device: torch.device | str = "cpu") -> TrainedModel:
    """Backbone (as the run built it) + method (its state) + the stored weights.

    Packed weights come back exactly as the trained model used them, so the rebuilt model
    gives the same logits as the one in memory at the end of training.
    """
    cfg = run.config
    bb = cfg["backbone"]
    if bb.get("pretrained") and not bb.get("checkpoint") and bb["name"] != EMBEDDED_BACKBONE:
        raise RunStoreError(f"run {run.id} uses hub weights of {bb['name']}; rebuilding it "
                            "would download them (views rebuild local backbones only)")
    check_same_backbone_weights(run)
    if not has_weights(run):
        raise RunStoreError(f"run {run.id} has no stored weights (not shipped, or not "
                            "finished); retrain it to analyse it")
    from ..data import resolve_data
    from ..train import seed_everything

    # the same steps as the run, so a random-init backbone comes back identical too
    seed_everything(cfg["train"]["seed"])
    task = resolve_data(cfg["data"]["spec"], seed=cfg["train"]["seed"])
    num_classes = task.num_classes
    model = create_backbone(bb["name"], num_classes=num_classes,
                            pretrained=bb["pretrained"], checkpoint=bb["checkpoint"])
    method = create_method(cfg["method"], cfg["method_config"])
    state = run.method_state()
    if state:
        method.load_state(state)
    attach_method(model, method)
    result = model.load_state_dict(run.load_weights(), strict=False)
    if result.unexpected_keys:
        raise RunStoreError(f"run {run.id}: weights for layers the model lacks: "
                            f"{result.unexpected_keys[:3]}")
    packed = run.path / PACKED_WEIGHTS
    if packed.is_file():
        method.load_packed_weights(model, packed.read_bytes())
    return TrainedModel(model.to(device).eval(), method, cfg, task)
