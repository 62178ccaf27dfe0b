"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (SPT-LoRA and SPT-Adapter).

He et al., ICCV 2023, https://arxiv.org/abs/2303.08566 (ziplab/SPT, ``engine.py``). Three steps:

1. **Sensitivity** (:func:`compute_sensitivity`). With a freshly initialised head and the
   model in train mode, accumulate the squared mini-batch gradient of every backbone weight,
   ``s += g²``, over the first ``batches × batch_size`` training images in file order (16 × 32
   in the official code). By a first-order Taylor expansion the loss drop of one gradient step
   on a weight grows with g², so s ranks weights by how much tuning them alone would help.
   The head, CLS token, patch and position embeddings are not scored. timm's fused ``qkv``
   is scored as three matrices q, k, v, as in the official code.
2. **Allocation** (:func:`allocate`). Pool every score and keep the entries above a global
   threshold. A weight matrix with at least ``cost/α`` sensitive entries (α = 10) gets a
   structured module on the whole matrix (LoRA rank r: ``r·(in+out)``; adapter:
   ``2·out·r + r + out``); a bias/LayerNorm vector with at least ``dim/β`` (β = 5) is tuned
   whole; everything else tunes only its sensitive entries as a sparse delta. The budget is
   unstructured + structured + the CLS token (its width); the head is not counted. The
   threshold is searched so the budget used lands within 2% of the target; when no threshold
   can (a structured module jumps over it) the error names the nearest reachable budgets.
3. **Tuning**. Sparse deltas are 1-D parameters holding only the chosen entries, scattered
   into the frozen weight in forward (indices are buffers), so gradients exist only there.
   SPT-LoRA adds ``B·A·dropout(x)`` beside a matrix (no scaling, as in the official code);
   SPT-Adapter adds ``up(GELU(down(dropout(y))))`` to the matrix output y, sequentially (the
   official code runs the ``proj`` adapter in parallel on its input instead; same cost).
   SPT-LoRA merges exactly (sparse deltas, whole vectors, LoRA and the CLS delta all fold
   into plain weights); SPT-Adapter does not (GELU).

Where the maths lives: the sensitivity and allocation cores are here, below ``analysis/``,
because ``prepare`` needs them; :mod:`vpeft_viz.analysis.sensitivity` imports them for the
views (re-allocation at another budget, per-depth and per-operation shares).

Stored for the views (``artifacts``): per-weight scores would take 1.2M floats on the
embedded backbone (85M on ViT-B), so a run keeps instead (a) a *count table*: for ~1,500
global thresholds (geometric in the number of selected weights, < 1% apart) how many
weights of every matrix/vector are above it — enough to re-run the allocation at any budget
without the scores — and (b) every matrix's sensitivity as an image of at most 192 × 192
cells (mean-pooled), log10-quantised to uint8. About 0.5 MB per run on the embedded
backbone (1.8 MB on ViT-B); each run stays self-contained (no file shared between runs).
"""

from __future__ import annotations

import base64
import copy
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from ..config import ConfigError, param
from ._base import MethodConfig, PeftMethod, PeftModule, replace_module
from ._layers import Bottleneck, vit_blocks
from ._registry import register_method

MATRIX_OPS = ("q", "k", "v", "proj", "fc1", "fc2")
BUDGET_TOLERANCE = 0.02  # relative distance to the target a reachable budget may have
GRID_POINTS = 1500  # thresholds in the stored count table
IMAGE_MAX_SIDE = 192  # matrix images are mean-pooled down to at most this many cells a side

Progress = Callable[[int, int], None]


class BudgetError(ConfigError):
    """The parameter budget cannot be met within the tolerance; names the nearest ones."""


@dataclass
class SPTConfig(MethodConfig):
    budget: int | None = param(
        None, "Trainable-parameter budget (head excluded; CLS token included). Empty: "
        "budget_fraction of the backbone's scored weights, snapped to the nearest reachable "
        "budget (≈0.43M on ViT-B/16, the paper's usual 0.4M). A number must be reachable "
        "within 2%, else the error names the nearest reachable one.",
        min=1, max=10**10)
    budget_fraction: float = param(
        0.005, "Budget as a fraction of the backbone's scored weights, used when budget is "
        "empty.", min=1e-6, max=1.0)
    alpha: float = param(
        10.0, "α: a matrix gets a structured module when its sensitive entries reach 1/α of "
        "the module's cost (larger α: structured modules sooner).", min=1e-3, max=1e6)
    beta: float = param(
        5.0, "β: a bias/LayerNorm vector is tuned whole when 1/β of its entries are "
        "sensitive.", min=1.0, max=1e6)
    rank: int = param(8, "Rank (LoRA) or bottleneck width (adapter) of structured modules.",
                      min=1, max=1024)
    dropout: float = param(0.1, "Dropout on the input of every structured module.",
                           min=0.0, max=0.9)
    sensitivity_batches: int = param(
        16, "Mini-batches whose squared gradients are summed (official: 16).", min=1,
        max=100_000)
    sensitivity_batch_size: int = param(
        32, "Images per sensitivity mini-batch (official: 32), taken in file order.",
        min=1, max=4096)
    seed: int = param(0, "Seed of the fresh classifier head (and dropout) used to score "
                      "sensitivity.", min=0, max=2**31 - 1)


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


def compute_sensitivity(model: nn.Module, loader: Iterable, *, batches: int = 16,
                        batch_size: int = 32, seed: int = 0,
                        device: torch.device | str = "cpu", progress: Progress | None = None,
                        ) -> tuple[dict[str, torch.Tensor], SensitivityInfo]:
    """Per-weight sensitivity ``Σ_batches g²`` of every scored unit (CPU float32 tensors).

    ``model`` is not modified: a copy gets a fresh head (seeded), goes to train mode and is
    differentiated batch by batch (mean cross-entropy of each mini-batch, as officially).
    """
    device = torch.device(device)
    ordered, names = _ordered_batches(loader, batch_size, batches)
    work = copy.deepcopy(model).to(device)
    units = scored_units(work)
    cached: list = []
    if not int(getattr(work, "num_classes", 0) or 0):
        cached = [b for _, b in zip(range(batches), ordered)]
    num_classes = _num_classes(work, loader, cached)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        work.reset_classifier(num_classes)
        work.to(device)
        work.requires_grad_(False)
        keys = sorted({f"{u.module}.{u.param}" for u in units})
        params = {k: work.get_parameter(k) for k in keys}
        for p in params.values():
            p.requires_grad_(True)
        acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        work.train()
        total = min(batches, len(ordered)) if hasattr(ordered, "__len__") else batches
        loss_sum, seen, images = 0.0, 0, 0
        for i, (x, y) in enumerate(cached or ordered):
            if i >= batches:
                break
            x, y = x.to(device), torch.as_tensor(y).to(device)
            loss = F.cross_entropy(work(x), y)
            if not torch.isfinite(loss):
                raise ValueError(f"SPT sensitivity: the loss of batch {i} is {loss.item()}; "
                                 "check the backbone weights and the input normalisation")
            grads = torch.autograd.grad(loss, list(params.values()))
            for k, g in zip(params, grads):
                acc[k].add_(g.detach().float().square())
            loss_sum += loss.item()
            seen += 1
            images += int(y.numel())
            if progress is not None:
                progress(seen, total)
    if seen == 0:
        raise ValueError("SPT sensitivity needs at least one training batch")
    scores = {u.name: _unit_tensor(u, acc).detach().cpu().clone() for u in units}
    info = SensitivityInfo(batches=seen, batch_size=batch_size, images=images, seed=seed,
                           order="file order" if names or hasattr(loader, "dataset")
                           else "as the loader yields", mean_loss=loss_sum / seen,
                           image_names=names[:images])
    return scores, info


# -- step 2: allocation ---------------------------------------------------------------------
def allocation_costs(counts: np.ndarray, numel: np.ndarray, cost: np.ndarray,
                     is_matrix: np.ndarray, alpha: float, beta: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Parameters spent per unit, and whether it goes structured, given its sensitive count.

    ``counts`` is (units,) or (units, thresholds); the other arrays are per unit. A matrix
    goes structured at ``count ≥ cost/α`` (then it costs ``cost``), a vector at
    ``count ≥ dim/β`` (then it costs ``dim``); otherwise a unit costs its count.
    """
    counts = np.asarray(counts)
    extra = (slice(None),) + (None,) * (counts.ndim - 1)
    numel, cost, is_matrix = (np.asarray(a)[extra] for a in (numel, cost, is_matrix))
    whole = np.where(is_matrix, cost, numel)
    bar = np.where(is_matrix, cost / alpha, numel / beta)
    structured = (counts > 0) & (counts >= bar)
    return np.where(structured, whole, counts), structured


@dataclass
class Allocation:
    """Which units are structured, which entries are sparse-tuned, and what it costs."""

    target: int
    threshold: float
    cls_token: int
    counts: dict[str, int]  # sensitive entries per unit
    structured: dict[str, bool]
    costs: dict[str, int]  # parameters spent per unit
    indices: dict[str, np.ndarray]  # sparse units: flat indices inside the unit
    reachable: bool = True

    @property
    def used(self) -> int:
        return self.cls_token + sum(self.costs.values())

    def breakdown(self, units: list[Unit]) -> dict[str, int]:
        out = {"unstructured": 0, "structured_matrices": 0, "structured_vectors": 0,
               "cls_token": self.cls_token}
        for u in units:
            if self.structured[u.name]:
                out["structured_matrices" if u.is_matrix else "structured_vectors"] += \
                    self.costs[u.name]
            else:
                out["unstructured"] += self.costs[u.name]
        return out


def _float_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _bits_float(b: int) -> float:
    return float(np.array(b, dtype=np.int32).view(np.float32))


class SortedScores:
    """Every unit's scores sorted (ascending): how many lie above any threshold, by bisection.

    Sorting once (N log N) makes each allocation trial a binary search per unit, so the
    threshold search and the stored count table cost almost nothing afterwards.
    """

    def __init__(self, units: list[Unit], scores: dict[str, torch.Tensor]):
        self.units = units
        self.raw = [scores[u.name].reshape(-1).numpy().astype(np.float32, copy=False)
                    for u in units]
        self.sorted = [np.sort(a) for a in self.raw]

    def counts(self, threshold: float | np.ndarray) -> np.ndarray:
        """Entries ``≥ threshold`` per unit: (units,) for a scalar, (units, J) for J values."""
        t = np.asarray(threshold, dtype=np.float32)
        return np.stack([s.size - np.searchsorted(s, t, side="left") for s in self.sorted])

    def positive_range(self) -> tuple[float, float]:
        pos = [s[np.searchsorted(s, 0.0, side="right"):] for s in self.sorted]
        pos = [p for p in pos if p.size]
        if not pos:
            raise ValueError("every sensitivity score is zero: no gradient reached the backbone")
        return min(float(p[0]) for p in pos), max(float(p[-1]) for p in pos)

    def next_below(self, t: float) -> float | None:
        """The largest positive score strictly below ``t`` (None when there is none)."""
        best = None
        for s in self.sorted:
            i = np.searchsorted(s, np.float32(t), side="left") - 1
            if i >= 0 and s[i] > 0 and (best is None or s[i] > best):
                best = float(s[i])
        return best

    def kth_largest(self, ks: np.ndarray) -> np.ndarray:
        """The k-th largest positive score over all units, for every k in ``ks`` at once.

        A vectorised bisection over float32 bit patterns (no global sort of the scores).
        """
        bottom, top = self.positive_range()
        ks = np.asarray(ks, dtype=np.int64)
        lo = np.full(ks.shape, _float_bits(bottom), np.int64)
        hi = np.full(ks.shape, _float_bits(top), np.int64)
        while (lo < hi).any():
            mid = (lo + hi + 1) // 2
            enough = self.counts(mid.astype(np.int32).view(np.float32)).sum(0) >= ks
            lo, hi = np.where(enough, mid, lo), np.where(enough, hi, mid - 1)
        return lo.astype(np.int32).view(np.float32)

    def num_positive(self) -> int:
        return int(sum(s.size - np.searchsorted(s, 0.0, side="right") for s in self.sorted))


def allocate(units: list[Unit], scores: dict[str, torch.Tensor], *, budget: int,
             alpha: float, beta: float, kind: str, rank: int, cls_token: int,
             strict: bool = True, tolerance: float = BUDGET_TOLERANCE,
             table: SortedScores | None = None) -> Allocation:
    """Global-threshold allocation whose budget is nearest ``budget`` (see module docstring).

    The total is monotone in the threshold (a unit's cost never falls as its count grows),
    so the smallest threshold whose total fits the budget is bisected over the float32 bit
    patterns of the scores (exact); the next lower score gives the smallest total above it.
    Without ties or a structured module switching on in between, the budget is met exactly.
    ``strict``: a result further than ``tolerance`` from the target raises
    :class:`BudgetError` naming the nearest reachable budgets.
    """
    table = table or SortedScores(units, scores)
    numel = np.array([u.numel for u in units])
    cost = np.array([structured_cost(u, kind, rank) for u in units])
    is_matrix = np.array([u.is_matrix for u in units])

    def total_at(t: float) -> int:
        c, _ = allocation_costs(table.counts(t), numel, cost, is_matrix, alpha, beta)
        return cls_token + int(c.sum())

    bottom, top = table.positive_range()
    # smallest threshold with total <= budget; hi = just above every score selects nothing
    lo, hi = _float_bits(bottom), _float_bits(top) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if total_at(_bits_float(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    t_under = _bits_float(hi)
    choices = [(total_at(t_under), t_under)]
    t_over = table.next_below(t_under)
    if t_over is not None:
        choices.append((total_at(t_over), t_over))
    used, threshold = min(choices, key=lambda c: (abs(c[0] - budget), c[0]))
    reachable = abs(used - budget) <= tolerance * budget
    if strict and not reachable:
        near = sorted({c[0] for c in choices}, key=lambda v: abs(v - budget))
        others = f" (the other side: {near[1]:,})" if len(near) > 1 else ""
        raise BudgetError(
            f"SPT budget {budget:,} is not reachable within {tolerance:.0%}: the nearest "
            f"reachable budget is {near[0]:,}{others}, because a structured module "
            f"(α={alpha:g}, β={beta:g}, rank {rank}) switches on in between; set "
            f"budget={near[0]} or change alpha/rank")
    counts = table.counts(threshold)
    unit_cost, structured = allocation_costs(counts, numel, cost, is_matrix, alpha, beta)
    indices = {u.name: np.flatnonzero(raw >= np.float32(threshold)).astype(np.int64)
               for u, raw, st in zip(units, table.raw, structured) if not st}
    return Allocation(
        target=int(budget), threshold=float(threshold), cls_token=cls_token,
        counts={u.name: int(c) for u, c in zip(units, counts)},
        structured={u.name: bool(st) for u, st in zip(units, structured)},
        costs={u.name: int(c) for u, c in zip(units, unit_cost)},
        indices=indices, reachable=bool(reachable))


# -- compact JSON for index lists -----------------------------------------------------------
def encode_indices(idx: np.ndarray) -> str:
    """Sorted non-negative indices → base64(zlib(uint32 gaps)): a few bits per index."""
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    gaps = np.diff(idx, prepend=0).astype("<u4")
    return base64.b64encode(zlib.compress(gaps.tobytes(), 9)).decode("ascii")


def decode_indices(text: str) -> np.ndarray:
    gaps = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u4")
    return np.cumsum(gaps.astype(np.int64))


# -- step 3: the modules --------------------------------------------------------------------
def _add_at(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` with ``values`` added at flat ``indices`` (out of place: base stays frozen)."""
    return base.reshape(-1).index_add(0, indices, values.to(base.dtype)).view_as(base)


class _SparseDeltas(PeftModule):
    """Trainable values at fixed flat indices of the wrapped module's weight and bias.

    Indices are buffers of this module (saved with the trained weights); a values parameter
    exists only where there are indices, so every trainable tensor receives a gradient.
    """

    def _init_deltas(self, weight_idx: torch.Tensor, bias_idx: torch.Tensor) -> None:
        for what, idx in (("weight", weight_idx), ("bias", bias_idx)):
            self.register_buffer(f"{what}_idx", idx.long())
            values = nn.Parameter(torch.zeros(idx.numel())) if idx.numel() else None
            self.register_parameter(f"{what}_delta", values)

    def effective_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w if self.weight_delta is None else _add_at(w, self.weight_idx, self.weight_delta)

    def effective_bias(self) -> torch.Tensor | None:
        b = self.base_layer.bias
        return b if self.bias_delta is None else _add_at(b, self.bias_idx, self.bias_delta)


class SPTLinear(_SparseDeltas):
    """A frozen ``nn.Linear`` with SPT's sparse deltas and structured modules.

    ``slices`` are ``(name, start, stop)`` output-row ranges that get a structured module
    (three for timm's fused qkv). Sparse deltas sit at flat ``weight_idx``/``bias_idx``
    (a bias vector tuned whole simply lists all its indices).
    """

    def __init__(self, base: nn.Linear, *, kind: str, rank: int, dropout: float,
                 slices: list[tuple[str, int, int]], weight_idx: torch.Tensor,
                 bias_idx: torch.Tensor):
        super().__init__()
        self.base_layer = base
        self.kind = kind
        self.slices = [(n, int(a), int(b)) for n, a, b in slices]
        self._init_deltas(weight_idx, bias_idx)
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters = nn.ModuleDict()
        for name, a, b in self.slices:
            if kind == "lora":
                w_a = nn.Parameter(torch.empty(rank, base.in_features))
                nn.init.kaiming_uniform_(w_a, a=math.sqrt(5))
                self.lora_A[name] = w_a
                self.lora_B[name] = nn.Parameter(torch.zeros(b - a, rank))
            else:
                self.adapters[name] = Bottleneck(b - a, rank, bias=True, act="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.effective_weight(), self.effective_bias())
        if not self.slices:
            return out
        h = self.dropout(x) if self.kind == "lora" else None
        parts, pos = [], 0
        for name, a, b in self.slices:
            if a > pos:
                parts.append(out[..., pos:a])
            o = out[..., a:b]
            if self.kind == "lora":
                o = o + (h @ self.lora_A[name].T.to(h.dtype)) @ self.lora_B[name].T.to(h.dtype)
            else:
                o = o + self.adapters[name](self.dropout(o))
            parts.append(o)
            pos = b
        if pos < out.shape[-1]:
            parts.append(out[..., pos:])
        return torch.cat(parts, dim=-1)

    def merged(self) -> nn.Linear:
        """A plain linear holding every delta (SPT-LoRA only; the base is left untouched)."""
        if self.kind != "lora":
            raise TypeError("only SPT-LoRA merges; adapters keep a GELU")
        base = self.base_layer
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        lin = lin.to(base.weight.device, base.weight.dtype)
        with torch.no_grad():
            w = self.effective_weight().clone()
            for name, a, b in self.slices:
                w[a:b] += self.lora_B[name] @ self.lora_A[name]
            bias = self.effective_bias()
            if not torch.isfinite(w).all() or (bias is not None and not torch.isfinite(bias).all()):
                raise ValueError("SPT merge produced non-finite weights")
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin


class SPTLayerNorm(_SparseDeltas):
    """A frozen ``nn.LayerNorm`` whose affine gets sparse (or whole-vector) deltas."""

    def __init__(self, base: nn.LayerNorm, *, weight_idx: torch.Tensor, bias_idx: torch.Tensor):
        super().__init__()
        self.base_layer = base
        self._init_deltas(weight_idx, bias_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.effective_weight(), self.effective_bias()
        base = self.base_layer
        return F.layer_norm(x, base.normalized_shape, w, b, base.eps)

    def merged(self) -> nn.LayerNorm:
        base = self.base_layer
        ln = copy.deepcopy(base)  # keeps the backbone's own class (timm's LayerNorm)
        with torch.no_grad():
            w, b = self.effective_weight(), self.effective_bias()
            if not torch.isfinite(w).all():
                raise ValueError("SPT merge produced non-finite weights")
            ln.weight.copy_(w)
            if b is not None:
                ln.bias.copy_(b)
        return ln


class ClsTokenDelta(PeftModule):
    """Tunes the CLS token: adds a delta to token 0 right before ``norm_pre`` (which it wraps).

    At that point the sequence is ``[cls + pos₀, patches + pos]`` (timm's ``_pos_embed``),
    so the delta is exactly a delta on ``model.cls_token`` (with no position dropout, i.e. in
    eval mode or at timm's default rate 0) and merges into it.
    """

    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base_layer = base
        self.delta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :1] + self.delta.to(x.dtype), x[:, 1:]], dim=1)
        return self.base_layer(x)


# -- the methods ----------------------------------------------------------------------------
class _SPT(PeftMethod):
    """Shared life cycle of SPT-LoRA and SPT-Adapter (``kind`` picks the structured module)."""

    Config = SPTConfig
    kind: ClassVar[str] = "lora"
    needs_data = True
    paper = "https://arxiv.org/abs/2303.08566"

    def __init__(self, config: SPTConfig | None = None):
        super().__init__(config)
        self._state: dict[str, Any] | None = None
        self._summary: dict[str, np.ndarray] = {}

    # -- data-dependent selection ------------------------------------------------------
    def resolve_budget(self, units: list[Unit]) -> tuple[int, bool]:
        """(target budget, whether the user gave it: then it must be reachable)."""
        c = self.config
        if c.budget is not None:
            return int(c.budget), True
        return max(1, round(c.budget_fraction * sum(u.numel for u in units))), False

    def prepare(self, model: nn.Module, loader, *, device: torch.device, progress=None) -> None:
        c = self.config
        units = scored_units(model)
        budget, strict = self.resolve_budget(units)
        scores, info = compute_sensitivity(model, loader, batches=c.sensitivity_batches,
                                           batch_size=c.sensitivity_batch_size, seed=c.seed,
                                           device=device, progress=progress)
        table = SortedScores(units, scores)
        alloc = allocate(units, scores, budget=budget, alpha=c.alpha, beta=c.beta,
                         kind=self.kind, rank=c.rank, cls_token=cls_token_cost(model),
                         strict=strict, table=table)
        self._state = allocation_state(alloc, units, info, auto=not strict)
        self._summary = sensitivity_summary(table, self.kind, c.rank)
        self._summary.update(allocation_arrays(alloc, units, c.alpha, c.beta))

    def state(self) -> dict[str, Any]:
        return dict(self._state or {})

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("structured_type", self.kind) != self.kind:
            raise ValueError(f"state is for spt-{state['structured_type']}, not {self.name}")
        self._state = dict(state)

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        return dict(self._summary)

    # -- modules -----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if not self._state:
            raise RuntimeError(f"{self.name} needs prepare() (or load_state()) before attach")
        c, alloc = self.config, self._state["units"]
        units = scored_units(model)
        known = {u.name for u in units}
        unknown = sorted(set(alloc) - known)
        if unknown:
            raise ValueError(f"{self.name} state names weights this model lacks: {unknown[:4]}")
        by_module: dict[str, list[Unit]] = {}
        for u in units:
            by_module.setdefault(u.module, []).append(u)
        for path, members in by_module.items():
            base = model.get_submodule(path)
            slices, w_idx, b_idx = [], [], []
            for u in members:
                entry = alloc.get(u.name)
                if entry is None:
                    continue
                stride = u.shape[1] if u.is_matrix else 1
                offset = u.start * stride
                if entry["structured"] and u.is_matrix:
                    slices.append((u.op, u.start, u.start + u.shape[0]))
                    continue
                idx = (np.arange(u.numel) if entry["structured"]
                       else decode_indices(entry["indices"]))
                (w_idx if u.param == "weight" else b_idx).append(idx + offset)
            if not (slices or w_idx or b_idx):
                continue
            w = torch.from_numpy(np.sort(np.concatenate(w_idx))) if w_idx else torch.zeros(0)
            b = torch.from_numpy(np.sort(np.concatenate(b_idx))) if b_idx else torch.zeros(0)
            device = base.weight.device
            if isinstance(base, nn.Linear):
                new = SPTLinear(base, kind=self.kind, rank=c.rank, dropout=c.dropout,
                                slices=sorted(slices, key=lambda s: s[1]),
                                weight_idx=w.long(), bias_idx=b.long())
            else:
                new = SPTLayerNorm(base, weight_idx=w.long(), bias_idx=b.long())
            replace_module(model, path, new.to(device))
        if getattr(model, "cls_token", None) is not None:
            model.norm_pre = ClsTokenDelta(model.norm_pre, model.cls_token.shape[-1]).to(
                model.cls_token.device)

    def spt_modules(self, model: nn.Module) -> Iterator[tuple[str, PeftModule]]:
        for name, m in model.named_modules():
            if isinstance(m, SPTLinear | SPTLayerNorm | ClsTokenDelta):
                yield name, m


def allocation_state(alloc: Allocation, units: list[Unit], info: SensitivityInfo | None,
                     *, auto: bool) -> dict[str, Any]:
    """JSON that rebuilds the modules exactly: per tuned unit, structured or its indices."""
    state_units = {}
    for u in units:
        if alloc.structured[u.name]:
            state_units[u.name] = {"structured": True, "count": alloc.counts[u.name]}
        elif alloc.counts[u.name]:
            state_units[u.name] = {"structured": False, "count": alloc.counts[u.name],
                                   "indices": encode_indices(alloc.indices[u.name])}
    return {
        "version": 1,
        "units": state_units,
        "threshold": alloc.threshold,
        "budget": {"target": alloc.target, "used": alloc.used, "reachable": alloc.reachable,
                   "auto": auto, **alloc.breakdown(units)},
        "sensitivity": info.to_dict() if info is not None else None,
    }


def sensitivity_summary(table: SortedScores, kind: str, rank: int, *,
                        points: int = GRID_POINTS, image_side: int = IMAGE_MAX_SIDE
                        ) -> dict[str, np.ndarray]:
    """The compact record of the scores the views need (see the module docstring)."""
    units, arrays = table.units, table.raw
    n = table.num_positive()
    ks = np.unique(np.round(np.geomspace(1, n, points)).astype(np.int64))
    thresholds = table.kth_largest(ks)  # descending in k
    counts = table.counts(thresholds).astype(np.int32)
    out: dict[str, np.ndarray] = {
        "units/name": np.array([u.name for u in units]),
        "units/block": np.array([u.block for u in units], dtype=np.int16),
        "units/op": np.array([u.op for u in units]),
        "units/is_matrix": np.array([u.is_matrix for u in units]),
        "units/numel": np.array([u.numel for u in units], dtype=np.int64),
        "units/rows": np.array([u.shape[0] for u in units], dtype=np.int64),
        "units/cols": np.array([u.shape[1] if u.is_matrix else 1 for u in units], np.int64),
        "units/structured_cost": np.array([structured_cost(u, kind, rank) for u in units],
                                          dtype=np.int64),
        "units/score_sum": np.array([float(a.astype(np.float64).sum()) for a in arrays]),
        "grid/k": ks,
        "grid/threshold": thresholds.astype(np.float32),
        "grid/counts": counts,
    }
    images = {u.name: _pool(a.reshape(u.shape), image_side)
              for u, a in zip(units, arrays) if u.is_matrix}
    logs = [np.log10(im[im > 0]) for im in images.values() if (im > 0).any()]
    hi = max((float(v.max()) for v in logs), default=0.0)
    lo = min((float(v.min()) for v in logs), default=hi - 1.0)
    lo = max(lo, hi - 12.0)
    if hi - lo < 1e-6:
        lo = hi - 1.0
    out["image/log10_range"] = np.array([lo, hi], dtype=np.float32)
    for name, im in images.items():
        with np.errstate(divide="ignore"):
            z = (np.log10(im) - lo) / (hi - lo)
        code = np.where(im > 0, 1 + np.round(254 * np.clip(z, 0, 1)), 0)
        out[f"image/{name}"] = code.astype(np.uint8)
    return out


def _pool_factor(n: int, side: int) -> int:
    """The smallest pooling factor that brings ``n`` to at most ``side`` cells, preferring
    one that divides ``n`` (so every cell averages the same number of weights)."""
    need = math.ceil(n / side)
    for f in range(need, 2 * need + 1):
        if n % f == 0:
            return f
    return need


def _pool(a: np.ndarray, side: int) -> np.ndarray:
    """Mean-pool a 2-D array so that neither side exceeds ``side`` (ragged edges averaged)."""
    rows, cols = a.shape
    fr, fc = _pool_factor(rows, side), _pool_factor(cols, side)
    if rows % fr == 0 and cols % fc == 0:
        return a.reshape(rows // fr, fr, cols // fc, fc).mean(axis=(1, 3), dtype=np.float64)
    pr, pc = math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc
    padded = np.full((pr, pc), np.nan)
    padded[:rows, :cols] = a
    return np.nanmean(padded.reshape(pr // fr, fr, pc // fc, fc), axis=(1, 3))


def allocation_arrays(alloc: Allocation, units: list[Unit], alpha: float,
                      beta: float) -> dict[str, np.ndarray]:
    """The run's own allocation, per unit, for the views (the exact one, not the grid's)."""
    return {
        "allocation/count": np.array([alloc.counts[u.name] for u in units], dtype=np.int64),
        "allocation/structured": np.array([alloc.structured[u.name] for u in units]),
        "allocation/cost": np.array([alloc.costs[u.name] for u in units], dtype=np.int64),
        "allocation/threshold": np.array(alloc.threshold, dtype=np.float32),
        "allocation/budget": np.array([alloc.target, alloc.used], dtype=np.int64),
        "allocation/cls_token": np.array(alloc.cls_token, dtype=np.int64),
        "allocation/alpha_beta": np.array([alpha, beta], dtype=np.float64),
    }


@dataclass
class SPTLoRAConfig(SPTConfig):
    """SPT with LoRA (rank ``rank``, in parallel with the matrix) as the structured module."""


@dataclass
class SPTAdapterConfig(SPTConfig):
    """SPT with a bottleneck adapter (width ``rank``, after the matrix) as structured module."""


@register_method("spt-lora")
class SPTLoRA(_SPT):
    Config = SPTLoRAConfig
    kind = "lora"
    title = "SPT-LoRA"
    summary = ("Score every weight by its squared gradient on the task, then tune the most "
               "sensitive ones: LoRA on matrices with many of them, single entries elsewhere.")
    mergeable = True

    def merge(self, model: nn.Module) -> nn.Module:
        for name, m in list(self.spt_modules(model)):
            if isinstance(m, ClsTokenDelta):
                with torch.no_grad():
                    model.cls_token.add_(m.delta)
                replace_module(model, name, m.base_layer)
            else:
                replace_module(model, name, m.merged())
        return model


@register_method("spt-adapter")
class SPTAdapter(_SPT):
    Config = SPTAdapterConfig
    kind = "adapter"
    title = "SPT-Adapter"
    summary = ("Score every weight by its squared gradient on the task, then tune the most "
               "sensitive ones: an adapter after matrices with many of them, single entries "
               "elsewhere.")
