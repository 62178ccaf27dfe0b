"""SPT-LoRA and SPT-Adapter: the registered methods (config, life cycle, merge).

See :mod:`vpeft_viz.methods.spt` for the method as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...config import param
from .._base import MethodConfig, PeftMethod, PeftModule, replace_module
from .._registry import register_method
from .allocation import SortedScores, allocate, decode_indices
from .modules import ClsTokenDelta, SPTLayerNorm, SPTLinear
from .records import (
    STATE_VERSION,
    allocation_arrays,
    allocation_state,
    sensitivity_summary,
)
from .scoring import Unit, cls_token_cost, compute_sensitivity, scored_units


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
    dropout: float = param(
        0.1, "Dropout on the input of every structured module except proj's (the release "
        "feeds proj's module the un-dropped input).", min=0.0, max=0.9)
    drop_path: float = param(
        0.1, "DropPath (per-sample stochastic depth, training only) on every structured "
        "module's output; the release uses 0.1.", min=0.0, max=0.9)
    sparse_layernorm: bool = param(
        False, "Also train the sparse LayerNorm entries the budget counts. Off: as in the "
        "release, sparse deltas live only in linear layers, so sensitive LayerNorm entries "
        "below the dim/β bar are counted in the budget but stay frozen (a LayerNorm vector "
        "tuned whole is trained either way).")
    sensitivity_batches: int = param(
        16, "Mini-batches whose squared gradients are summed (official: 16).", min=1,
        max=100_000)
    sensitivity_batch_size: int = param(
        32, "Images per sensitivity mini-batch (official: 32), taken in file order.",
        min=1, max=4096)
    sensitivity_drop_path: float = param(
        0.1, "Stochastic depth of the scoring copy (rate rising linearly from 0 at the first "
        "block to this at the last, timm's rule; active: the copy is in train mode). The "
        "release scores with 0.1.", min=0.0, max=0.9)
    seed: int = param(0, "Seed of the fresh classifier head (trunc-normal std 0.02, zero "
                      "bias, as in the release) and of the drop-path draws used to score "
                      "sensitivity.", min=0, max=2**31 - 1)

class _SPT(PeftMethod):
    """Shared life cycle of SPT-LoRA and SPT-Adapter (``kind`` picks the structured module)."""

    Config = SPTConfig
    kind: ClassVar[str] = "lora"
    needs_data = True
    paper = "https://arxiv.org/abs/2303.08566"

    def __init__(self, config: SPTConfig | None = None):
        super().__init__(config)
        self._state: dict[str, Any] | None = None
        self._legacy = False  # a version-1 state: see load_state
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
                                           drop_path=c.sensitivity_drop_path,
                                           device=device, progress=progress)
        table = SortedScores(units, scores)
        alloc = allocate(units, scores, budget=budget, alpha=c.alpha, beta=c.beta,
                         kind=self.kind, rank=c.rank, cls_token=cls_token_cost(model),
                         strict=strict, table=table)
        self._state = allocation_state(alloc, units, info, auto=not strict,
                                       train_sparse_layernorm=c.sparse_layernorm)
        self._legacy = False
        self._summary = sensitivity_summary(table, self.kind, c.rank)
        self._summary.update(allocation_arrays(alloc, units, c.alpha, c.beta))

    def state(self) -> dict[str, Any]:
        return dict(self._state or {})

    def load_state(self, state: dict[str, Any]) -> None:
        """Adopt a stored selection. A version-1 state (written before the modules followed
        the released code) rebuilds the modules it was trained with: sparse LayerNorm deltas,
        and proj's adapter after proj, so its saved weights load and run as trained."""
        if state.get("structured_type", self.kind) != self.kind:
            raise ValueError(f"state is for spt-{state['structured_type']}, not {self.name}")
        self._state = dict(state)
        self._legacy = int(state.get("version", STATE_VERSION)) < STATE_VERSION

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
            if not isinstance(base, nn.Linear | nn.LayerNorm):
                raise TypeError(f"{self.name} expects a Linear or LayerNorm at {path}, "
                                f"got {type(base).__name__}")
            linear = isinstance(base, nn.Linear)
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
                if not (linear or entry["structured"] or c.sparse_layernorm or self._legacy):
                    continue  # counted in the budget, frozen (the release's behaviour)
                idx = (np.arange(u.numel) if entry["structured"]
                       else decode_indices(entry["indices"]))
                (w_idx if u.param == "weight" else b_idx).append(idx + offset)
            if not (slices or w_idx or b_idx):
                continue
            w = torch.from_numpy(np.sort(np.concatenate(w_idx))) if w_idx else torch.zeros(0)
            b = torch.from_numpy(np.sort(np.concatenate(b_idx))) if b_idx else torch.zeros(0)
            device = base.weight.device
            if linear:
                # The release feeds proj's module (LoRA, or an adapter on proj's input) the
                # un-dropped input; sequential-output keeps the earlier placement, dropout too.
                is_proj = members[0].op == "proj"
                on_input = is_proj and self.adapter_on_proj_input() and not self._legacy
                undropped = is_proj and (self.kind == "lora" or on_input)
                new = SPTLinear(base, kind=self.kind, rank=c.rank,
                                dropout=0.0 if undropped else c.dropout, drop_path=c.drop_path,
                                adapter_on_input=on_input,
                                slices=sorted(slices, key=lambda s: s[1]),
                                weight_idx=w.long(), bias_idx=b.long())
            else:
                new = SPTLayerNorm(base, weight_idx=w.long(), bias_idx=b.long())
            replace_module(model, path, new.to(device))
        if getattr(model, "cls_token", None) is not None:
            model.norm_pre = ClsTokenDelta(model.norm_pre, model.cls_token.shape[-1]).to(
                model.cls_token.device)

    def adapter_on_proj_input(self) -> bool:
        """Whether proj's adapter runs in parallel on proj's input (SPT-Adapter only)."""
        return False

    def spt_modules(self, model: nn.Module) -> Iterator[tuple[str, PeftModule]]:
        for name, m in model.named_modules():
            if isinstance(m, SPTLinear | SPTLayerNorm | ClsTokenDelta):
                yield name, m


@dataclass
class SPTLoRAConfig(SPTConfig):
    """SPT with LoRA (rank ``rank``, in parallel with the matrix) as the structured module."""


@dataclass
class SPTAdapterConfig(SPTConfig):
    """SPT with a bottleneck adapter (width ``rank``) as structured module: after the matrix,
    except proj's, which by default runs in parallel on proj's input (the release)."""

    proj_adapter: str = param(
        "parallel-input", "Where proj's adapter sits: parallel-input (the release: "
        "proj(x) + adapter(x), fed proj's un-dropped input) or sequential-output (the "
        "earlier placement: after proj, with input dropout, like every other matrix's).",
        choices=("parallel-input", "sequential-output"))


@register_method("spt-lora")
class SPTLoRA(_SPT):
    Config = SPTLoRAConfig
    kind = "lora"
    title = "SPT-LoRA"
    view_page = "4_SPT.py"
    cached_seeds = (0,)
    vit_b_uncounted = "the count is a budget reached from data-dependent sensitivities"
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
    view_page = "4_SPT.py"
    cached_seeds = (0,)
    vit_b_uncounted = "the count is a budget reached from data-dependent sensitivities"
    summary = ("Score every weight by its squared gradient on the task, then tune the most "
               "sensitive ones: an adapter on matrices with many of them, single entries "
               "elsewhere.")

    def adapter_on_proj_input(self) -> bool:
        return self.config.proj_adapter == "parallel-input"
