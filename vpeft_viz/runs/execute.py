"""Turn a run request into a finished run directory.

``make_run_config`` validates every part of a request (method config, training recipe, data
options) before anything is written, so bad input fails fast with a clear message.
``execute_run`` then does the whole job for one run: data → backbone → method → training →
weights → test evaluation → artifacts and summary, keeping ``status.json`` current throughout.
The command line and the dashboard's worker processes both call it.

A run ends ``failed`` with the reason when anything goes wrong, including a loss that becomes
NaN (no weights are saved then); a test phase that fails keeps the weights and validation
results already written. A cancel (the ``cancel`` flag, or SIGTERM to the process) is
honoured in every phase and ends the run ``cancelled`` with the epochs finished so far.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..backbones import (
    EMBEDDED_BACKBONE,
    BackboneError,
    backbone_weights_id,
    check_backbone_name,
    create_backbone,
    hub_weights_cached,
    image_size,
    input_stats,
)
from ..config import ConfigError
from ..data import EMBEDDED_PREFIX, check_data_spec, check_task_files, resolve_data
from ..data.dataset import NORMALIZATIONS, ImageDataset, make_loader, resolve_normalization
from ..data.fewshot import apply_shots
from ..methods import attach_method, count_parameters, create_method
from ..train import (
    Callback,
    Cancelled,
    TrainConfig,
    autocast_dtype,
    evaluate,
    fit,
    flops_per_image,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    seed_everything,
)
from .model import class_names
from .store import Run, atomic_write_bytes, owner_fields
from .weights import save_run_weights


def versions() -> dict[str, str]:
    import timm

    return {"vpeft_viz": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def make_run_config(*, method: str, data: str, backbone: str | None = None,
                    method_config: dict[str, Any] | None = None,
                    train: dict[str, Any] | None = None, checkpoint: str | None = None,
                    pretrained: bool = True, normalization: str = "backbone",
                    data_warnings: list[str] | None = None) -> dict[str, Any]:
    """A validated, JSON-able run configuration (what ``config.json`` holds).

    ``data_warnings``: what ``check_task_files(data, seed=...)`` returned for this data and
    seed, when the caller checked it already (a sweep checks each task once, not per run)."""
    m = create_method(method, method_config)
    t = TrainConfig.from_dict(train)
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization must be one of {', '.join(NORMALIZATIONS)}; "
                          f"got {normalization!r}")
    check_data_spec(data)
    if t.shots and not data.startswith(EMBEDDED_PREFIX):  # embedded tasks: checked at run time
        apply_shots(resolve_data(data, seed=t.seed), t.shots, t.split_seed)
    try:  # a typo, a non-ViT or a missing checkpoint fails here, before a run directory exists
        check_backbone_name(backbone or EMBEDDED_BACKBONE)
        weights = backbone_weights_id(backbone or EMBEDDED_BACKBONE, pretrained=pretrained,
                                      checkpoint=checkpoint)
    except BackboneError as e:
        raise ConfigError(f"backbone: {e}") from None
    # Every image of every split is decoded now, before a run directory exists, so a broken
    # file is named with its split file and line instead of failing the run after training.
    warnings = (check_task_files(data, seed=t.seed) if data_warnings is None
                else list(data_warnings))
    name = data.split(":", 1)[1] if data.startswith("embedded:") else Path(data).name
    data_cfg: dict[str, Any] = {"spec": data, "name": name, "normalization": normalization}
    if warnings:
        data_cfg["warnings"] = warnings
    config = {
        "method": method,
        "method_config": m.config.to_dict(),
        "backbone": {"name": backbone or EMBEDDED_BACKBONE, "pretrained": pretrained,
                     "checkpoint": checkpoint, "weights": weights},
        "data": data_cfg,
        # the learning rate used, never null: a later change of a method's default must not
        # change what this run says it did (runs/recipe.py reads older null ones)
        "train": {**t.to_dict(), "lr": t.lr if t.lr is not None
                  else m.default_lr_on(backbone or EMBEDDED_BACKBONE)},
        "versions": versions(),
    }
    if m.source_request() is not None:  # a named source run must exist and fit (PVP)
        from .sources import check_source

        check_source(config)
    return config


MAX_LOSS_POINTS = 240  # per-step losses kept in status.json (the last ones, ~2 min at 2/s)


class RunRecorder(Callback):
    """Mirrors training progress into the run directory (throttled) and relays cancels;
    the progress keeps the last per-step losses, drawn while epoch 1 has no point yet."""

    def __init__(self, run: Run, every_s: float = 0.5):
        self.run, self.every_s, self._last = run, every_s, 0.0
        self._losses: list[list[float]] = []  # [step, loss] at each progress update
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
            self._losses = [*self._losses[-(MAX_LOSS_POINTS - 1):], [step, loss]]
            self.run.update_progress(step=step, steps=total_steps, loss=loss,
                                     elapsed_s=elapsed, eta_s=eta, loss_curve=self._losses)

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


def stop_if_cancelled(run: Run) -> None:
    """Raise :class:`Cancelled` when a cancel was requested (checked between phases)."""
    if run.cancel_requested():
        raise Cancelled(f"cancelled during the {run.status().get('progress', {}).get('phase')} "
                        "phase")


class Terminated(BaseException):
    """A second SIGTERM: stop now, whatever the run is doing."""


@contextlib.contextmanager
def _sigterm_cancels(run: Run) -> Iterator[list[int]]:
    """While the run executes, SIGTERM requests a cancel (the run stops at its next step or
    phase and ends ``cancelled`` with what it finished); a second SIGTERM stops it at once.
    Yields a list that receives the signal numbers seen. Only in the main thread (Python
    delivers signals there); elsewhere nothing changes."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame) -> None:
        seen.append(signum)
        if len(seen) > 1:
            raise Terminated(f"stopped by signal {signum}")
        try:
            run.request_cancel()
        except OSError:  # no room for the flag: stop at once instead
            raise Terminated(f"stopped by signal {signum}") from None

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_loaders(task, model, cfg: dict, train_cfg: TrainConfig,
                  stop: Callable[[], None] | None = None):
    """Loaders of the three splits, train and val decoded now (``stop()`` is called every
    100 images so a cancel is honoured while decoding)."""
    mean, std = resolve_normalization(cfg["data"]["normalization"], *input_stats(model))
    size = image_size(model)
    datasets = {split: ImageDataset(task.splits[split], image_size=size, mean=mean, std=std,
                                    num_classes=task.num_classes)
                for split in ("train", "val", "test")}

    def progress(done: int, total: int) -> None:
        if stop is not None and (done % 100 == 0 or done == total):
            stop()

    datasets["train"].preload(progress)
    datasets["val"].preload(progress)
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
    traceback in ``error.txt``) and re-raised; a requested cancel (or SIGTERM) ends as
    ``cancelled`` with the metrics recorded so far. The status records this process as the
    run's owner, so a run whose process is killed is reported ``failed``, not ``running``.
    """
    cfg = run.config
    warnings = list(cfg.get("data", {}).get("warnings") or [])
    run.set_status("running", started=time.time(), error=None, warnings=warnings,
                   **owner_fields())
    with _sigterm_cancels(run) as signals:
        try:
            summary = _execute(run, cfg, list(callbacks or []))
        except Cancelled as e:
            why = f"{e} (SIGTERM)" if signals else str(e)
            run.set_status("cancelled", error=why, finished=time.time())
            return {"run_id": run.id, "cancelled": True, "epochs_done": 0,
                    "warnings": warnings}
        except BaseException as e:
            with contextlib.suppress(OSError):  # a full disk must not hide the real error
                atomic_write_bytes(run.path / "error.txt", traceback.format_exc().encode())
            run.set_status("failed", error=f"{type(e).__name__}: {e}", finished=time.time())
            raise
    if summary.get("cancelled"):
        why = "stopped by SIGTERM" if signals else None
        run.set_status("cancelled", error=why, finished=time.time())
    else:
        run.set_status("done", finished=time.time())
    return summary


def _execute(run: Run, cfg: dict, callbacks: list[Callback]) -> dict[str, Any]:
    train_cfg = TrainConfig.from_dict(cfg["train"])
    method = create_method(cfg["method"], cfg["method_config"])
    device = resolve_device(train_cfg.device)
    source = None
    if method.source_request() is not None:  # before seeding: a source trained now or found
        from .sources import start_from_source  # leaves the run's own randomness the same

        source = start_from_source(run, method, callbacks)
        run.write_method_state(method.state())
        stop_if_cancelled(run)
    reset_peak_memory(device)  # the run's own peak, not its process's earlier high-water
    seed_everything(train_cfg.seed)

    run.update_progress(phase="data")
    stop_if_cancelled(run)
    task = resolve_data(cfg["data"]["spec"], seed=train_cfg.seed)
    full_train = len(task.splits["train"])
    task = apply_shots(task, train_cfg.shots, train_cfg.split_seed)  # few-shot: data/fewshot.py
    stop_if_cancelled(run)
    bb = cfg["backbone"]
    if bb["pretrained"] and not bb["checkpoint"] and not hub_weights_cached(bb["name"]):
        run.update_progress(phase="weights")  # timm downloads them in create_backbone
    model = create_backbone(bb["name"], num_classes=task.num_classes,
                            pretrained=bb["pretrained"], checkpoint=bb["checkpoint"])
    backbone_params = sum(p.numel() for n, p in model.named_parameters()
                          if not n.startswith("head."))
    stop_if_cancelled(run)
    loaders = build_loaders(task, model, cfg, train_cfg, stop=lambda: stop_if_cancelled(run))

    if method.needs_data:
        run.update_progress(phase="prepare")

        def prepare_progress(done: int, total: int) -> None:
            run.update_progress(phase="prepare", prepare_done=done, prepare_total=total)
            stop_if_cancelled(run)

        method.prepare(model, loaders["train"], device=device, progress=prepare_progress)
        stop_if_cancelled(run)
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
        "warnings": list(cfg["data"].get("warnings") or []),
        "train_size": len(task.splits["train"]),
    }
    if train_cfg.shots:
        summary.update(shots=train_cfg.shots, shots_seed=train_cfg.split_seed,
                       train_size_full=full_train)
    if source is not None:
        summary["source_run"] = source["run_id"]
    if len(finished) > 1:
        summary["rounds"] = len(finished)
    if result.cancelled:
        run.write_summary(summary)
        return summary

    # Weights and validation results first: a test phase that fails keeps the training.
    summary.update(save_run_weights(run, method, model))  # weight_bytes (+ packed sizes)
    run.write_summary(summary)
    run.update_progress(phase="test")
    amp = autocast_dtype(train_cfg.precision, device)
    try:
        test = evaluate(model, loaders["test"], task.num_classes, device=device, amp=amp)
    except Exception as e:
        raise RuntimeError(f"test phase failed (trained weights and validation results are "
                           f"kept in the run): {e}") from e
    sample = next(iter(loaders["test"]))[0][:1].to(device)
    summary.update({
        "test_acc": test.acc, "test_loss": test.loss,
        "peak_memory_bytes": peak_memory_bytes(device),
        "flops_per_image": flops_per_image(model, sample),
    })
    run.save_artifact("eval.json", {
        "class_names": class_names(task),
        "test_confusion": test.confusion, "test_per_class_acc": test.per_class_acc,
    })
    # per test image, in split order: the Inside page's drill-down (docs/inside.md)
    run.save_artifact("predictions.npz", {"labels": test.labels, "predictions": test.predictions,
                                          "confidence": test.confidence})
    arts = method.artifacts(model)
    arts.update(method.test_artifacts(model, loaders["test"], device=device))
    if arts:
        run.save_artifact("method.npz", {k: np.asarray(v) for k, v in arts.items()})
    run.write_summary(summary)
    return summary
