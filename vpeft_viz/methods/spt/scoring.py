"""SPT step 1: which weights are scored, and their sensitivity Σ g² on the task.

See :mod:`vpeft_viz.methods.spt` for the method as a whole; the gradient accumulation itself
is the shared probe :func:`vpeft_viz.probes.gradients.squared_gradients`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, Subset

from ...probes.gradients import squared_gradients
from .._layers import vit_blocks

MATRIX_OPS = ("q", "k", "v", "proj", "fc1", "fc2")
NORM_OPS = ("norm1", "norm2", "norm")  # the LayerNorm vectors' ops
HEAD_INIT = "trunc_normal(std=0.02) weight, zero bias"

Progress = Callable[[int, int], None]


# -- what is scored -------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One scored weight matrix or vector (q, k, v are row slices of timm's fused qkv)."""

    name: str  # e.g. "blocks.3.attn.q.weight", "blocks.3.norm1.bias", "norm.weight"
    module: str  # the module that owns the parameter, e.g. "blocks.3.attn.qkv"
    param: str  # "weight" or "bias"
    start: int  # first row of the slice inside the module's parameter
    shape: tuple[int, ...]  # (out, in) for a matrix, (dim,) for a vector
    block: int  # block index; -1 for the final norm
    op: str  # q k v proj fc1 fc2 norm1 norm2 norm (final) for the views

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def structured_cost(unit: Unit, kind: str, rank: int) -> int:
    """Parameters of the structured module on ``unit`` (a vector tuned whole: its size)."""
    if not unit.is_matrix:
        return unit.numel
    out_dim, in_dim = unit.shape
    if kind == "lora":
        return rank * (in_dim + out_dim)
    return 2 * out_dim * rank + rank + out_dim  # adapter on the output: down+bias, up+bias


def scored_units(model: nn.Module) -> list[Unit]:
    """The weights SPT scores, in a fixed order (blocks first, then the final norm)."""
    units: list[Unit] = []

    def vec(name: str, module: str, p: str, start: int, dim: int, block: int, op: str):
        units.append(Unit(name, module, p, start, (dim,), block, op))

    for i, block in enumerate(vit_blocks(model)):
        pre = f"blocks.{i}"
        linears = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1,
                   "fc2": block.mlp.fc2}
        for lname, lin in linears.items():
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"SPT expects nn.Linear at {pre} {lname}, got {type(lin)}")
        d = block.attn.qkv.in_features
        qkv_path = f"{pre}.attn.qkv"
        for j, op in enumerate("qkv"):
            units.append(Unit(f"{pre}.attn.{op}.weight", qkv_path, "weight", j * d, (d, d), i, op))
        for op, path in (("proj", f"{pre}.attn.proj"), ("fc1", f"{pre}.mlp.fc1"),
                         ("fc2", f"{pre}.mlp.fc2")):
            lin = linears[op]
            units.append(Unit(f"{path}.weight", path, "weight", 0,
                              (lin.out_features, lin.in_features), i, op))
        for norm in ("norm1", "norm2"):
            ln = getattr(block, norm)
            if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine:
                dim = ln.normalized_shape[0]
                vec(f"{pre}.{norm}.weight", f"{pre}.{norm}", "weight", 0, dim, i, norm)
                if ln.bias is not None:
                    vec(f"{pre}.{norm}.bias", f"{pre}.{norm}", "bias", 0, dim, i, norm)
        if block.attn.qkv.bias is not None:
            for j, op in enumerate("qkv"):
                vec(f"{pre}.attn.{op}.bias", qkv_path, "bias", j * d, d, i, op)
        for op, path in (("proj", f"{pre}.attn.proj"), ("fc1", f"{pre}.mlp.fc1"),
                         ("fc2", f"{pre}.mlp.fc2")):
            lin = linears[op]
            if lin.bias is not None:
                vec(f"{path}.bias", path, "bias", 0, lin.out_features, i, op)
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        vec("norm.weight", "norm", "weight", 0, norm.normalized_shape[0], -1, "norm")
        if norm.bias is not None:
            vec("norm.bias", "norm", "bias", 0, norm.normalized_shape[0], -1, "norm")
    return units


def cls_token_cost(model: nn.Module) -> int:
    """The CLS token is always tuned (and counted in the budget), when there is one."""
    cls = getattr(model, "cls_token", None)
    return int(cls.numel()) if cls is not None else 0


def _unit_tensor(unit: Unit, source: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slice of ``source[module.param]`` (a weight or its gradient) that ``unit`` covers."""
    full = source[f"{unit.module}.{unit.param}"]
    return full[unit.start:unit.start + unit.shape[0]]


# -- step 1: sensitivity --------------------------------------------------------------------
@dataclass
class SensitivityInfo:
    """How the sensitivity was measured (recorded in the run's method state)."""

    batches: int
    batch_size: int
    images: int
    seed: int
    order: str
    mean_loss: float
    image_names: list[str] = field(default_factory=list)
    head_init: str = HEAD_INIT
    drop_path: float = 0.0  # stochastic depth of the last block (0 at the first, linear)
    drop_path_per_block: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ordered_batches(loader: Iterable, batch_size: int, batches: int):
    """The first ``batches × batch_size`` training images in file order, and their names.

    A loader built on a dataset is re-batched in the dataset's own order (the training
    loader usually shuffles); any other iterable is read as it comes.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return loader, []
    n = min(len(dataset), batches * batch_size)
    ordered = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    samples = getattr(dataset, "samples", None)
    names = [Path(str(getattr(s, "path", s))).name for s in samples[:n]] if samples else []
    return ordered, names


def _num_classes(model: nn.Module, loader: Iterable, cached: list) -> int:
    n = int(getattr(model, "num_classes", 0) or 0)
    if n > 0:
        return n
    dataset = getattr(loader, "dataset", None)
    n = int(getattr(dataset, "num_classes", 0) or 0)
    if n > 0:
        return n
    labels = torch.cat([torch.as_tensor(y).reshape(-1) for _, y in cached])
    return int(labels.max().item()) + 1


def set_stochastic_depth(model: nn.Module, rate: float) -> list[float]:
    """Give every block timm's stochastic depth, rising linearly from 0 (first block) to
    ``rate`` (last), on both residual branches; returns the per-block rates.

    The release builds its scoring model with ``drop_path_rate=0.1`` and this rule; a copy
    made here matches a timm ViT built with the same ``drop_path_rate``.
    """
    blocks = vit_blocks(model)
    rates = [rate * i / max(len(blocks) - 1, 1) for i in range(len(blocks))]
    for block, r in zip(blocks, rates):
        for attr in ("drop_path1", "drop_path2"):
            if not hasattr(block, attr):
                raise TypeError(f"stochastic depth needs timm blocks with {attr}, got "
                                f"{type(block).__name__}")
            setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())
    return rates


def compute_sensitivity(model: nn.Module, loader: Iterable, *, batches: int = 16,
                        batch_size: int = 32, seed: int = 0, drop_path: float = 0.1,
                        device: torch.device | str = "cpu", progress: Progress | None = None,
                        ) -> tuple[dict[str, torch.Tensor], SensitivityInfo]:
    """Per-weight sensitivity ``Σ_batches g²`` of every scored unit (CPU float32 tensors).

    ``model`` is not modified. As in the release's scoring pass, a copy gets a fresh head
    (seeded; trunc-normal std 0.02 weight, zero bias), stochastic depth ``drop_path`` (see
    :func:`set_stochastic_depth`), goes to train mode — so drop-path is active — and is
    differentiated batch by batch (mean cross-entropy of each mini-batch).
    """
    device = torch.device(device)
    ordered, names = _ordered_batches(loader, batch_size, batches)
    work = copy.deepcopy(model).to(device)
    rates = set_stochastic_depth(work, drop_path)
    units = scored_units(work)
    cached: list = []
    if not int(getattr(work, "num_classes", 0) or 0):
        cached = [b for _, b in zip(range(batches), ordered)]
    num_classes = _num_classes(work, loader, cached)
    devices = [device.index or 0] if device.type == "cuda" else []
    total = min(batches, len(ordered)) if hasattr(ordered, "__len__") else batches
    with torch.random.fork_rng(devices=devices):
        # A DataLoader draws its base seed from the global RNG when iteration starts: start
        # it before seeding, so the head and the drop-path draws depend on ``seed`` alone.
        stream = iter(cached or ordered)
        torch.manual_seed(seed)
        work.reset_classifier(num_classes)
        head = work.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"SPT sensitivity needs a linear head, got {type(head).__name__}")
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        work.to(device)
        work.train()
        keys = sorted({f"{u.module}.{u.param}" for u in units})
        acc, stats = squared_gradients(work, stream, keys, max_batches=batches,
                                       device=device, progress=progress, total=total,
                                       what="SPT sensitivity")
    scores = {u.name: _unit_tensor(u, acc).detach().cpu().clone() for u in units}
    info = SensitivityInfo(batches=stats.batches, batch_size=batch_size, images=stats.images,
                           seed=seed, order="file order" if names or hasattr(loader, "dataset")
                           else "as the loader yields", mean_loss=stats.mean_loss,
                           image_names=names[:stats.images], drop_path=float(drop_path),
                           drop_path_per_block=[round(r, 6) for r in rates])
    return scores, info
