"""Training and evaluation engine: a loop that reads top to bottom, with callbacks.

The loop knows nothing of the UI or the run store: progress leaves through
:class:`Callback` hooks (a progress bar, a run directory, a dashboard poller attach there).
Model selection uses the validation split only; the caller evaluates the test split once,
on the selected weights (VTAB-1k papers that pick checkpoints on test are not followed).
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config, ConfigError, param
from .methods import PeftMethod, get_method_class, method_names, trainable_state


def _lrs_text(lr_of) -> str:
    """``lr_of(method class)`` over the registered methods, grouped: most common first."""
    by_lr: dict[float, list[str]] = {}
    for name in method_names():
        by_lr.setdefault(lr_of(get_method_class(name)), []).append(name)
    common = max(by_lr, key=lambda lr: len(by_lr[lr]))
    others = [f"{lr:g} for {', '.join(names)}" for lr, names in by_lr.items() if lr != common]
    return "; ".join([f"{common:g} for most methods", *others])


def _default_lrs() -> str:
    """The registered methods' default learning rates, for the ``lr`` help text."""
    from .weights import EMBEDDED_BACKBONE

    return (f"on the embedded backbone, chosen on its validation splits: "
            f"{_lrs_text(lambda m: m.default_lr_on(EMBEDDED_BACKBONE))}; on other backbones: "
            f"{_lrs_text(lambda m: m.default_lr)}")


@dataclass
class TrainConfig(Config):
    """The training recipe (defaults follow the common VTAB-1k AdamW recipe, shortened)."""

    prefix = "train"

    epochs: int = param(10, "Passes over the training split.", min=1, max=1000)
    batch_size: int = param(64, "Training images per step.", min=1, max=4096)
    lr: float | None = param(None, "Peak learning rate; empty uses the method's default "
                             f"({_default_lrs()}).", min=0.0, max=10.0)
    weight_decay: float = param(1e-4, "Decoupled weight decay (AdamW) or L2 (SGD).",
                                min=0.0, max=1.0)
    optimizer: str = param("adamw", "Optimiser.", choices=("adamw", "sgd"))
    momentum: float = param(0.9, "SGD momentum (ignored by AdamW).", min=0.0, max=0.999)
    warmup_epochs: float = param(1.0, "Linear warm-up length before cosine decay, in epochs.",
                                 min=0.0, max=1000.0)
    label_smoothing: float = param(0.0, "Label smoothing of the cross-entropy.",
                                   min=0.0, max=0.5)
    seed: int = param(0, "Seed for initialisation, shuffling and dropout.", min=0, max=2**31 - 1)
    device: str = param("auto", "Where to train: a GPU when there is one (auto), or force one.",
                        choices=("auto", "cpu", "cuda"))
    precision: str = param("auto", "bf16 autocast on CUDA (auto), or force fp32.",
                           choices=("auto", "fp32", "bf16"))
    eval_batch_size: int = param(256, "Images per evaluation step.", min=1, max=8192)
    shots: int | None = param(None, "Few-shot training: this many images per class drawn from "
                              "the training split (the papers use 1, 2, 4, 8, 16); validation "
                              "and test unchanged. Empty or 0: the whole training split.",
                              min=0, max=100_000)
    shots_seed: int | None = param(None, "Seed of the few-shot draw; empty: the run's seed "
                                   "(each seed then trains on its own split).",
                                   min=0, max=2**31 - 1)

    def validate(self) -> None:
        if self.shots == 0:  # 0 and empty both mean the whole split: one recorded form
            self.shots = None
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"train.warmup_epochs ({self.warmup_epochs}) must not exceed "
                              f"train.epochs ({self.epochs})")

    @property
    def split_seed(self) -> int:
        """The seed of the few-shot draw (docs/cli.md): ``shots_seed``, else the run's seed."""
        return self.seed if self.shots_seed is None else self.shots_seed


def resolve_device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(kind)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_PROC_SELF = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a run's peak memory now, so it is this run's own and not the high-water
    mark of a process that ran other runs (or a dashboard) before: resets the CUDA allocator's
    peak on GPU and, on Linux, the process's peak resident set size (``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        (_PROC_SELF / "clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
    except OSError:  # not Linux, or not allowed: peak_memory_bytes falls back to ru_maxrss
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocator memory on GPU; on CPU the process's peak resident set size since
    :func:`reset_peak_memory` (Linux ``VmHWM``), or over the process's life elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in (_PROC_SELF / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Callback:
    """Hooks the loop calls; override what you need."""

    def on_start(self, info: dict) -> None: ...

    def on_step(self, step: int, total_steps: int, loss: float) -> None: ...

    def on_epoch(self, row: dict) -> None: ...

    def should_stop(self) -> bool:
        return False


class Cancelled(Exception):
    """A run stopped because a cancel was requested (outside the training loop, which
    returns instead; see :func:`fit`)."""


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, scales: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


# Largest class count whose confusion matrix is kept dense (1024² int64 = 8 MiB); beyond it
# only per-class counts are kept, so a huge label space never allocates classes² memory.
DENSE_CONFUSION_MAX = 1024


@dataclass
class EvalResult:
    loss: float
    acc: float
    confusion: np.ndarray | None  # (true, predicted) counts; None beyond DENSE_CONFUSION_MAX
    class_correct: np.ndarray  # per true class: correctly predicted
    class_total: np.ndarray  # per true class: images
    # per image, in the loader's order: true class, predicted class, softmax probability of
    # the prediction (what a run keeps of its test phase, ``artifacts/predictions.npz``)
    labels: np.ndarray | None = None
    predictions: np.ndarray | None = None
    confidence: np.ndarray | None = None

    @property
    def per_class_acc(self) -> list[float]:
        return [float(c / t) if t else float("nan")
                for c, t in zip(self.class_correct, self.class_total)]


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the weights are ruined, the run cannot go on."""


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, *, device: torch.device,
             amp: torch.dtype | None = None) -> EvalResult:
    model.eval()
    dense = num_classes <= DENSE_CONFUSION_MAX
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64) if dense else None
    correct = np.zeros(num_classes, dtype=np.int64)
    total = np.zeros(num_classes, dtype=np.int64)
    total_loss, n = 0.0, 0
    trues, preds, confs = [], [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
        total_loss += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        top = logits.argmax(1)
        prob = logits.float().softmax(1).gather(1, top[:, None])[:, 0]
        true, pred = labels.cpu().numpy(), top.cpu().numpy()
        trues.append(true)
        preds.append(pred)
        confs.append(prob.cpu().numpy())
        if confusion is not None:
            np.add.at(confusion, (true, pred), 1)
        np.add.at(total, true, 1)
        np.add.at(correct, true[true == pred], 1)
        n += labels.numel()
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    return EvalResult(total_loss / n, float(correct.sum() / n), confusion, correct, total,
                      labels=np.concatenate(trues), predictions=np.concatenate(preds),
                      confidence=np.concatenate(confs).astype(np.float32))


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_acc: float = float("nan")
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    train_time_s: float = 0.0
    images_seen: int = 0
    cancelled: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images_seen / self.train_time_s if self.train_time_s > 0 else 0.0


class _Head(nn.Module):
    """The classifier head of a timm ViT, applied to pre-logit features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.head_drop(features))


def _frozen_features(model: nn.Module) -> bool:
    """True when only the head trains and the backbone's forward is deterministic.

    Then the pre-logit features of every image are the same at every epoch, so they are
    computed once and the head is trained on them: the same result as running the frozen
    backbone each step, at a fraction of the cost.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    if any(p.requires_grad for p in model.parameters() if id(p) not in head):
        return False
    stochastic = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
    for m in model.modules():
        if m is getattr(model, "head_drop", None):
            continue
        if isinstance(m, stochastic) and m.p > 0:
            return False
        if type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0) > 0:
            return False
    return True


@torch.no_grad()
def _feature_loader(model: nn.Module, loader, *, device, amp, batch_size: int, shuffle: bool,
                    seed: int):
    model.eval()
    feats, labels = [], []
    for images, y in loader:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        feats.append(f.float())
        labels.append(y.to(device))
    ds = torch.utils.data.TensorDataset(torch.cat(feats), torch.cat(labels))
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def fit(model: nn.Module, method: PeftMethod, train_loader, val_loader, num_classes: int,
        cfg: TrainConfig, *, callbacks: Iterable[Callback] = (), device: torch.device | None = None
        ) -> FitResult:
    """Train the trainable parameters of ``model``; keep the weights best on validation.

    On return the model holds the best weights. A callback asking to stop ends training
    after the current step with ``result.cancelled`` set (the best weights so far are kept).
    A non-finite training or validation loss raises :class:`DivergedError` naming the epoch
    and step, before the optimiser step that would spread it into the weights.
    """
    callbacks = [*callbacks, *method.training_callbacks()]
    device = device or resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    opt = make_optimizer(params, cfg, lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    result = FitResult()
    for cb in callbacks:
        cb.on_start({"epochs": cfg.epochs, "steps": total, "lr": lr, "device": str(device)})
    trained = model
    if _frozen_features(model):  # linear probe: backbone features once, then the head only
        t0 = time.perf_counter()
        train_loader = _feature_loader(model, train_loader, device=device, amp=amp,
                                       batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_loader = _feature_loader(model, val_loader, device=device, amp=amp,
                                     batch_size=cfg.eval_batch_size, shuffle=False, seed=cfg.seed)
        result.train_time_s += time.perf_counter() - t0
        trained = _Head(model)

    step = 0
    for epoch in range(cfg.epochs):
        trained.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, total, warmup)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, logits = method.training_loss(trained, images, labels, criterion)
            value = loss.item()
            if not math.isfinite(value):  # stop before the step writes NaN into the weights
                raise DivergedError(f"training loss became {value} at epoch {epoch + 1}, step "
                                    f"{step + 1} of {total}; lower train.lr (it was {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += value * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            for cb in callbacks:
                cb.on_step(step, total, value)
            if any(cb.should_stop() for cb in callbacks):
                result.cancelled = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.train_time_s += time.perf_counter() - t0
        result.images_seen += seen
        if result.cancelled:
            break
        val = evaluate(trained, val_loader, num_classes, device=device, amp=amp)
        if not math.isfinite(val.loss):
            raise DivergedError(f"validation loss became {val.loss} after epoch {epoch + 1} "
                                f"(step {step}); lower train.lr (it was {lr:g})")
        row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"],
               "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val.loss, "val_acc": val.acc, "time_s": result.train_time_s}
        result.history.append(row)
        if not val.acc <= result.best_val_acc:  # first epoch, or strictly better
            result.best_val_acc, result.best_epoch = val.acc, epoch + 1
            # trainable parameters and PEFT modules' buffers (HST's BatchNorm statistics)
            result.best_state = {n: t.clone() for n, t in trainable_state(model).items()}
        for cb in callbacks:
            cb.on_epoch(row)
    if result.best_state:
        model.load_state_dict(result.best_state, strict=False)
    return result


def flops_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """Forward FLOPs for one image in eval mode, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image[:1])
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
