"""PVP: Pre-trained Visual Parameter-efficient tuning — VPT-deep started from pre-trained prompts.

Song et al., "PVP: Pre-trained Visual Parameter-Efficient Tuning", 2023,
https://arxiv.org/abs/2304.13639 (no released code). The paper traces the poor few-shot
accuracy of prompt tuning to the random initialisation of the prompts, and works in two
stages: (a) pre-train the parameter-efficient modules — mainly VPT-deep prompts — on a large
labelled source task with the backbone frozen; (b) tune them on the downstream task starting
from those prompts, with a new classification head. It reports gains over VPT of
+16.08 / +11.52 / +6.36 / +2.94 / +1.95 points at 1 / 2 / 4 / 8 / 16 shots on five FGVC tasks.

Here (docs/methods.md, "PVP", for the deviations):

* The modules are exactly the project's VPT-deep (:mod:`.vpt`): same prompts, same insertion,
  same count (12·768·p on ViT-B/16; 92,160 at p = 10). Only their starting values differ.
* The source (setting ``source``) is any finished VPT-deep (or PVP) run with the same backbone
  and prompt count, named by run id or directory, or ``pool`` (the default): VPT-deep trained
  by the lab itself on every *other* task of the embedded suite pooled into one task with a
  union label space (``embedded:pool-except-<task>``, :mod:`vpeft_viz.data.embedded.pool`);
  the downstream task's images and classes are never in it. That source is trained once, on
  first use, and kept as an ordinary run in the store (``vpeft_viz/runs/sources.py``).
* ``init = random`` skips the source: VPT-deep's own initialisation, the control the view
  compares against on the same (few-shot) splits.

The run engine finds (or trains) the source and passes its stored weights to
:meth:`PVP.load_source` before ``attach``; ``attach`` builds VPT-deep's prompts and, for
``init = pretrained``, overwrites them with the source's, layer by layer. Without a source
(counting parameters, rebuilding a finished run whose tuned prompts are then loaded) the
prompts keep VPT's initialisation.

A run stores beyond VPT-deep's ``prompts/<layer>`` (the tuned prompts): ``initial/<layer>``
(the prompts training started from: the source's, or the random ones), ``cosine`` (layers ×
prompts: cosine similarity of each tuned prompt with its initial value) and ``change`` (per
layer, ‖tuned − initial‖ / ‖initial‖); ``method_state.json`` records the source's identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, param
from ..data.fewshot import PAPER_SHOTS
from ._base import SourceRequest
from ._registry import register_method
from .vpt import _VPT, PromptedBlock, VPTConfig, VPTDeep

INITS = ("pretrained", "random")
DEFAULT_SOURCE = "pool"
SOURCE_METHODS = ("vpt-deep", "pvp")  # runs whose stored prompts are VPT-deep prompts
_PROMPT_KEY = re.compile(r"blocks\.(\d+)\.prompts")

# The shipped few-shot runs (vpeft_viz/runs/cached.py): both inits at every paper k, on the
# project's three cached tasks, several seeds (each seed draws its own split).
FEW_SHOT_TASKS = ("digits", "retinopathy", "count")
FEW_SHOT_SEEDS = (0, 1, 2)
FEW_SHOT_EPOCHS = 20  # a 1-shot split is one batch a step: 10 epochs would be 10 steps


@dataclass
class PVPConfig(VPTConfig):
    init: str = param("pretrained", "Start the prompts from a source run's pre-trained prompts "
                      "(pretrained, PVP) or from VPT's random initialisation (random, the "
                      "control).", choices=INITS)
    source: str = param(DEFAULT_SOURCE, "Where pre-trained prompts come from: 'pool' (VPT-deep "
                        "trained by the lab, on first use, on every other embedded task pooled) "
                        "or the id or directory of a finished VPT-deep run with the same "
                        "backbone and prompt count.")
    source_epochs: int = param(5, "Epochs of the 'pool' source's VPT-deep training (7,200 "
                               "images when nine tasks are pooled).", min=1, max=1000)

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError(f"pvp.source must be {DEFAULT_SOURCE!r} or a run id or "
                              "directory; got an empty string")


def _prompted(model: nn.Module) -> list[PromptedBlock]:
    return [b for b in model.blocks if isinstance(b, PromptedBlock) and b.prompts is not None]


def prompt_cosine(initial: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """Cosine similarity of each tuned prompt with its initial value: (..., p, D) → (..., p)."""
    a, b = np.asarray(initial, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide((a * b).sum(-1), norms, out=np.zeros(norms.shape), where=norms > 0)


@register_method("pvp")
class PVP(_VPT):
    Config = PVPConfig
    title = "PVP"
    summary = ("VPT-deep whose prompts start from prompts pre-trained on other tasks, "
               "for few-shot tuning.")
    paper = "https://arxiv.org/abs/2304.13639"
    deep = True
    default_lr = VPTDeep.default_lr
    view_page = "11_PVP.py"
    cached_seeds = (0,)
    cached_variants = tuple(
        (f"{init}-k{k}", {"init": init}, FEW_SHOT_TASKS,
         {"shots": k, "epochs": FEW_SHOT_EPOCHS}, FEW_SHOT_SEEDS)
        for init in INITS for k in PAPER_SHOTS)
    vit_b_counts = VPTDeep.vit_b_counts  # the same prompts: 12 · 768 · p

    def __init__(self, config: PVPConfig | None = None):
        super().__init__(config)
        self.source: dict[str, Any] | None = None  # identity of the source run, once known
        self._source_prompts: list[torch.Tensor] | None = None
        self._initial: list[torch.Tensor] | None = None

    # -- the source ---------------------------------------------------------------------
    def source_request(self) -> SourceRequest | None:
        c = self.config
        if c.init == "random":
            return None
        return SourceRequest(method="vpt-deep", method_config={"num_tokens": c.num_tokens},
                             run=None if c.source == DEFAULT_SOURCE else c.source,
                             epochs=c.source_epochs)

    def load_source(self, weights: dict[str, torch.Tensor], identity: dict[str, Any]) -> None:
        """Keep the source run's per-layer prompts (``blocks.<i>.prompts``), checked against
        this config's prompt count; depth and width are checked by ``attach``."""
        name = identity.get("run_id", "the source run")
        layers = {int(m.group(1)): t for k, t in weights.items()
                  if (m := _PROMPT_KEY.fullmatch(k))}
        if not layers:
            raise ConfigError(f"pvp.source: run {name} stores no VPT-deep prompts "
                              "(blocks.<i>.prompts); use a finished vpt-deep run")
        if sorted(layers) != list(range(len(layers))):
            raise ConfigError(f"pvp.source: run {name} has prompts in layers {sorted(layers)}, "
                              "not in every layer from 0 (a VPT-shallow run?); use a vpt-deep run")
        shapes = {tuple(t.shape) for t in layers.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigError(f"pvp.source: run {name} has prompts of shapes {sorted(shapes)}; "
                              "expected one (prompts, width) shape in every layer")
        p = next(iter(shapes))[0]
        if p != self.config.num_tokens:
            raise ConfigError(f"pvp.source: run {name} has {p} prompts per layer but "
                              f"pvp.num_tokens is {self.config.num_tokens}; set "
                              f"pvp.num_tokens={p}")
        self._source_prompts = [layers[i].detach().float().cpu() for i in range(len(layers))]
        self.source = dict(identity)

    # -- life cycle -----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        blocks = _prompted(model)
        if self.config.init == "pretrained" and self._source_prompts is not None:
            src = self._source_prompts
            width = src[0].shape[1]
            if len(src) != len(blocks) or width != model.embed_dim:
                raise ConfigError(
                    f"pvp.source: run {self.source.get('run_id') if self.source else '?'} has "
                    f"{len(src)} layers of prompts {width} wide; this backbone needs "
                    f"{len(blocks)} layers {model.embed_dim} wide (pick a source trained on "
                    "the same backbone)")
            with torch.no_grad():
                for b, prompts in zip(blocks, src):
                    b.prompts.copy_(prompts.to(b.prompts.dtype))
        self._initial = [b.prompts.detach().cpu().clone() for b in blocks]

    def train_rounds(self, model: nn.Module, fit_round):
        if self.config.init == "pretrained" and self._source_prompts is None:
            raise RuntimeError("pvp: init=pretrained but no source prompts were loaded before "
                               "training (the run engine loads them; see runs/sources.py)")
        return fit_round()

    def state(self) -> dict[str, Any]:
        return {"init": self.config.init, "source": self.source}

    def load_state(self, state: dict[str, Any]) -> None:
        self.source = state.get("source")

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        arts = super().artifacts(model)  # prompts/<layer>: the tuned prompts
        if self._initial is None:
            return arts
        tuned = np.stack([b.prompts.detach().cpu().float().numpy() for b in _prompted(model)])
        initial = np.stack([t.float().numpy() for t in self._initial])
        for i, p in enumerate(initial):
            arts[f"initial/{i}"] = p
        arts["cosine"] = prompt_cosine(initial, tuned)
        norm = np.linalg.norm(initial.reshape(len(initial), -1), axis=1)
        diff = np.linalg.norm((tuned - initial).reshape(len(initial), -1), axis=1)
        arts["change"] = np.divide(diff, norm, out=np.full(norm.shape, np.nan), where=norm > 0)
        arts["from_source"] = np.asarray(self._source_prompts is not None
                                         and self.config.init == "pretrained")
        return arts
