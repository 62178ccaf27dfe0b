"""Memory probes: what autograd keeps for the backward pass, and the allocator's peak.

:func:`count_saved_tensors` counts exactly the bytes a forward leaves for backward. Inside it,
:func:`torch.autograd.graph.saved_tensors_hooks` sees every tensor an autograd node saves
(``save_for_backward`` of built-in ops and of custom :class:`torch.autograd.Function`\\ s
alike) at the moment it is saved. Several saves often share memory (one activation saved by
two nodes, a view of another tensor, the same weight in several places), so tensors are
**deduplicated by storage**: each distinct storage (keyed by device and the address of its
data, which cannot be reused while the graph holds it) is counted once, with its whole size
(``untyped_storage().nbytes()``: a saved view keeps its whole base alive). Storages of the
tensors passed as ``exclude`` (the model's own parameters and buffers, which live anyway)
are counted apart, so :attr:`SavedTensors.activation_bytes` is what training adds on top of
the model. What the hooks cannot see: tensors a custom Function stores as plain attributes of
``ctx`` instead of saving them (timm's ViTs and this project's methods save everything), and
the allocator's own rounding.

:func:`measure_training_step` runs one forward (counted) and its backward, and on CUDA also
reads the allocator's peak (``torch.cuda.max_memory_allocated``) over the step, above what
was allocated before it; on any other device the peak is ``None``. VeLoRA's runs use it to
record their memory against LoRA's (``vpeft_viz/methods/velora.py``, docs/methods.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SavedTensors:
    """Tensors saved for backward while :func:`count_saved_tensors` was open."""

    bytes: int = 0  # distinct storages, each counted once
    excluded_bytes: int = 0  # of those, storages of the excluded tensors (parameters)
    tensors: int = 0  # saves seen (a storage saved twice counts twice here)
    storages: int = 0  # distinct storages
    by_dtype: dict[str, int] = field(default_factory=dict)  # bytes per storage dtype

    @property
    def activation_bytes(self) -> int:
        """Bytes kept for backward beyond the excluded tensors (what training adds)."""
        return self.bytes - self.excluded_bytes


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


@contextlib.contextmanager
def count_saved_tensors(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the tensors autograd saves for backward inside the block (see the module doc).

    The graph built inside must still be alive when the block ends (keep the loss): storage
    addresses are unique only while their tensors are held.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: set[tuple[str, int]] = set()
    out = SavedTensors()

    def pack(t: torch.Tensor) -> torch.Tensor:
        out.tensors += 1
        try:
            key = _storage_key(t)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested)
            return t
        if key not in seen:
            seen.add(key)
            out.storages += 1
            out.bytes += nbytes
            out.by_dtype[str(t.dtype).removeprefix("torch.")] = (
                out.by_dtype.get(str(t.dtype).removeprefix("torch."), 0) + nbytes)
            if key in excluded:
                out.excluded_bytes += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers (what :func:`count_saved_tensors` may exclude)."""
    return [*model.parameters(), *model.buffers()]


@dataclass
class StepMemory:
    """One training step's memory: what its forward saved, and on CUDA the peak."""

    saved: SavedTensors
    peak_bytes: int | None = None  # CUDA: allocator peak during the step above its start
    start_bytes: int | None = None  # CUDA: allocated when the step began


def cuda_memory_start(device: torch.device) -> int | None:
    """Reset the CUDA peak and return what is allocated now; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def cuda_peak_since(device: torch.device, start: int | None) -> int | None:
    """The allocator's peak since :func:`cuda_memory_start`, above ``start``; None off CUDA."""
    if device.type != "cuda" or start is None:
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)) - start


def measure_training_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], *,
                          device: torch.device, backward: bool = True) -> StepMemory:
    """Run ``loss_fn()`` (a forward returning the loss) with its saved tensors counted, then
    its backward (``backward=False``: forward only, enough for the count).

    The model's parameters and buffers are excluded from the activation bytes. Gradients
    are cleared before and after (set to None), so the step starts from none and leaves
    none behind. On CUDA the peak includes the gradients the backward allocates.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    start = cuda_memory_start(device)
    with count_saved_tensors(model_tensors(model)) as saved:
        loss = loss_fn()
    if backward:
        loss.backward()
    peak = cuda_peak_since(device, start)
    del loss
    for p in params:
        p.grad = None
    return StepMemory(saved=saved, peak_bytes=peak, start_bytes=start)
