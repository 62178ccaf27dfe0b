"""What every method shares: the config base, the method interface and its life cycle.

A method attaches to a timm :class:`~timm.models.vision_transformer.VisionTransformer` by
wrapping or inserting modules that subclass :class:`PeftModule`. Its trainable parameters are
found by visiting those modules (structure), never by matching parameter names; the
classifier head is always trained and counted separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Config
from ..weights import EMBEDDED_BACKBONE, EMBEDDED_LR


class NotMergeableError(RuntimeError):
    """The method adds computation that cannot be folded into the backbone's weights, or
    this backbone has no weight to fold it into (the message names the site)."""


@dataclass
class MethodConfig(Config):
    """Base for per-method hyperparameters (see each method's dataclass)."""


@dataclass(frozen=True)
class SourceRequest:
    """Another run a method starts from (PVP: prompts pre-trained on a source task).

    The run engine finds that run, or trains the default one on first use
    (``vpeft_viz/runs/sources.py``), and hands its weights to :meth:`PeftMethod.load_source`
    before ``attach``.
    """

    method: str  # the source run's method (its weights must fit this method's modules)
    method_config: dict[str, Any]  # settings the source must have (shape-defining ones)
    run: str | None = None  # a finished run's id or directory; None: the default source
    epochs: int = 10  # training epochs of the default source when it is trained
    seed: int = 0  # seed of the default source


class PeftModule(nn.Module):
    """Marker base for every module a method adds.

    A wrapper keeps the frozen module it wraps in ``self.base_layer``; everything else the
    module owns (direct parameters and child modules) belongs to the method.
    """

    def peft_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        base = self._modules.get("base_layer")
        yield from self.named_parameters(recurse=False)
        for cname, child in self.named_children():
            if child is base or isinstance(child, PeftModule):
                continue  # frozen base, or a nested PEFT module visited on its own
            for pname, p in child.named_parameters():
                yield f"{cname}.{pname}", p


def peft_modules(model: nn.Module) -> Iterator[tuple[str, PeftModule]]:
    for name, m in model.named_modules():
        if isinstance(m, PeftModule):
            yield name, m


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = model.get_classifier()
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class PeftMethod:
    """A PEFT method: how it attaches, what it trains, whether it merges.

    Life cycle, driven by :func:`vpeft_viz.methods.attach_method` and the run engine:
    ``prepare`` (data-dependent selection, optional) → ``attach`` → training → ``merge``
    (optional) and ``artifacts`` (what the method computed, for its views).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    title: ClassVar[str] = ""  # human label for menus
    summary: ClassVar[str] = ""  # one plain-language sentence
    paper: ClassVar[str] = ""
    identity_at_init: ClassVar[bool] = True  # logits unchanged by attaching, before training
    mergeable: ClassVar[bool] = False  # merge() returns a plain timm model, same function
    needs_data: ClassVar[bool] = False  # prepare() must see training images
    trains_backbone: ClassVar[bool] = False  # full fine-tuning
    # Peak learning rate when a run gives none, on hub backbones (the common VTAB-1k AdamW
    # rates); the embedded backbone has its own, chosen on validation: ``default_lr_on``.
    default_lr: ClassVar[float] = 1e-3

    # -- what the lab needs to know (every per-method list is derived from these) -------
    # The page under pages/ that shows what this method computed (its own view), if any.
    view_page: ClassVar[str | None] = None
    # Seeds of this method in the shipped cached_runs/ store, on each of its tasks (see
    # vpeft_viz/runs/cached.py); empty: not shipped.
    cached_seeds: ClassVar[tuple[int, ...]] = (0, 1)
    # Extra shipped runs at other settings, as (label, settings, tasks) — seed 0, e.g. DyT at
    # a second target rate — or (label, settings, tasks, train, seeds) with training settings
    # and seeds of their own (PVP's few-shot runs: {"shots": 4}); run ids
    # <task>-<method>-<label>-s<seed>.
    cached_variants: ClassVar[tuple[tuple[Any, ...], ...]] = ()
    # Exact trainable parameters (head excluded) on timm's vit_base_patch16_224, as
    # (settings, count) pairs that tests and docs/methods.md check; empty with a reason in
    # vit_b_uncounted when the count depends on data.
    vit_b_counts: ClassVar[tuple[tuple[dict[str, Any], int], ...]] = ()
    vit_b_uncounted: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def default_lr_on(cls, backbone: str | None) -> float:
        """The learning rate a run of this method on ``backbone`` uses when it gives none:
        the embedded backbone's live recipe (:data:`vpeft_viz.weights.EMBEDDED_LR`, chosen on
        its validation splits), else :attr:`default_lr`."""
        if backbone in (None, EMBEDDED_BACKBONE):
            return EMBEDDED_LR.get(cls.name, cls.default_lr)
        return cls.default_lr

    # -- life cycle ---------------------------------------------------------------------
    def prepare(self, model: nn.Module, loader, *, device: torch.device, progress=None) -> None:
        """Compute data-dependent choices (sensitivities, salient channels) before attach.

        ``progress(done, total)`` is called as batches are processed, when given.
        """

    def attach(self, model: nn.Module) -> None:
        """Insert the method's modules into ``model`` in place."""

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The method's own parameters (head excluded), found by module structure."""
        seen: set[int] = set()
        for mname, module in peft_modules(model):
            for pname, p in module.peft_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{mname}.{pname}", p

    def num_trainable(self, model: nn.Module) -> int:
        """How many weights the method trains (a sparse method counts chosen entries only)."""
        return sum(p.numel() for _, p in self.trainable_parameters(model))

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained method into the backbone; returns a plain timm model."""
        raise NotMergeableError(f"{self.name} cannot be merged into the backbone")

    def train_rounds(self, model: nn.Module, fit_round: Callable[..., Any]) -> Any:
        """Train the attached model; returns the result of the round whose weights it keeps.

        ``fit_round(*, round_index=0, rounds=1, label="")`` is one call of the training
        engine on the run's data and recipe (its ``FitResult``: history, best validation
        accuracy, cancelled). Most methods train once; a method that trains in several
        rounds (E²VPT: mask training, then rewinds) overrides this, calls it once per round
        and leaves the weights it selected (on validation only) in ``model``.
        """
        return fit_round()

    def training_callbacks(self) -> list[Any]:
        """Callbacks of the method's own that the engine runs beside the caller's during
        :func:`vpeft_viz.train.fit` (``train.Callback``'s hooks, duck-typed: methods sit below
        the engine). VeLoRA schedules its gradient probes from the step count they report."""
        return []

    def source_request(self) -> SourceRequest | None:
        """The run whose trained weights this method starts from, or None (most methods)."""
        return None

    def load_source(self, weights: dict[str, torch.Tensor], identity: dict[str, Any]) -> None:
        """Take the source run's stored weights (before ``attach``); ``identity`` says which
        run they are (id, store, method, data, backbone), for the method's state."""
        raise NotImplementedError(f"{self.name} starts from no source run")

    def training_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return criterion(logits, labels), logits

    # -- persistence and analysis -------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-serialisable result of ``prepare`` needed to rebuild the modules on load."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``prepare`` computed, so ``attach`` rebuilds the same modules."""

    def counting_state(self, model: nn.Module) -> dict[str, Any] | None:
        """A stand-in for ``prepare``'s result with the same parameter count, or None when
        the count itself depends on the data (then only a real run can report it)."""
        return None

    def artifacts(self, model: nn.Module) -> dict[str, Any]:
        """What the method computed, for its views: name → numpy array or JSON value."""
        return {}

    def test_artifacts(self, model: nn.Module, loader, *, device: torch.device
                       ) -> dict[str, Any]:
        """What the trained model does on the test split, for its views (DyT: which tokens
        each layer skips); the run engine calls it once, after the test evaluation, and
        stores the result beside :meth:`artifacts` in ``method.npz``."""
        return {}

    # -- compact storage (optional; low-bit adapters) -------------------------------------
    # A method that stores its weights in its own packed form overrides all three; a run
    # then writes ``pack_weights``'s bytes beside the safetensors file, which keeps only
    # the tensors not packed (the head), and reads them back with ``load_packed_weights``.
    def stored_bytes(self, model: nn.Module) -> int | None:
        """Bytes the method's weights take in their packed form (headers excluded); None:
        stored as float32 tensors (4 bytes per weight)."""
        return None

    def pack_weights(self, model: nn.Module) -> tuple[bytes, set[str]] | None:
        """The packed file's content and the parameter names it replaces; None: the
        method's weights go into the safetensors file like any tensor."""
        return None

    def load_packed_weights(self, model: nn.Module, data: bytes) -> None:
        """Load what ``pack_weights`` wrote into the attached ``model``."""
        raise NotImplementedError(f"{self.name} has no packed weight format")
