"""E²VPT: effective and efficient visual prompt tuning (key-value prompts, visual prompts,
prompt pruning with rewind).

Han et al., ICCV 2023, https://arxiv.org/abs/2307.13770 (ChengHan111/E2VPT).

* **Key-value prompts** (:class:`KVPromptAttention`). Every block's attention gets its own
  tensor of ``L_kv`` prompts, (heads × L_kv × head_dim), joined along the sequence axis to
  the keys *and* the values after the qkv projection (one tensor shared by both; prepended,
  as the release does — the order is immaterial). Queries are unchanged, so the output keeps
  its length. Kaiming-uniform, bound √(6/(head_dim·L_kv)); no dropout.
* **Visual prompts** (:class:`E2VPTBlock`). VPT-deep: ``L_p`` tokens per block after the
  CLS token, each block replacing the previous block's prompt slots; VPT's Xavier bound
  √(6/(3·patch² + width)) (±0.0625 on ViT-B/16) and prompt dropout 0.1.
  Trainable (head excluded): depth · width · (L_kv + L_p) = 9,216 · 15 = 138,240 on ViT-B/16
  with the defaults L_kv = 5, L_p = 10.
* **Masks** (:class:`PromptMasks`). One pair shared by every block's visual prompts: a token
  mask (L_p) and a piece mask (L_p × 16, piece j of a token covers dims {j, j+16, …}). A token
  whose mask is 0 is removed from the sequence (not merely zeroed), so pruning it gives the
  same logits as a model built without it; a piece mask of 0 zeroes its dims. Key-value
  prompts are never pruned. Masks are buffers, not counted as trainable parameters.
* **Pruning and rewind** (:meth:`E2VPT.train_rounds`). Round 0 trains the prompts with soft
  masks (parameters initialised at 1); the importance of a mask entry is the mean over the
  training batches of its *signed* gradient (the mean magnitude is kept too, for the view).
  For every candidate (tokens pruned, pieces pruned) pair, the lowest-scoring (most
  negative) tokens are pruned, and in each kept token the same number of its lowest-scoring
  pieces. Each candidate is a rewind round: prompts re-initialised (fresh, seeded draw by
  default, as the release does; or the original initial values), the head reset to its
  state before round 0, masks frozen, trained again. The winner is the best on validation
  (ties → more pruning); test is evaluated once, on the winner, by the run engine.
  Candidates come from fractions: floor(fraction · L_p) tokens (at least one kept) and
  floor(fraction · 16) pieces (at least 4 kept).

The documented "origin" VTAB recipe of the release does not prune at all (``prune=false``
here: one plain training run with all masks at 1). The live default schedule (one
fraction of tokens × two of pieces: a mask round and two rewind rounds) took 349 s on the
embedded backbone on 2 CPU cores at load 5–6 (docs/benchmarks.md); ``full_schedule`` is
the 9 × 8 grid (up to 72 rewind rounds, fewer after the limits merge pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Attention
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, param
from ._base import MethodConfig, PeftMethod, PeftModule
from ._layers import BlockWrapper, vit_blocks
from ._registry import register_method

PIECES = 16  # pieces per visual prompt token; piece j covers dims {j, j + 16, ...}
MIN_PIECES_KEPT = 4
FULL_TOKEN_FRACTIONS = tuple(k / 10 for k in range(1, 10))
FULL_PIECE_FRACTIONS = tuple(k / 16 for k in range(0, 16, 2))


def _fractions(where: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{where} must be comma-separated fractions, got {text!r}") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise ConfigError(f"{where} needs fractions in [0, 1), got {text!r}")
    return values


@dataclass
class E2VPTConfig(MethodConfig):
    num_tokens: int = param(10, "Visual prompt tokens L_p per block (VPT-deep style).",
                            min=1, max=1024)
    kv_tokens: int = param(5, "Key-value prompts L_kv per block, joined to the keys and values.",
                           min=0, max=1024)
    dropout: float = param(0.1, "Dropout on the visual prompts (none on key-value prompts).",
                           min=0.0, max=0.9)
    prune: bool = param(True, "Train the masks, prune and rewind; off: one plain run with no "
                        "pruning (the release's documented 'origin' VTAB recipe).")
    token_fractions: str = param("0.4", "Candidate fractions of the visual prompt tokens to "
                                 "prune, comma-separated; each pairs with every piece fraction "
                                 "and each pair is one rewind round.")
    piece_fractions: str = param("0.25,0.5", "Candidate fractions of the 16 pieces pruned in "
                                 "every kept token, comma-separated.")
    full_schedule: bool = param(False, "Use the full grid instead of the fractions above: "
                                "tokens 0.1…0.9 × pieces 0, 2/16 … 14/16 (up to 72 rewind "
                                "rounds; hours on a CPU).")
    rewind_init: str = param("fresh", "Prompts of each rewind round: a fresh seeded draw (the "
                             "release) or the original initial values.",
                             choices=("fresh", "original"))
    seed: int = param(0, "Seed of the prompts' initialisation; rewind round r draws with "
                      "seed + r.", min=0, max=2**31 - 1)

    def validate(self) -> None:
        _fractions(f"{self.prefix}.token_fractions", self.token_fractions)
        _fractions(f"{self.prefix}.piece_fractions", self.piece_fractions)


# -- pruning rule ----------------------------------------------------------------------------
def candidate_counts(num_tokens: int, token_fractions: tuple[float, ...],
                     piece_fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """Distinct (tokens pruned, pieces pruned per kept token) pairs, in grid order."""
    out: list[tuple[int, int]] = []
    for ft, fp in product(token_fractions, piece_fractions):
        pair = (min(math.floor(ft * num_tokens), num_tokens - 1),
                min(math.floor(fp * PIECES), PIECES - MIN_PIECES_KEPT))
        if pair not in out:
            out.append(pair)
    return out


def prune_masks(token_scores: np.ndarray, piece_scores: np.ndarray, tokens_pruned: int,
                pieces_pruned: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary (token, piece) masks: the ``tokens_pruned`` lowest-scoring tokens go, and in
    each kept token its ``pieces_pruned`` lowest-scoring pieces (ties: lower index first).
    A pruned token's piece row is all 0 (the token is gone)."""
    token_scores, piece_scores = np.asarray(token_scores), np.asarray(piece_scores)
    token = np.ones(token_scores.shape[0], dtype=np.float32)
    token[np.argsort(token_scores, kind="stable")[:tokens_pruned]] = 0.0
    piece = np.ones(piece_scores.shape, dtype=np.float32)
    order = np.argsort(piece_scores, axis=1, kind="stable")[:, :pieces_pruned]
    np.put_along_axis(piece, order, 0.0, axis=1)
    piece[token == 0] = 0.0
    return token, piece


def piece_sizes(width: int) -> np.ndarray:
    """How many dims each piece covers (piece j: dims j, j+16, ... below ``width``)."""
    return np.array([len(range(j, width, PIECES)) for j in range(PIECES)], dtype=np.int64)


def kept_prompt_entries(token: np.ndarray, piece: np.ndarray, width: int) -> int:
    """Visual prompt entries of one block that the masks keep."""
    kept = (np.asarray(piece) != 0) & (np.asarray(token) != 0)[:, None]
    return int((kept * piece_sizes(width)[None, :]).sum())


# -- modules ---------------------------------------------------------------------------------
class PromptMasks(PeftModule):
    """The token and piece masks shared by every block's visual prompts.

    ``token`` and ``piece`` are binary buffers (saved with the run's weights). During the
    mask-training round, :meth:`start_training` adds soft masks (parameters at 1) that
    multiply them; their gradients are the importance scores. Not counted as trainable
    prompt parameters (:meth:`peft_parameters` yields nothing).
    """

    def __init__(self, num_tokens: int):
        super().__init__()
        self.register_buffer("token", torch.ones(num_tokens))
        self.register_buffer("piece", torch.ones(num_tokens, PIECES))
        self.token_soft: nn.Parameter | None = None
        self.piece_soft: nn.Parameter | None = None

    def peft_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())

    def start_training(self) -> tuple[nn.Parameter, nn.Parameter]:
        self.token_soft = nn.Parameter(torch.ones_like(self.token))
        self.piece_soft = nn.Parameter(torch.ones_like(self.piece))
        return self.token_soft, self.piece_soft

    def stop_training(self) -> None:
        self.token_soft = None
        self.piece_soft = None

    def set(self, token: np.ndarray | torch.Tensor, piece: np.ndarray | torch.Tensor) -> None:
        """Freeze the masks at the given binary values."""
        token_t = torch.as_tensor(np.asarray(token), dtype=self.token.dtype)
        piece_t = torch.as_tensor(np.asarray(piece), dtype=self.piece.dtype)
        if token_t.shape != self.token.shape or piece_t.shape != self.piece.shape:
            raise ValueError(f"masks must be {tuple(self.token.shape)} and "
                             f"{tuple(self.piece.shape)}, got {tuple(token_t.shape)} and "
                             f"{tuple(piece_t.shape)}")
        if token_t.ne(0).sum() == 0:
            raise ValueError("the token mask must keep at least one token")
        self.token.copy_(token_t)
        self.piece.copy_(piece_t)

    def apply(self, prompts: torch.Tensor) -> torch.Tensor:
        """Masked prompts (L_p × width) → the kept tokens' rows (kept × width)."""
        token, piece = self.token, self.piece
        if self.token_soft is not None:
            token, piece = token * self.token_soft, piece * self.piece_soft
        dims = torch.arange(prompts.shape[-1], device=prompts.device) % PIECES
        masked = prompts * (token[:, None] * piece[:, dims]).to(prompts.dtype)
        if bool((self.token != 0).all()):
            return masked
        return masked[self.token != 0]


class KVPromptAttention(PeftModule):
    """timm ``Attention`` with learnable prompts joined to its keys and values.

    The wrapped module's own switches are honoured: ``fused_attn`` picks the kernel, and the
    explicit path sends the probabilities through its ``attn_drop``, so
    :mod:`vpeft_viz.probes.attention` reads these maps like any other (with ``L_kv`` more
    keys than queries, the prompts first).
    """

    def __init__(self, attn: Attention, kv_tokens: int):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise TypeError("e2vpt supports timm's plain Attention, not the gated variant")
        self.base_layer = attn
        self.prompts = nn.Parameter(torch.zeros(attn.num_heads, kv_tokens, attn.head_dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("e2vpt key-value prompts do not support attention masks")
        a = self.base_layer
        b, n, _ = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        p = self.prompts.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        k, v = torch.cat([p, k], dim=2), torch.cat([p, v], dim=2)
        if a.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * a.scale) @ k.transpose(-2, -1)
            x = a.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(b, n, a.attn_dim)
        return a.proj_drop(a.proj(a.norm(x)))


class E2VPTBlock(BlockWrapper):
    """VPT-deep prompt slots through the shared masks: inserted at the first block,
    replaced at later ones, removed after the last."""

    def __init__(self, block, *, prompts: nn.Parameter, masks: PromptMasks, insert: bool,
                 remove: bool, num_prefix: int, dropout: float):
        super().__init__(block)
        self.prompts = prompts
        self.__dict__["masks"] = masks  # shared; registered once, on the model
        self.insert, self.remove, self.num_prefix = insert, remove, num_prefix
        self.dropout = nn.Dropout(dropout)
        self._slots = 0

    def before(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix
        prompts = self.masks.apply(self.dropout(self.prompts)).to(x.dtype)
        self._slots = prompts.shape[0]
        rest = x[:, n:] if self.insert else x[:, n + self._slots:]
        return torch.cat([x[:, :n], prompts.unsqueeze(0).expand(x.shape[0], -1, -1), rest], 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.remove:
            n = self.num_prefix
            x = torch.cat([x[:, :n], x[:, n + self._slots:]], dim=1)
        return x


def _masks(model: nn.Module) -> PromptMasks:
    masks = getattr(model, "e2vpt_masks", None)
    if not isinstance(masks, PromptMasks):
        raise RuntimeError("this model has no e2vpt prompts: attach e2vpt first")
    return masks


def _prompt_bound(model: nn.Module) -> float:
    """VPT's Xavier bound √(6/(3·patch² + width)): 0.0625 on ViT-B/16."""
    patch = model.patch_embed.patch_size[0]
    return math.sqrt(6.0 / float(3 * patch * patch + model.embed_dim))


@torch.no_grad()
def init_prompts(model: nn.Module, seed: int) -> None:
    """Draw every block's visual and key-value prompts from ``seed`` (on the CPU, so the
    same seed gives the same values on any device)."""
    g = torch.Generator().manual_seed(seed)
    bound = _prompt_bound(model)
    for blk in model.blocks:
        if isinstance(blk, E2VPTBlock):
            blk.prompts.copy_(torch.empty(blk.prompts.shape).uniform_(-bound, bound,
                                                                       generator=g))
            attn = blk.base_layer.attn
            if isinstance(attn, KVPromptAttention):
                _, kv, hd = attn.prompts.shape
                kv_bound = math.sqrt(6.0 / (hd * kv))
                attn.prompts.copy_(torch.empty(attn.prompts.shape).uniform_(
                    -kv_bound, kv_bound, generator=g))


def prompt_layout(model: nn.Module) -> dict[str, int]:
    """Where the prompts sit in an attached model's attention maps: key-value prompts are
    keys ``[0, kv_tokens)``; visual prompts are tokens ``[num_prefix, num_prefix + kept)``
    of the sequence (keys shifted by ``kv_tokens``)."""
    masks = _masks(model)
    first = model.blocks[0]
    attn = first.base_layer.attn
    return {"kv_tokens": attn.prompts.shape[1] if isinstance(attn, KVPromptAttention) else 0,
            "visual_tokens": int(masks.token.ne(0).sum()), "num_prefix": first.num_prefix}


# -- the method ------------------------------------------------------------------------------
FitRound = Callable[..., Any]


@register_method("e2vpt")
class E2VPT(PeftMethod):
    Config = E2VPTConfig
    title = "E²VPT"
    view_page = "8_E2VPT.py"
    cached_seeds = (0,)
    # 9,216 · (L_kv + L_p) on ViT-B/16 (12 blocks × 768), before pruning
    vit_b_counts = (({}, 138_240), ({"num_tokens": 5, "kv_tokens": 5}, 92_160))
    summary = ("Prompts on the keys and values of every attention layer plus visual prompt "
               "tokens, then prune the visual prompts that matter least and retrain.")
    paper = "https://arxiv.org/abs/2307.13770"
    identity_at_init = False

    def __init__(self, config: E2VPTConfig | None = None):
        super().__init__(config)
        self.record: dict[str, Any] = {}

    def candidates(self) -> list[tuple[int, int]]:
        c = self.config
        if c.full_schedule:
            tf, pf = FULL_TOKEN_FRACTIONS, FULL_PIECE_FRACTIONS
        else:
            tf = _fractions(f"{c.prefix}.token_fractions", c.token_fractions)
            pf = _fractions(f"{c.prefix}.piece_fractions", c.piece_fractions)
        return candidate_counts(c.num_tokens, tf, pf)

    def attach(self, model: nn.Module) -> None:
        c = self.config
        blocks = vit_blocks(model)
        device = blocks[0].norm1.weight.device
        masks = PromptMasks(c.num_tokens).to(device)
        wrapped = []
        for i, b in enumerate(blocks):
            if c.kv_tokens:
                b.attn = KVPromptAttention(b.attn, c.kv_tokens).to(device)
            prompts = nn.Parameter(torch.zeros(c.num_tokens, model.embed_dim, device=device))
            wrapped.append(E2VPTBlock(
                b, prompts=prompts, masks=masks, insert=i == 0, remove=i == len(blocks) - 1,
                num_prefix=model.num_prefix_tokens, dropout=c.dropout))
        model.blocks = nn.Sequential(*wrapped)
        model.e2vpt_masks = masks
        init_prompts(model, c.seed)

    def num_trainable(self, model: nn.Module) -> int:
        """Prompt entries the masks keep (all of them before pruning) plus the key-value
        prompts; a pruned entry no longer affects the output."""
        masks = _masks(model)
        kept = kept_prompt_entries(masks.token.cpu().numpy(), masks.piece.cpu().numpy(),
                                   model.embed_dim)
        total = 0
        for name, p in self.trainable_parameters(model):
            total += kept if name.endswith(".prompts") and p.ndim == 2 else p.numel()
        return total

    # -- multi-round training (pruning and rewind) -------------------------------------
    def train_rounds(self, model: nn.Module, fit_round: FitRound) -> Any:
        """Round 0 trains prompts and soft masks and scores the masks; each candidate pair
        is then a rewind round; the model ends with the winner's weights and masks."""
        if not self.config.prune:
            self.record = {}
            return fit_round()
        c = self.config
        masks = _masks(model)
        head = model.get_classifier()
        head0 = {k: v.detach().clone() for k, v in head.state_dict().items()}
        cands = self.candidates()
        total = 1 + len(cands)

        sums = {"token": 0.0, "piece": 0.0, "token_abs": 0.0, "piece_abs": 0.0}
        calls = [0]

        def grad_hook(kind: str):
            def hook(g: torch.Tensor) -> None:
                g = g.detach().float().cpu()
                sums[kind] = sums[kind] + g
                sums[f"{kind}_abs"] = sums[f"{kind}_abs"] + g.abs()
                if kind == "token":
                    calls[0] += 1
            return hook

        token_soft, piece_soft = masks.start_training()
        hooks = [token_soft.register_hook(grad_hook("token")),
                 piece_soft.register_hook(grad_hook("piece"))]
        try:
            first = fit_round(round_index=0, rounds=total, label="mask training")
        finally:
            for h in hooks:
                h.remove()
            soft = (token_soft.detach().cpu().numpy(), piece_soft.detach().cpu().numpy())
            masks.stop_training()
        n = max(calls[0], 1)
        scores = {k: (v / n).numpy() if isinstance(v, torch.Tensor)
                  else np.zeros(masks.piece.shape if k.startswith("piece") else
                                masks.token.shape, dtype=np.float32)
                  for k, v in sums.items()}
        width = model.embed_dim
        full = kept_prompt_entries(np.ones(c.num_tokens), np.ones((c.num_tokens, PIECES)), width)
        self.record = {
            "token_scores": scores["token"], "piece_scores": scores["piece"],
            "token_scores_abs": scores["token_abs"], "piece_scores_abs": scores["piece_abs"],
            "soft_token": soft[0], "soft_piece": soft[1], "score_batches": calls[0],
            "mask_round_val_acc": first.best_val_acc, "rounds": [],
            "prompt_entries_per_block": full,
        }
        if first.cancelled:
            return first

        results, states = [], []
        for r, (nt, npc) in enumerate(cands, start=1):
            token, piece = prune_masks(scores["token"], scores["piece"], nt, npc)
            init_prompts(model, c.seed + r if c.rewind_init == "fresh" else c.seed)
            head.load_state_dict(head0)
            masks.set(token, piece)
            res = fit_round(round_index=r, rounds=total,
                            label=f"rewind {r}/{len(cands)}: {nt} tokens, {npc} pieces pruned")
            kept = kept_prompt_entries(token, piece, width)
            self.record["rounds"].append({
                "tokens_pruned": nt, "pieces_pruned": npc, "token_mask": token,
                "piece_mask": piece, "val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
                "prompt_entries_kept": kept, "pruned_fraction": 1.0 - kept / full,
                "params": self.num_trainable(model),
            })
            results.append(res)
            states.append({n_: p.detach().clone() for n_, p in model.named_parameters()
                           if p.requires_grad})
            if res.cancelled:
                return res
        best = select_round(self.record["rounds"])
        self.record["selected"] = best
        model.load_state_dict(states[best], strict=False)
        masks.set(self.record["rounds"][best]["token_mask"],
                  self.record["rounds"][best]["piece_mask"])
        return results[best]

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        masks = _masks(model)
        out: dict[str, Any] = {
            "token_mask": masks.token.cpu().numpy(), "piece_mask": masks.piece.cpu().numpy(),
            "kv_tokens": self.config.kv_tokens, "width": model.embed_dim,
            "depth": len(model.blocks), "params_after_pruning": self.num_trainable(model),
        }
        rec = self.record
        if not rec:
            return out
        for k in ("token_scores", "piece_scores", "token_scores_abs", "piece_scores_abs",
                  "soft_token", "soft_piece", "score_batches", "mask_round_val_acc",
                  "prompt_entries_per_block"):
            out[k] = rec[k]
        rounds = rec["rounds"]
        if rounds:
            for k in ("tokens_pruned", "pieces_pruned", "val_acc", "best_epoch",
                      "prompt_entries_kept", "pruned_fraction", "params"):
                out[f"round_{k}"] = np.array([r[k] for r in rounds])
            out["round_token_masks"] = np.stack([r["token_mask"] for r in rounds])
            out["round_piece_masks"] = np.stack([r["piece_mask"] for r in rounds])
        if "selected" in rec:
            out["selected_round"] = rec["selected"]
        return out


def select_round(rounds: list[dict[str, Any]]) -> int:
    """Index of the best round on validation; ties go to the one that prunes more (then the
    earlier one)."""
    def key(i: int) -> tuple[float, int, int]:
        r = rounds[i]
        return (r["val_acc"], -r["prompt_entries_kept"], -i)

    return max(range(len(rounds)), key=key)
