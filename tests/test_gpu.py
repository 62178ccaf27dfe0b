"""GPU paths (CUDA, bf16 autocast, allocator peak memory); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.train import TrainConfig, autocast_dtype, fit, peak_memory_bytes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_fit_on_cuda(tiny_vit):
    device = torch.device("cuda")
    assert autocast_dtype("auto", device) is torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(32, 3, 32, 32, generator=g), torch.arange(32) % 5)
    loader = DataLoader(ds, batch_size=8)
    method = create_method("lora")
    attach_method(tiny_vit, method)
    torch.cuda.reset_peak_memory_stats(device)
    res = fit(tiny_vit, method, loader, loader, 5, TrainConfig(epochs=2, device="cuda"),
              device=device)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in res.history)
    assert peak_memory_bytes(device) > 0
    assert next(tiny_vit.parameters()).device.type == "cuda"
