"""Baselines that add no modules: linear probe, full fine-tuning and BitFit.

* Linear probe trains the classifier head only.
* Full fine-tuning trains every backbone weight.
* BitFit (Ben Zaken et al., 2022, https://arxiv.org/abs/2106.10199) trains every bias
  vector of the backbone: those of its Linear, LayerNorm and Conv2d modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ._base import MethodConfig, PeftMethod
from ._registry import register_method


@dataclass
class LinearConfig(MethodConfig):
    """The linear probe has no hyperparameters of its own."""


@register_method("linear")
class LinearProbe(PeftMethod):
    Config = LinearConfig
    title = "Linear probe"
    vit_b_counts = (({}, 0),)
    summary = "Freeze the whole backbone and train only a new classifier on its features."
    mergeable = True
    # A fresh head on frozen features takes a larger step: on 4 embedded tasks (validation,
    # 10 epochs) 1e-2 beat 1e-3 by 3 points; 3e-2 was 1.6 points better still but is less
    # safe on other backbones' feature scales.
    default_lr = 1e-2

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # nothing was added


def backbone_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every parameter except the classifier head's."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, p in model.named_parameters():
        if id(p) not in head:
            yield name, p


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no hyperparameters of its own (see the training recipe)."""


@register_method("full")
class FullFineTune(PeftMethod):
    Config = FullConfig
    title = "Full fine-tune"
    cached_seeds = (0,)  # the slowest baseline: one seed keeps regeneration short
    vit_b_counts = (({}, 85_798_656),)  # every backbone weight of ViT-B/16
    summary = "Update every weight of the backbone: the reference PEFT methods try to match."
    mergeable = True
    trains_backbone = True
    default_lr = 1e-4

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return backbone_named_parameters(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return model


BIAS_MODULES = (nn.Linear, nn.LayerNorm, nn.Conv2d)


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no hyperparameters of its own."""


@register_method("bitfit")
class BitFit(PeftMethod):
    Config = BitFitConfig
    title = "BitFit"
    vit_b_counts = (({}, 102_912),)  # every bias of the backbone
    summary = "Train only the bias vectors of the backbone (about 0.1% of its weights)."
    paper = "https://arxiv.org/abs/2106.10199"
    mergeable = True

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        head = model.get_classifier()
        head_modules = set(head.modules()) if isinstance(head, nn.Module) else set()
        for name, m in model.named_modules():
            if isinstance(m, BIAS_MODULES) and m not in head_modules and m.bias is not None:
                yield f"{name}.bias", m.bias

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the tuned biases already live in the plain timm modules
