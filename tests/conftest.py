"""Shared fixtures: a tiny random-init timm ViT and a loader of random images for it."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

# Nothing downloads at test time, and no test probes the network: the hub is offline for
# every test and every process a test starts (tests that need "online" patch the probe).
os.environ["HF_HUB_OFFLINE"] = "1"

# 32 px images, 8 px patches: 16 patch tokens + CLS, 48 wide, 2 blocks, 5 classes.
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    """A fresh, seeded, random-init tiny timm ViT in eval mode (nothing is downloaded)."""
    torch.manual_seed(0)
    return VisionTransformer(**TINY_VIT).eval()


@pytest.fixture
def make_tiny_vit():
    """Factory for tiny ViT variants: ``make_tiny_vit(global_pool="avg")`` (seeded, eval)."""

    def make(**overrides) -> VisionTransformer:
        torch.manual_seed(0)
        return VisionTransformer(**{**TINY_VIT, **overrides}).eval()

    return make


@pytest.fixture
def tiny_loader() -> DataLoader:
    """16 random 32 px images with labels in [0, 5), batches of 8, fixed order."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, TINY_VIT["num_classes"], (16,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=False)


def write_vtab_task(root, *, num_classes: int = 3, sizes=(24, 9, 9), seed: int = 0):
    """A tiny learnable VTAB-1k-layout task folder (class = dominant colour channel)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = {}
    for split, n in zip(("train", "val", "test"), sizes):
        rows = []
        for i in range(n):
            y = i % num_classes
            img = (rng.random((32, 32, 3)) * 80).astype(np.uint8)
            img[:, :, y % 3] += 160
            rel = f"images/{split}_{i:04d}.png"
            Image.fromarray(img).save(root / rel)
            rows.append(f"{rel} {y}")
        lines[split] = rows
    (root / "train800.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines["val"]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines["train"] + lines["val"]) + "\n")
    (root / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


@pytest.fixture
def vtab_task(tmp_path):
    """Path of a tiny VTAB-1k-layout task folder named ``colours``."""
    return write_vtab_task(tmp_path / "colours")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread: more only adds sync cost (20× on a busy CPU).
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Empty user, cache and shipped stores under ``tmp_path`` for page tests; queue workers
    are never spawned. Returns ``tmp_path``."""
    import vpeft_viz.runs as run_stores
    from vpeft_viz.runs import queue

    monkeypatch.setenv("VPEFT_VIZ_RUNS", str(tmp_path / "user"))
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_stores, "CACHED_STORE", tmp_path / "cached")
    monkeypatch.setattr(queue, "ensure_worker", lambda store: [])
    return tmp_path


def page_text(at) -> str:
    """Every message a page rendered in an AppTest (markdown, captions, alerts), joined."""
    kinds = ("markdown", "caption", "info", "warning", "success", "error")
    return "\n".join(str(e.value) for k in kinds for e in getattr(at, k))
