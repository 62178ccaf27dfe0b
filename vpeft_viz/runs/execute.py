"""Turn a run request into a finished run directory.

``make_run_config`` validates every part of a request (method config, training recipe, data
options) before anything is written, so bad input fails fast with a clear message.
``execute_run`` then does the whole job for one run: data → backbone → method → training →
test evaluation → weights, artifacts and summary, keeping ``status.json`` current throughout.
The command line and the dashboard's worker processes both call it.
"""

from __future__ import annotations

import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..backbones import EMBEDDED_BACKBONE, create_backbone, image_size, input_stats
from ..config import ConfigError
from ..data import check_data_spec, resolve_data
from ..data.dataset import NORMALIZATIONS, ImageDataset, make_loader, resolve_normalization
from ..methods import attach_method, count_parameters, create_method, trainable_state
from ..train import (
    Callback,
    TrainConfig,
    autocast_dtype,
    evaluate,
    fit,
    flops_per_image,
    peak_memory_bytes,
    resolve_device,
    seed_everything,
)
from .store import Run


def versions() -> dict[str, str]:
    import timm

    return {"vpeft_viz": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def make_run_config(*, method: str, data: str, backbone: str | None = None,
                    method_config: dict[str, Any] | None = None,
                    train: dict[str, Any] | None = None, checkpoint: str | None = None,
                    pretrained: bool = True, normalization: str = "backbone") -> dict[str, Any]:
    """A validated, JSON-able run configuration (what ``config.json`` holds)."""
    m = create_method(method, method_config)
    t = TrainConfig.from_dict(train)
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization must be one of {', '.join(NORMALIZATIONS)}; "
                          f"got {normalization!r}")
    check_data_spec(data)
    name = data.split(":", 1)[1] if data.startswith("embedded:") else Path(data).name
    return {
        "method": method,
        "method_config": m.config.to_dict(),
        "backbone": {"name": backbone or EMBEDDED_BACKBONE, "pretrained": pretrained,
                     "checkpoint": checkpoint},
        "data": {"spec": data, "name": name, "normalization": normalization},
        "train": t.to_dict(),
        "versions": versions(),
    }


class RunRecorder(Callback):
    """Mirrors training progress into the run directory (throttled) and relays cancels."""

    def __init__(self, run: Run, every_s: float = 0.5):
        self.run, self.every_s, self._last = run, every_s, 0.0
        self._start = time.perf_counter()
        self.round: dict[str, Any] | None = None  # set by start_round (multi-round methods)
        self.epochs_before = 0

    def on_start(self, info: dict) -> None:
        self._start = time.perf_counter()
        self.run.update_progress(step=0, steps=info["steps"], epochs=info["epochs"], phase="train")

    def on_step(self, step: int, total_steps: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self._last >= self.every_s or step == total_steps:
            self._last = now
            elapsed = now - self._start
            eta = elapsed / step * (total_steps - step) if step else None
            self.run.update_progress(step=step, steps=total_steps, loss=loss,
                                     elapsed_s=elapsed, eta_s=eta)

    def start_round(self, index: int, rounds: int, label: str, epochs_before: int) -> None:
        """A method training in several rounds: rows get the round and a run-wide epoch."""
        self.round = {"round": index, "rounds": rounds, "round_label": label}
        self.epochs_before = epochs_before
        self.run.update_progress(**self.round)

    def on_epoch(self, row: dict) -> None:
        if self.round is not None:
            row = {**row, "epoch": self.epochs_before + row["epoch"],
                   "round": self.round["round"], "round_epoch": row["epoch"]}
        self.run.append_metrics(row)

    def should_stop(self) -> bool:
        return self.run.cancel_requested()


def build_loaders(task, model, cfg: dict, train_cfg: TrainConfig):
    mean, std = resolve_normalization(cfg["data"]["normalization"], *input_stats(model))
    size = image_size(model)
    datasets = {split: ImageDataset(task.splits[split], image_size=size, mean=mean, std=std,
                                    num_classes=task.num_classes)
                for split in ("train", "val", "test")}
    datasets["train"].preload()
    datasets["val"].preload()
    loaders = {
        "train": make_loader(datasets["train"], batch_size=train_cfg.batch_size, shuffle=True,
                             seed=train_cfg.seed),
        "val": make_loader(datasets["val"], batch_size=train_cfg.eval_batch_size, shuffle=False,
                           seed=train_cfg.seed),
        "test": make_loader(datasets["test"], batch_size=train_cfg.eval_batch_size,
                            shuffle=False, seed=train_cfg.seed),
    }
    return loaders


def execute_run(run: Run, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run the training a run directory describes; returns the summary.

    Failures are recorded in ``status.json`` (status ``failed`` and the error text, the
    traceback in ``error.txt``) and re-raised; a requested cancel ends as ``cancelled`` with
    the metrics recorded so far.
    """
    cfg = run.config
    run.set_status("running", started=time.time(), error=None)
    try:
        summary = _execute(run, cfg, list(callbacks or []))
    except BaseException as e:
        from .store import atomic_write_bytes

        atomic_write_bytes(run.path / "error.txt", traceback.format_exc().encode())
        run.set_status("failed", error=f"{type(e).__name__}: {e}", finished=time.time())
        raise
    status = "cancelled" if summary.get("cancelled") else "done"
    run.set_status(status, finished=time.time())
    return summary


def _execute(run: Run, cfg: dict, callbacks: list[Callback]) -> dict[str, Any]:
    train_cfg = TrainConfig.from_dict(cfg["train"])
    method = create_method(cfg["method"], cfg["method_config"])
    device = resolve_device(train_cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(train_cfg.seed)

    run.update_progress(phase="data")
    task = resolve_data(cfg["data"]["spec"], seed=train_cfg.seed)
    bb = cfg["backbone"]
    model = create_backbone(bb["name"], num_classes=task.num_classes,
                            pretrained=bb["pretrained"], checkpoint=bb["checkpoint"])
    backbone_params = sum(p.numel() for n, p in model.named_parameters()
                          if not n.startswith("head."))
    loaders = build_loaders(task, model, cfg, train_cfg)

    if method.needs_data:
        run.update_progress(phase="prepare")
        method.prepare(model, loaders["train"], device=device,
                       progress=lambda done, total: run.update_progress(
                           phase="prepare", prepare_done=done, prepare_total=total))
        run.write_method_state(method.state())
    attach_method(model, method)

    recorder = RunRecorder(run)
    finished: list[Any] = []  # FitResult of every round so far

    def fit_round(*, round_index: int = 0, rounds: int = 1, label: str = ""):
        """One call of the engine; a method may train in several rounds (see
        ``PeftMethod.train_rounds``), each recorded with its index in the metrics."""
        if rounds > 1:
            recorder.start_round(round_index, rounds, label,
                                 sum(len(r.history) for r in finished))
        res = fit(model, method, loaders["train"], loaders["val"], task.num_classes,
                  train_cfg, callbacks=[recorder, *callbacks], device=device)
        finished.append(res)
        return res

    result = method.train_rounds(model, fit_round)
    counts = count_parameters(model, method)  # after training: a pruning method kept fewer
    train_time = sum(r.train_time_s for r in finished)
    images = sum(r.images_seen for r in finished)
    summary: dict[str, Any] = {
        "run_id": run.id, "method": cfg["method"], "backbone": bb["name"],
        "task": task.name, "num_classes": task.num_classes, "seed": train_cfg.seed,
        "epochs": train_cfg.epochs, "epochs_done": len(result.history),
        "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
        "trainable_params": counts["trainable"],
        "trainable_params_excl_head": counts["trainable_excl_head"],
        "total_params": counts["total"], "backbone_params": backbone_params,
        "train_time_s": train_time, "images_per_s": images / train_time if train_time else 0.0,
        "device": str(device), "cancelled": result.cancelled,
    }
    if len(finished) > 1:
        summary["rounds"] = len(finished)
    if result.cancelled:
        run.write_summary(summary)
        return summary

    run.update_progress(phase="test")
    amp = autocast_dtype(train_cfg.precision, device)
    test = evaluate(model, loaders["test"], task.num_classes, device=device, amp=amp)
    sample = next(iter(loaders["test"]))[0][:1].to(device)
    summary.update({
        "test_acc": test.acc, "test_loss": test.loss,
        "weight_bytes": run.save_weights(trainable_state(model)),
        "peak_memory_bytes": peak_memory_bytes(device),
        "flops_per_image": flops_per_image(model, sample),
    })
    run.save_artifact("eval.json", {
        "class_names": task.class_names,
        "test_confusion": test.confusion, "test_per_class_acc": test.per_class_acc,
    })
    arts = method.artifacts(model)
    if arts:
        run.save_artifact("method.npz", {k: np.asarray(v) for k, v in arts.items()})
    run.write_summary(summary)
    return summary
