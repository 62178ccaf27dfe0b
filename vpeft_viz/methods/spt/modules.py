"""SPT step 3: the modules that tune what the allocation chose (sparse deltas, structured
LoRA or adapters, the CLS token).

See :mod:`vpeft_viz.methods.spt` for the method as a whole.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn import functional as F

from .._base import PeftModule
from .._layers import Bottleneck


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

    Structured modules, as in the released code (ziplab/SPT ``StructuredTuningModule``):

    * LoRA runs in parallel, ``B·A·dropout(x)`` on the layer input;
    * an adapter runs sequentially, ``y + up(GELU(down(dropout(y))))`` on the slice output
      y, or — ``adapter_on_input`` (the release's placement for ``proj``) — in parallel on
      the layer input, ``y + up(GELU(down(dropout(x))))`` (input and output widths equal);
    * every module's output passes through ``DropPath(drop_path)`` (per sample, training
      only), one independent draw per slice.

    ``dropout`` is the rate on the modules' input; the caller passes 0 for ``proj``'s LoRA
    or on-input adapter, which get the un-dropped input in the release.
    """

    def __init__(self, base: nn.Linear, *, kind: str, rank: int, dropout: float,
                 slices: list[tuple[str, int, int]], weight_idx: torch.Tensor,
                 bias_idx: torch.Tensor, drop_path: float = 0.0,
                 adapter_on_input: bool = False):
        super().__init__()
        self.base_layer = base
        self.kind = kind
        self.slices = [(n, int(a), int(b)) for n, a, b in slices]
        self.adapter_on_input = bool(adapter_on_input and kind == "adapter")
        self._init_deltas(weight_idx, bias_idx)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
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
                if self.adapter_on_input and base.in_features != b - a:
                    raise ValueError(f"an adapter on the input of a {base.in_features}→"
                                     f"{b - a} slice needs equal widths; place it on the "
                                     "output instead")
                self.adapters[name] = Bottleneck(b - a, rank, bias=True, act="gelu",
                                                 zero_down_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.effective_weight(), self.effective_bias())
        if not self.slices:
            return out
        on_input = self.kind == "lora" or self.adapter_on_input
        h = self.dropout(x) if on_input else None
        parts, pos = [], 0
        for name, a, b in self.slices:
            if a > pos:
                parts.append(out[..., pos:a])
            o = out[..., a:b]
            if self.kind == "lora":
                delta = (h @ self.lora_A[name].T.to(h.dtype)) @ self.lora_B[name].T.to(h.dtype)
            elif on_input:
                delta = self.adapters[name](h)
            else:
                delta = self.adapters[name](self.dropout(o))
            parts.append(o + self.drop_path(delta))
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
