"""SCT: class-aware saliency against explicit per-class loops, the top-K selection, the K×K
module, the exact ViT-B/16 count and the comparison views.

The registry-wide contract tests run SCT from ``tests/test_methods.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from vpeft_viz.analysis import saliency as sal
from vpeft_viz.methods import attach_method, count_parameters, create_method, sct
from vpeft_viz.methods._layers import vit_blocks
from vpeft_viz.probes.activations import class_channel_norms

CPU = torch.device("cpu")
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)


def tiny(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**TINY).eval()


def dataset(n: int = 23, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[:classes] = torch.arange(classes)  # every class present, sizes unequal
    return TensorDataset(torch.rand(n, 3, 32, 32, generator=g), labels)


def reference_cais(model: VisionTransformer, ds: TensorDataset) -> tuple[np.ndarray, np.ndarray]:
    """The definition, one image and one class at a time, in float64."""
    images, labels = ds.tensors
    depth = len(model.blocks)
    feats: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    hooks = [b.norm2.register_forward_pre_hook(
        lambda _m, a, i=i: feats[i].append(a[0][0, 1:].double()))  # drop CLS
        for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        for img in images:
            model(img[None])
    for h in hooks:
        h.remove()
    classes = sorted(set(labels.tolist()))
    class_aware = np.zeros((depth, model.embed_dim))
    plain = np.zeros((depth, model.embed_dim))
    for b in range(depth):
        per_class = []
        for c in classes:
            rows = torch.cat([feats[b][i] for i in range(len(labels)) if labels[i] == c])
            per_class.append(torch.sqrt((rows ** 2).sum(0)))  # L2 over images × tokens
        class_aware[b] = torch.stack(per_class).mean(0).numpy()
        plain[b] = torch.sqrt((torch.cat(feats[b]) ** 2).sum(0)).numpy()
    return class_aware, plain


def test_saliency_matches_explicit_per_class_loops():
    model, ds = tiny(), dataset()
    got = class_channel_norms(model, DataLoader(ds, batch_size=5, shuffle=True))
    class_aware, plain = reference_cais(model, ds)
    np.testing.assert_allclose(got.class_aware, class_aware, rtol=1e-5)
    np.testing.assert_allclose(got.plain, plain, rtol=1e-5)
    assert got.images == 23 and got.class_counts.tolist() == np.bincount(
        ds.tensors[1].numpy()).tolist()
    assert not model.training


def test_missing_class_labels_are_skipped():
    model = tiny()
    images, labels = dataset().tensors
    labels = labels * 2  # classes 0, 2, 4, 6 only: 1, 3, 5 have no images
    got = class_channel_norms(model, DataLoader(TensorDataset(images, labels), batch_size=8))
    ref, _ = reference_cais(model, TensorDataset(images, labels))
    np.testing.assert_allclose(got.class_aware, ref, rtol=1e-5)


def test_top_channels_order_and_ties():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.2], [5, 4, 3, 2, 1]])
    assert sct.top_channels(scores, 2).tolist() == [[1, 3], [0, 1]]
    tie = np.ones((1, 6))
    assert sct.top_channels(tie, 3).tolist() == [[0, 1, 2]]  # ties: lower index first
    # the official rule: keep channels above the (width − 1 − K)-th smallest score
    rng = np.random.default_rng(0)
    s = rng.random((3, 768))
    for row, chosen in zip(s, sct.top_channels(s, 96)):
        threshold = np.sort(row)[768 - 1 - 96]
        assert chosen.tolist() == np.flatnonzero(row > threshold).tolist()


def test_default_k_is_an_eighth_of_the_width(tiny_loader):
    model = tiny()
    method = create_method("sct")
    method.prepare(model, tiny_loader, device=CPU)
    assert [len(c) for c in method.channels] == [6, 6]
    attach_method(model, method)
    assert count_parameters(model, method)["trainable_excl_head"] == 2 * (6 * 6 + 6)
    arts = method.artifacts(model)
    assert arts["channels"].shape == (2, 6)
    assert arts["scores_class_aware"].shape == arts["scores_plain"].shape == (2, 48)
    assert np.array_equal(arts["channels"], sct.top_channels(arts["scores_class_aware"], 6))


def test_vit_b_count_is_111744():
    torch.manual_seed(0)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              weight_init="skip").eval()
    method = create_method("sct")
    assert method.resolve_k(768) == 96
    rng = np.random.default_rng(0)
    method.load_state({"channels": [sorted(rng.choice(768, 96, replace=False).tolist())
                                    for _ in range(12)]})
    attach_method(vit_b, method)
    assert count_parameters(vit_b, method)["trainable_excl_head"] == 111_744  # 12·(96²+96)


def test_module_updates_only_the_selected_channels():
    model = tiny()
    ref = copy.deepcopy(model)
    chans = [[0, 5, 7, 40], [1, 2, 3, 47]]
    method = create_method("sct", {"k": 4, "scale": 0.5})
    method.load_state({"channels": chans})
    attach_method(model, method)
    wrapper = model.blocks[0]
    block = vit_blocks(ref)[0]
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))
        idx = torch.tensor(chans[0])
        upd = h.clone()
        upd[..., idx] = h[..., idx] + 0.5 * (h[..., idx] @ wrapper.adapt.weight.T
                                             + wrapper.adapt.bias)
        expected = upd + block.mlp(block.norm2(upd))
        assert (wrapper(x) - expected).abs().max() < 1e-5
        assert (wrapper(x) - block(x)).abs().max() > 1e-4
    assert wrapper.adapt.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(wrapper.adapt.bias, torch.zeros(4))


def test_bad_states_are_refused():
    model = tiny()
    method = create_method("sct")
    with pytest.raises(RuntimeError, match="prepare"):
        method.attach(model)
    method.load_state({"channels": [[0, 0, 1], [1, 2, 3]]})
    with pytest.raises(ValueError, match="distinct"):
        method.attach(copy.deepcopy(model))
    method.load_state({"channels": [[0, 1, 2]]})
    with pytest.raises(ValueError, match="blocks"):
        method.attach(copy.deepcopy(model))
    with pytest.raises(ValueError, match="exceeds"):
        create_method("sct", {"k": 49}).prepare(model, DataLoader(dataset(), batch_size=8),
                                                device=CPU)


# -- views ----------------------------------------------------------------------------------
def test_jaccard_and_overlap_matrix():
    a = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = np.array([[0, 1, 8, 9], [4, 5, 6, 7]])
    assert sal.jaccard(a, b).tolist() == [2 / 6, 1.0]
    names, m = sal.overlap_matrix({"x": a, "y": b, "z": a})
    assert names == ["x", "y", "z"]
    assert m[0, 1] == m[1, 0] == pytest.approx((2 / 6 + 1) / 2) and m[0, 2] == 1.0
    assert np.allclose(np.diag(m), 1)


def test_chance_jaccard_matches_simulation():
    rng = np.random.default_rng(0)
    width, k = 192, 24
    sims = [sal.jaccard(rng.choice(width, k, replace=False)[None],
                        rng.choice(width, k, replace=False)[None])[0] for _ in range(4000)]
    assert sal.expected_random_jaccard(width, k) == pytest.approx(np.mean(sims), abs=0.005)


def test_class_aware_vs_plain():
    rng = np.random.default_rng(1)
    plain = rng.random((3, 48))
    class_aware = plain.copy()
    class_aware[2] = rng.random(48)  # block 2 disagrees
    sel = sal.ChannelSelection(class_aware, plain, sct.top_channels(class_aware, 6),
                               np.array([5, 5]))
    cmp = sal.class_aware_vs_plain(sel)
    assert cmp["jaccard"][:2].tolist() == [1.0, 1.0] and cmp["jaccard"][2] < 1
    assert cmp["spearman"][:2] == pytest.approx([1.0, 1.0])
    assert cmp["only_class_aware"][0] == []
    ranks = sal.channel_ranks(class_aware)
    assert (ranks[np.arange(3), class_aware.argmax(1)] == 0).all()
    norm = sal.normalised_scores(class_aware)
    assert norm.max(1) == pytest.approx([1, 1, 1])
