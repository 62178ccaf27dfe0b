"""PEFT methods behind a registry; one file (or package) per method.

A method declares what the lab needs to know about it on its class (``view_page``,
``cached_seeds``, ``vit_b_counts``; see :class:`PeftMethod`): the methods hub, the shipped
cached runs and the count tests are derived from the registry, so adding a method means its
own files plus one import below.

``attach_method(model, method)`` is the one way a method is put on a backbone: it freezes
everything, lets the method insert its modules, then unfreezes exactly the method's own
parameters and the classifier head.
"""

from __future__ import annotations

from torch import nn

from . import (  # noqa: F401  (registration: one line per method)
    adaptformer,
    baselines,
    dyt,
    e2vpt,
    hst,
    lora,
    lowbit,
    pvp,
    sct,
    spt,
    ssf,
    velora,
    vpt,
)
from ._base import (
    MethodConfig,
    NotMergeableError,
    PeftMethod,
    PeftModule,
    head_parameters,
    peft_modules,
)
from ._registry import (
    UnknownMethodError,
    create_method,
    get_method_class,
    method_names,
    methods_with_view,
    register_method,
    view_pages,
)

__all__ = [
    "MethodConfig", "NotMergeableError", "PeftMethod", "PeftModule", "UnknownMethodError",
    "attach_method", "count_parameters", "create_method", "get_method_class", "head_parameters",
    "method_names", "methods_with_view", "peft_modules", "register_method", "trainable_state",
    "view_pages",
]


def attach_method(model: nn.Module, method: PeftMethod) -> nn.Module:
    """Attach ``method`` to ``model`` in place; only its parameters and the head stay trainable."""
    model.requires_grad_(False)
    method.attach(model)
    model.requires_grad_(False)  # modules created by attach default to trainable
    for _, p in method.trainable_parameters(model):
        p.requires_grad_(True)
    for p in head_parameters(model):
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module, method: PeftMethod) -> dict[str, int]:
    """Trainable parameters with and without the head, and the model's total."""
    method_params = method.num_trainable(model)
    head = sum(p.numel() for p in head_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": method_params + head, "trainable_excl_head": method_params,
            "total": total}


def trainable_state(model: nn.Module) -> dict[str, object]:
    """The tensors a run must keep: trainable parameters and buffers of PEFT modules."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in peft_modules(model):
        for bname, b in m.named_buffers(recurse=False):
            state[f"{mname}.{bname}" if mname else bname] = b.detach()
    return state
