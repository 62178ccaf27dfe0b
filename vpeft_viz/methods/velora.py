"""VeLoRA: LoRA whose down-projections keep one number per sub-token for their weight gradient.

Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections",
NeurIPS 2024, https://arxiv.org/abs/2405.17991 (roymiles/VeLoRA). docs/methods.md ("VeLoRA")
has the formulas, the deviations table and what was taken from the release's LLaMA path
(its ViT path does not run as published).

* **Forward** exactly LoRA's (:class:`~vpeft_viz.methods.lora.LoRAQKV`, q and v of the fused
  ``qkv``, same rank, alpha and init): ``q = W_q x + (alpha/r) B_q A_q h`` with
  ``h = dropout(x)``, v likewise.
* **What is kept for backward.** LoRA's down-projection ``a_t = h A_t^T`` keeps ``h``
  (batch × tokens × D) for ``∂L/∂A_t = Σ_n g_n h_nᵀ``. VeLoRA splits every token of ``h`` into
  G sub-tokens ``s`` of size D/G and keeps only ``z = ⟨s, v⟩`` (fp16, as the release), one
  number per sub-token, where ``v`` is one fixed unit vector per layer (shared by the q and
  v down-projections, which read the same ``h``). Both targets' projections run in one
  :class:`SubTokenProjection`, so ``z`` is kept once, as LoRA keeps ``h`` once.
* **Backward.** The input gradient is exact (``Σ_t g_t A_t`` needs only the weights); the
  weight gradient uses ``ĥ = z·v`` instead of ``h``, times ``velora_scale``:
  ``∂L/∂A_t ≈ velora_scale · Σ_n g_n ĥ_nᵀ``. It is computed without materialising ``ĥ``:
  ``(Σ_n g_n z_nᵀ) ⊗ v``, the same numbers (tested against the explicit ``ĥ``).
* **v** (``velora_v``, a buffer of the :class:`VeLoRAQKV`): the normalised mean of all
  sub-tokens of the first training batch, taken lazily in the first training forward and
  then frozen (the release's ``batch_average_once``). It is saved with the run's weights
  (``methods.trainable_state`` keeps PEFT buffers), so a reloaded run has the same ``v``.
* With G = D (sub-tokens of size 1) ``v = ±1`` and ``ĥ`` is ``h`` rounded to fp16: the weight
  gradient is LoRA's up to that rounding (exactly LoRA's on fp16-representable inputs).
* Eval mode, and training forwards without gradients, run plain LoRA: VeLoRA only changes
  what training keeps. Count and merge are LoRA's (``v`` is a buffer, not trained).

What a run records (:meth:`VeLoRA.artifacts`, ``artifacts/method.npz``): at the first
training step, the bytes autograd keeps for backward with VeLoRA and, on the same model and
batch, with plain LoRA (:mod:`vpeft_viz.probes.memory`), and on CUDA the allocator peak of
each step; at a few points over training (:data:`PROBE_POINTS` × :data:`PROBE_BATCHES`
training steps, scheduled by an engine callback) the cosine similarity per layer and target
between the compressed and the exact weight gradient of that very step, their norm ratio
and the share of the sub-tokens' energy ``v`` captures. :mod:`vpeft_viz.analysis.velora`
reads them for the view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import param
from ..probes.memory import measure_training_step
from ._layers import vit_blocks
from ._registry import register_method
from .lora import LoRA, LoRAConfig, LoRAQKV

Z_DTYPE = torch.float16  # what z is kept in (the release's fp16)
PROBE_POINTS = 5  # points over training where gradients are compared (start … end)
PROBE_BATCHES = 3  # consecutive training steps measured at each point


@dataclass
class VeLoRAConfig(LoRAConfig):
    groups: int = param(32, "G: sub-tokens per token. Each token of the down-projections' "
                        "input is cut into G pieces of width/G and each piece is kept as one "
                        "fp16 number for the weight gradient; must divide the backbone width. "
                        "Larger G keeps more (G = width: exact up to fp16).", min=1, max=8192)
    velora_scale: float = param(1.0, "Factor on the reconstructed weight gradient of the "
                                "down-projections (the release's velora_scale).",
                                min=0.0, max=1e3)


def project(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``z``: each sub-token of ``h`` (its last dimension cut into pieces of ``len(v)``)
    projected onto ``v``, in ``h``'s precision with autocast off, kept as (tokens, G) in
    :data:`Z_DTYPE`."""
    s = h.detach().reshape(-1, v.numel())
    with torch.autocast(h.device.type, enabled=False):
        z = s @ v.to(s.dtype)
    return z.to(Z_DTYPE).view(-1, h.shape[-1] // v.numel())


def compressed_weight_grad(g: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_n g_n ĥ_nᵀ`` with ``ĥ = z·v``, computed as ``(Σ_n g_n z_nᵀ) ⊗ v`` (no ĥ is built).

    ``g``: (tokens, r) output gradients; returns (r, D) float32. The product is taken in
    ``g``'s dtype (bf16 under autocast, as LoRA's own weight gradient) and in the order
    autograd takes LoRA's, ``gᵀh``.
    """
    gz = (g.t() @ z.to(g.dtype)).float()  # (r, G)
    return (gz.unsqueeze(-1) * v.float()).flatten(-2)


class SubTokenProjection(torch.autograd.Function):
    """``h A_tᵀ`` for each weight ``A_t``; backward: exact input gradient, compressed weight
    gradients from ``z = ⟨sub-tokens of h, v⟩``.

    ``probe`` (a list, or None) asks for the comparison with the exact weight gradient: the
    step then keeps ``h`` itself (memory as LoRA), recomputes ``z`` from it in backward (so
    the update is the same as without probing) and appends, per weight, the cosine
    similarity and norm ratio of the compressed to the exact gradient, then the share of
    the sub-tokens' energy that ``v`` captures, ``Σz²/Σ|s|²``.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, v: torch.Tensor, scale: float, probe: list | None,
                *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = tuple(h @ w.T for w in weights)  # LoRA's op (autocast applies as there)
        ctx.scale, ctx.probe, ctx.shape, ctx.h_dtype = scale, probe, h.shape, h.dtype
        ctx.save_for_backward(h if probe is not None else project(h, v), v, *weights)
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        kept, v, *weights = ctx.saved_tensors
        h2d = kept.reshape(-1, ctx.shape[-1]) if ctx.probe is not None else None
        with torch.autocast(kept.device.type, enabled=False):
            z = project(h2d, v) if h2d is not None else kept
            grad_h = None
            if ctx.needs_input_grad[0]:  # exact: Σ_t g_t A_t, each in LoRA's precision
                for g, w in zip(grads, weights):
                    part = (g.reshape(-1, g.shape[-1]) @ w.to(g.dtype)).to(ctx.h_dtype)
                    grad_h = part if grad_h is None else grad_h + part
                grad_h = grad_h.view(ctx.shape)
            grad_w = []
            for i, (g, w) in enumerate(zip(grads, weights)):
                if not ctx.needs_input_grad[4 + i]:
                    grad_w.append(None)
                    continue
                g2d = g.reshape(-1, g.shape[-1])
                gw = compressed_weight_grad(g2d, z, v)
                if ctx.scale != 1.0:
                    gw = gw * ctx.scale
                grad_w.append(gw.to(w.dtype))
                if h2d is not None:
                    ctx.probe.append(_compare(gw, g2d.float().t() @ h2d.float()))
            if h2d is not None:
                s, zf = h2d.double(), z.double()
                total = float((s * s).sum())
                ctx.probe.append({"energy": float((zf * zf).sum()) / total if total > 0
                                  else math.nan})
        return (grad_h, None, None, None, *grad_w)


def _compare(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    a, e = approx.double().flatten(), exact.double().flatten()
    na, ne = float(a.norm()), float(e.norm())
    cos = float(a @ e) / (na * ne) if na > 0 and ne > 0 else math.nan
    return {"cos": cos, "ratio": na / ne if ne > 0 else math.nan}


class VeLoRAQKV(LoRAQKV):
    """:class:`LoRAQKV` whose down-projections keep ``z`` instead of their input in training.

    ``compress`` False runs plain LoRA also in training (how a run measures LoRA's memory on
    its own model); ``probe`` (set for one step) compares with the exact weight gradient,
    whose results land in ``probe_results`` (one dict per target, then the energy).
    ``last_input_shape`` is the shape of the last training input seen.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, targets: str,
                 groups: int, velora_scale: float):
        super().__init__(base, rank, alpha, dropout, targets)
        if groups < 1 or self.dim % groups:
            divisors = [g for g in range(1, self.dim + 1) if self.dim % g == 0]
            raise ValueError(f"velora.groups = {groups} must divide the backbone width "
                             f"{self.dim} (sub-tokens of width/groups); divisors: "
                             f"{', '.join(map(str, divisors))}")
        self.groups, self.velora_scale = groups, velora_scale
        self.register_buffer("velora_v", torch.zeros(self.dim // groups))
        self.compress, self.probe = True, False
        self.probe_results: list[dict[str, float]] = []
        self.last_input_shape: tuple[int, ...] | None = None
        self._v_ready: bool | None = None  # cache of v_ready (None: ask the buffer)

    @property
    def v_ready(self) -> bool:
        """Whether ``v`` was taken from a training batch (a zero vector until then)."""
        return bool(self.velora_v.any())

    @torch.no_grad()
    def init_v(self, h: torch.Tensor) -> None:
        """``v`` ← the normalised mean of every sub-token of ``h`` (a zero mean, which real
        activations never give, falls back to the uniform unit vector)."""
        mean = h.detach().reshape(-1, self.velora_v.numel()).float().mean(0)
        norm = float(mean.norm())
        if not math.isfinite(norm) or norm <= 1e-12:
            mean, norm = torch.ones_like(mean), math.sqrt(mean.numel())
        self.velora_v.copy_(mean / norm)
        self._v_ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        self._v_ready = None  # a loaded v decides readiness again
        return super()._load_from_state_dict(*args, **kwargs)

    def down_projections(self, h: torch.Tensor) -> list[torch.Tensor]:
        weights = [self.lora_A[t] for t in self.targets]
        if not (self.training and self.compress and torch.is_grad_enabled()
                and any(w.requires_grad for w in weights)):
            return super().down_projections(h)
        self.last_input_shape = tuple(h.shape)
        if not self._v_ready:
            if not self.v_ready:
                self.init_v(h)  # the first training batch (the release's batch_average_once)
            self._v_ready = True
        probe = self.probe_results if self.probe else None
        return list(SubTokenProjection.apply(h, self.velora_v, self.velora_scale, probe,
                                             *weights))


def velora_modules(model: nn.Module) -> list[VeLoRAQKV]:
    mods = [m for m in model.modules() if isinstance(m, VeLoRAQKV)]
    if not mods:
        raise TypeError("the model has no VeLoRA layers: attach the velora method first")
    return mods


def probe_steps(total: int, points: int = PROBE_POINTS, batches: int = PROBE_BATCHES
                ) -> dict[int, int]:
    """0-based training step → probe point: ``batches`` consecutive steps at each of
    ``points`` evenly spread places, from the second step to the last. (At the first step
    LoRA's B is still zero, so the down-projections' weight gradients are exactly zero and
    there is no direction to compare.)"""
    out: dict[int, int] = {}
    first = 1 if total > batches else 0
    last = max(total - batches, first)
    for p in range(points if total > 0 else 0):
        start = first + round(p * (last - first) / max(points - 1, 1))
        for s in range(start, min(start + batches, total)):
            out.setdefault(s, p)
    return out


class _ProbeSchedule:
    """Engine callback (``train.Callback``'s hooks, duck-typed: methods sit below the
    engine): learns the run's step count, and after each step collects the gradient
    comparison of the step, if it probed."""

    def __init__(self, method: VeLoRA):
        self.method = method

    def on_start(self, info: dict) -> None:
        self.method.plan_probes(int(info["steps"]), int(info["epochs"]))

    def on_step(self, step: int, total_steps: int, loss: float) -> None:
        self.method.collect_probe(step)

    def on_epoch(self, row: dict) -> None: ...

    def should_stop(self) -> bool:
        return False


@register_method("velora")
class VeLoRA(LoRA):
    Config = VeLoRAConfig
    title = "VeLoRA"
    view_page = "9_VeLoRA.py"
    cached_seeds = (0,)
    # G = 8 (sub-tokens of 16 on the 128-wide embedded backbone) and G = 128 (of 1: exact up
    # to fp16) around the default 32, for the views against G
    cached_variants = (("g8", {"groups": 8}, ("digits",)),
                       ("g128", {"groups": 128}, ("digits",)))
    # LoRA's counts: v is a buffer; G changes what is kept for backward, not what is trained
    vit_b_counts = (*LoRA.vit_b_counts, ({"rank": 8, "groups": 64}, 294_912))
    summary = ("LoRA on the query and value projections that keeps, for the weight gradient, "
               "one number per slice of each token instead of the token: less training "
               "memory, an approximate gradient, the same forward.")
    paper = "https://arxiv.org/abs/2405.17991"

    def __init__(self, config: VeLoRAConfig | None = None):
        super().__init__(config)
        self.memory: dict[str, Any] = {}  # measure_memory's record, from the first step
        self.probes: list[dict[str, Any]] = []  # one per probed step
        self._plan: dict[int, int] = {}  # 0-based step → probe point
        self._step = 0  # 0-based index of the step being trained
        self._total_steps = self._epochs = 0
        self._mods: list[VeLoRAQKV] = []

    def attach(self, model: nn.Module) -> None:
        c = self.config
        for block in vit_blocks(model):
            block.attn.qkv = VeLoRAQKV(block.attn.qkv, c.rank, c.alpha, c.dropout, c.targets,
                                       c.groups, c.velora_scale)
        self._mods = velora_modules(model)

    # -- training: memory at the first step, gradient probes over training --------------
    def training_callbacks(self) -> list[Any]:
        return [_ProbeSchedule(self)]

    def plan_probes(self, total_steps: int, epochs: int) -> None:
        self._plan = probe_steps(total_steps)
        self._step, self._total_steps, self._epochs = 0, total_steps, epochs

    def training_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        mods = velora_modules(model)
        if not self.memory:
            self.memory = measure_memory(model, images, labels, criterion)
        probing = self._step in self._plan
        for m in mods:
            m.compress, m.probe = True, probing
            m.probe_results.clear()
        return super().training_loss(model, images, labels, criterion)

    def collect_probe(self, step: int) -> None:
        """After training step ``step`` (1-based, as the engine counts): keep what its
        backward compared, if it probed."""
        index, self._step = self._step, step
        if index not in self._plan:
            return
        rows = [list(m.probe_results) for m in self._mods]
        for m in self._mods:
            m.probe = False
            m.probe_results.clear()
        if rows and all(len(r) == len(self.config.targets) + 1 for r in rows):
            self.probes.append({"step": step, "point": self._plan[index], "layers": rows})

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        mods = velora_modules(model)
        c = self.config
        out: dict[str, Any] = {
            "groups": np.int64(c.groups), "width": np.int64(mods[0].dim),
            "sub_token": np.int64(mods[0].dim // c.groups), "rank": np.int64(c.rank),
            "velora_scale": np.float64(c.velora_scale), "targets": np.str_(c.targets),
            "depth": np.int64(len(mods)),
            "v": np.stack([m.velora_v.detach().float().cpu().numpy() for m in mods]),
            **self.memory,
        }
        if self.probes:
            n_t = len(c.targets)

            def table(key: str) -> np.ndarray:
                return np.array([[[r[t][key] for t in range(n_t)] for r in p["layers"]]
                                 for p in self.probes], dtype=np.float32)

            out.update({
                "grad_steps": np.array([p["step"] for p in self.probes], dtype=np.int64),
                "grad_points": np.array([p["point"] for p in self.probes], dtype=np.int64),
                "grad_cos": table("cos"),  # (probed steps, layers, targets)
                "grad_norm_ratio": table("ratio"),
                "captured_energy": np.array([[r[n_t]["energy"] for r in p["layers"]]
                                             for p in self.probes], dtype=np.float32),
                "total_steps": np.int64(self._total_steps), "epochs": np.int64(self._epochs),
            })
        return out


def measure_memory(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   criterion: nn.Module) -> dict[str, Any]:
    """One training step's memory with VeLoRA and with plain LoRA, same model and batch.

    Saved-for-backward bytes of the forward (:func:`vpeft_viz.probes.memory.
    measure_training_step`; the model's parameters and buffers apart, they live anyway). On
    CUDA also the allocator peak of forward + backward of each, after one unmeasured
    warm-up step (cuBLAS workspaces and the like are allocated once, in whichever step comes
    first; measuring resets CUDA's peak statistics, so a run's own peak counts from its first
    step); elsewhere the forward alone (the count needs no backward). The VeLoRA step runs
    before the LoRA one, so an unset ``v`` comes from this batch, as in training. Gradients
    are cleared afterwards. Keys: ``saved_bytes_{velora,lora}`` (beyond the parameters),
    ``saved_total_bytes_*``, ``saved_tensors_*``, on CUDA ``peak_step_bytes_*`` (above
    ``peak_start_bytes_*``), and ``z_bytes`` (what VeLoRA keeps of the down-projections'
    inputs, from the shapes they saw), batch size, tokens, device and precision.
    """
    mods = velora_modules(model)
    device = images.device
    cuda = device.type == "cuda"

    def step() -> torch.Tensor:
        return criterion(model(images), labels)

    def set_mode(compress: bool) -> None:
        for m in mods:
            m.compress, m.probe = compress, False

    out: dict[str, Any] = {}
    try:
        if cuda:
            set_mode(False)
            measure_training_step(model, step, device=device)  # warm-up, not recorded
        for name, compress in (("velora", True), ("lora", False)):
            set_mode(compress)
            m = measure_training_step(model, step, device=device, backward=cuda)
            out[f"saved_bytes_{name}"] = np.int64(m.saved.activation_bytes)
            out[f"saved_total_bytes_{name}"] = np.int64(m.saved.bytes)
            out[f"saved_tensors_{name}"] = np.int64(m.saved.tensors)
            if m.peak_bytes is not None:
                out[f"peak_step_bytes_{name}"] = np.int64(m.peak_bytes)
                out[f"peak_start_bytes_{name}"] = np.int64(m.start_bytes)
    finally:
        set_mode(True)
    shapes = [m.last_input_shape for m in mods if m.last_input_shape is not None]
    z_item = torch.finfo(Z_DTYPE).bits // 8
    out["z_bytes"] = np.int64(sum(math.prod(m.last_input_shape[:-1]) * m.groups * z_item
                                  for m in mods if m.last_input_shape is not None))
    out["memory_batch_size"] = np.int64(images.shape[0])
    out["memory_tokens"] = np.int64(shapes[0][1] if shapes and len(shapes[0]) == 3 else -1)
    out["memory_device"] = np.str_(device.type)
    amp = torch.is_autocast_enabled(device.type)
    out["memory_precision"] = np.str_(
        str(torch.get_autocast_dtype(device.type)).removeprefix("torch.") if amp else "fp32")
    return out
