"""The Inside page's maths and records: linear CKA (exact and streaming), captum attributions
(completeness, layer IG as captum's LayerIntegratedGradients), attention rollout, the token
probes, per-image predictions and the drill-down's filters, network records and caching
(never into a read-only store), on tiny real runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_vtab_task

from vpeft_viz.analysis.inside import attributions as attr
from vpeft_viz.analysis.inside import examples as ex
from vpeft_viz.analysis.inside import models as mdl
from vpeft_viz.analysis.inside import network as net
from vpeft_viz.analysis.inside import records
from vpeft_viz.analysis.inside.cka import StreamingCKA, linear_cka
from vpeft_viz.methods import attach_method, create_method
from vpeft_viz.probes.attention import attention_rollout, cls_rollout
from vpeft_viz.probes.representations import (
    block_input,
    forward_above,
    layer_names,
    layer_tokens,
)
from vpeft_viz.runs import RunStore
from vpeft_viz.runs.execute import execute_run, make_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


# -- linear CKA ---------------------------------------------------------------------------
def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_cka_of_identical_representations_is_one():
    x = np.random.default_rng(0).normal(size=(50, 7))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 6)), rng.normal(size=(60, 4))
    y = y + 0.8 * x[:, :4]  # related, so the value is far from 0 and 1
    base = linear_cka(x, y)
    assert 0.2 < base < 0.95
    q, r = _orthogonal(6, 2), _orthogonal(4, 3)
    assert linear_cka(3.7 * x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 0.01 * y @ r) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 5 * x @ q) == pytest.approx(1.0, abs=1e-12)
    # not invariant to any invertible map: a stretched copy is no longer identical
    stretch = np.diag([1, 1, 1, 1, 1, 50.0])
    assert linear_cka(x, x @ stretch) < 0.9


def test_cka_of_one_feature_each_is_the_squared_correlation():
    rng = np.random.default_rng(4)
    a = rng.normal(size=40)
    b = 0.5 * a + rng.normal(size=40)
    r = np.corrcoef(a, b)[0, 1]
    assert linear_cka(a[:, None], b[:, None]) == pytest.approx(r ** 2, rel=1e-10)


def test_cka_matches_the_kernel_hsic_formula():
    """Kornblith et al.'s definition on n × n Gram matrices, HSIC = tr(KHLH)/(n−1)²."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    y[:, 0] += x[:, 1]
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, m):
        return np.trace(k @ h @ m @ h) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T
    expected = hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)


def test_streaming_cka_equals_the_exact_value_on_all_rows():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 8)) * 3 + 1000.0  # a large offset: centring must not cancel
    ys = [x @ rng.normal(size=(8, 5)) + rng.normal(size=(500, 5)), rng.normal(size=(500, 4))]
    s = StreamingCKA(2)
    for start in range(0, 500, 64):
        s.add(torch.from_numpy(x[start:start + 64]).float(),
              [y[start:start + 64] for y in ys])
    got = s.values()
    for g, y in zip(got, ys):
        assert g == pytest.approx(linear_cka(np.float32(x), np.float32(y)), abs=2e-5)
    assert got[0] > 0.5 > got[1]


# -- token probes, rollout ----------------------------------------------------------------
def _attached(tiny_vit, method: str):
    m = create_method(method)
    attach_method(tiny_vit, m)
    torch.manual_seed(3)
    with torch.no_grad():  # move the method's parameters off their (identity) init
        for _, p in m.trainable_parameters(tiny_vit):
            p.add_(torch.randn_like(p) * 0.05)
    return tiny_vit.eval()


@pytest.mark.parametrize("method", ["lora", "vpt-deep", "vpt-shallow", "e2vpt", "dyt"])
def test_layer_tokens_drop_prompts_and_the_network_above_a_block_is_the_model(tiny_vit,
                                                                              method):
    model = _attached(tiny_vit, method)
    x = torch.rand(3, 3, 32, 32)
    toks = layer_tokens(model, x)
    assert len(toks) == len(layer_names(model)) == len(model.blocks) + 2
    assert all(t.shape == (3, 17, 48) for t in toks)  # CLS + 16 patches, prompts dropped
    with torch.no_grad():
        assert torch.allclose(model.forward_head(toks[-1]), model(x), atol=1e-5)
        assert torch.allclose(forward_above(model, 1, block_input(model, x, 1)), model(x),
                              atol=1e-5)


def test_rollout_rows_are_distributions_and_identity_attention_rolls_out_to_identity():
    maps = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(3)]
    roll = attention_rollout(maps)
    assert torch.allclose(roll.sum(-1), torch.ones(2, 5), atol=1e-6)
    eye = [torch.eye(5).expand(2, 3, 5, 5) for _ in range(3)]
    assert torch.allclose(attention_rollout(eye), torch.eye(5).expand(2, 5, 5))
    # key-value prompts in front of the keys (E²VPT) are dropped, not rolled through
    kv = [torch.cat([torch.full((2, 3, 5, 2), 0.3), m], -1) for m in maps]
    assert torch.allclose(attention_rollout(kv), roll, atol=1e-6)


def test_cls_rollout_splits_between_patches_and_other_tokens(tiny_vit):
    patches, other = cls_rollout(_attached(tiny_vit, "vpt-deep"), torch.rand(2, 3, 32, 32))
    assert patches.shape == (2, 16) and (patches >= 0).all()
    assert torch.allclose(patches.sum(-1) + other, torch.ones(2), atol=1e-6)
    assert (other > 0).all()  # CLS and the prompts keep some of it


# -- attributions -------------------------------------------------------------------------
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_integrated_gradients_sum_to_the_logit_difference(tiny_vit, baseline):
    model = _attached(tiny_vit, "lora").requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    s = attr.AttributionSettings(steps=16, baseline=baseline)
    out = attr.attribute(model, x, mean=MEAN, std=STD, settings=s, metrics=False)
    base = attr.baseline_image(x, MEAN, STD, baseline)
    with torch.no_grad():
        logits = model(torch.cat([x, base]))
    t = out["target"]
    diff = float(logits[0, t] - logits[1, t])
    assert t == int(logits[0].argmax()) and out["logit_diff"] == pytest.approx(diff, abs=1e-6)
    # completeness within captum's convergence delta, and the delta is small
    assert abs(out["ig_sum"] - diff) <= abs(out["ig_delta"]) + 1e-5
    assert abs(out["ig_delta"]) < 1e-3 * max(1.0, abs(diff))
    assert float(out["ig"].sum()) == pytest.approx(out["ig_sum"], abs=1e-4)
    # the layer map: the network above the block gives the same difference
    assert abs(out["layer_sum"] - diff) <= abs(out["layer_delta"]) + 1e-5
    assert out["ig"].shape == (32, 32) and out["layer"].shape == out["rollout"].shape == (4, 4)


def test_integration_nodes_double_until_the_delta_is_small(tiny_vit):
    model = _attached(tiny_vit, "lora").requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    few = attr.attribute(model, x, mean=MEAN, std=STD, metrics=False,
                         settings=attr.AttributionSettings(steps=4, max_steps=4))
    more = attr.attribute(model, x, mean=MEAN, std=STD, metrics=False,
                          settings=attr.AttributionSettings(steps=4, max_steps=64,
                                                            tolerance=1e-4))
    assert few["ig_steps"] == 4 and more["ig_steps"] > 4
    assert abs(more["ig_delta"]) < abs(few["ig_delta"])
    assert abs(more["ig_delta"]) <= 1e-4 * abs(more["logit_diff"]) or more["ig_steps"] == 64


def test_layer_ig_is_captums_layer_integrated_gradients(tiny_vit):
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model = _attached(tiny_vit, "vpt-deep").requires_grad_(False)
    x, base = torch.randn(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    h = block_input(model, torch.cat([x, base]), 1)
    ours = IntegratedGradients(lambda seq: forward_above(model, 1, seq)).attribute(
        h[:1], baselines=h[1:], target=2, n_steps=16, method="gausslegendre")
    theirs = LayerIntegratedGradients(model, model.blocks[1]).attribute(
        x, baselines=base, target=2, n_steps=16, method="gausslegendre",
        attribute_to_layer_input=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_trust_metrics_are_reported(tiny_vit):
    model = _attached(tiny_vit, "lora").requires_grad_(False)
    s = attr.AttributionSettings(steps=8, infidelity_samples=8, sensitivity_samples=2)
    out = attr.attribute(model, torch.randn(1, 3, 32, 32), mean=MEAN, std=STD, settings=s,
                         label=1)
    for k in ("ig", "layer"):
        assert out[f"{k}_infidelity"] >= 0 and out[f"{k}_sensitivity"] >= 0
        assert 0 <= out[f"{k}_infidelity_rel"] <= 1 + 1e-6  # the best rescaled map ≤ none
    with pytest.raises(ValueError, match="baseline"):
        attr.AttributionSettings(baseline="blur")


# -- tiny real runs -----------------------------------------------------------------------
def make_runs(store: RunStore, task: Path, methods=("linear", "lora", "vpt-deep")) -> list:
    """Finished three-epoch runs of the embedded architecture (random init) on a tiny task."""
    out = []
    for method in methods:
        cfg = make_run_config(method=method, data=str(task), pretrained=False,
                              train={"epochs": 3, "batch_size": 8, "lr": 0.05})
        run = store.create(cfg, run_id=f"colours-{method}-s0")
        execute_run(run)
        out.append(run)
    return out


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inside")
    task = write_vtab_task(root / "colours", num_classes=3, sizes=(24, 9, 12))
    return make_runs(RunStore(root / "store"), task), task


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VPEFT_VIZ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_runs_store_their_test_predictions_and_rebuilt_weights_give_them_again(tiny_runs,
                                                                               cache,
                                                                               tmp_path):
    runs, _ = tiny_runs
    for run in runs:
        stored = ex.cached_predictions(run.path, writable=False)
        assert stored.source == "test phase" and len(stored.labels) == 12
        assert ex.agreement(stored, run.path) is None  # the eval.json confusion, exactly
        copy = tmp_path / run.id
        shutil.copytree(run.path, copy)
        (copy / "artifacts" / "predictions.npz").unlink()  # a run from before they existed
        again = ex.run_predictions(copy, writable=True)
        assert again.source == "recomputed from the weights"
        assert np.array_equal(again.predictions, stored.predictions)
        assert np.allclose(again.confidence, stored.confidence, atol=1e-5)
        assert ex.cached_predictions(copy, writable=True).source == "recomputed from the weights"


def test_read_only_runs_are_never_written_into(tiny_runs, cache):
    runs, _ = tiny_runs
    run = runs[1]
    before = _files(run.path)
    pred = ex.run_predictions(run.path, writable=False)
    s = net.NetworkSettings(images=12, probe_train=24, probe_val=9)
    net.measure_runs([(run.path, False)], s)
    net.fit_probes([(run.path, False)], s)
    attr.run_attribution(run.path, 0, attr.AttributionSettings(steps=4, infidelity_samples=4,
                                                               sensitivity_samples=2),
                         writable=False)
    assert _files(run.path) == before
    assert records.run_dir(run.path, writable=False).is_relative_to(cache)
    assert len(list(records.run_dir(run.path, writable=False).iterdir())) == 3
    assert len(pred.labels) == 12


def test_a_run_without_weights_says_so(tiny_runs, tmp_path, cache):
    runs, _ = tiny_runs
    copy = tmp_path / "no-weights"
    shutil.copytree(runs[1].path, copy)
    (copy / "weights.safetensors").unlink()
    with pytest.raises(mdl.WeightsNotStored, match="weights are not stored"):
        mdl.load_view_model(copy)
    assert ex.run_predictions(copy, writable=True).source == "test phase"  # still shown
    (copy / "artifacts" / "predictions.npz").unlink()
    with pytest.raises(mdl.WeightsNotStored):
        ex.run_predictions(copy, writable=True)


def test_network_records_cka_features_and_probes(tiny_runs, cache, monkeypatch):
    runs, _ = tiny_runs
    s = net.NetworkSettings(images=12, batch_size=5, probe_train=24, probe_val=9)
    pairs = [(r.path, False) for r in runs]
    recs = net.measure_runs(pairs, s)
    linear, lora, vpt = (recs[str(r.path)] for r in runs)
    assert linear["layers"][0] == "embedding" and len(linear["layers"]) == 8
    # linear probing leaves the backbone as it was; the others only above the embedding
    assert np.allclose(linear["cka_tokens"], 1, atol=1e-6)
    assert np.allclose(linear["cka_cls"][1:], 1, atol=1e-5)
    assert np.isnan(linear["cka_cls"][0])  # the CLS entering block 1 is the same for every
    # image: no similarity is defined for a constant representation
    assert lora["cka_tokens"].min() < 0.99  # LoRA moved the blocks it adapts
    assert vpt["cka_tokens"][-1] < 1 - 1e-5  # (a random-init backbone barely attends to them)
    for rec in (lora, vpt):
        assert rec["cka_tokens"][0] == pytest.approx(1, abs=1e-5)
        assert ((rec["cka_tokens"] > 0) & (rec["cka_tokens"] <= 1 + 1e-6)).all()
        assert rec["cls"].shape == (12, 8, 128) and len(rec["labels"]) == 12
    # kept: asked again, nothing is recomputed
    monkeypatch.setattr(net, "token_cka", lambda *a, **k: pytest.fail("recomputed"))
    assert set(net.measure_runs(pairs, s)) == {str(r.path) for r in runs}
    probes = net.fit_probes(pairs, s)
    assert set(probes) == {str(r.path) for r in runs} | {"frozen"}
    for rec in probes.values():
        assert len(rec["test_acc"]) == 8 and all(0 <= a <= 1 for a in rec["test_acc"])
        assert set(rec["c"]) <= set(s.probe_c)
    assert probes[str(runs[0].path)]["test_acc"][:7] == probes["frozen"]["test_acc"][:7]


def test_a_record_from_other_weights_is_not_used(tiny_runs, tmp_path, cache):
    runs, _ = tiny_runs
    copy = tmp_path / "retrained"
    shutil.copytree(runs[1].path, copy)
    s = net.NetworkSettings(images=6)
    net.measure_runs([(copy, True)], s)
    assert net.load_network(copy, s, writable=True) is not None
    assert net.load_network(copy, net.NetworkSettings(images=5), writable=True) is None
    state = copy / "weights.safetensors"
    state.write_bytes(state.read_bytes() + b" ")  # other weights
    assert net.load_network(copy, s, writable=True) is None


def test_attributions_are_kept_per_run_and_image(tiny_runs, cache, monkeypatch):
    runs, _ = tiny_runs
    s = attr.AttributionSettings(steps=4, infidelity_samples=4, sensitivity_samples=2)
    first = attr.run_attribution(runs[2].path, 3, s, writable=False)
    monkeypatch.setattr(attr, "attribute", lambda *a, **k: pytest.fail("recomputed"))
    again = attr.run_attribution(runs[2].path, 3, s, writable=False)
    assert np.array_equal(first["ig"], again["ig"]) and again["target"] == first["target"]
    assert again["layer_tokens"] == 65 + 10  # VPT-deep's 10 prompts were in the sequence


def test_embeddings_in_two_dimensions():
    x = np.random.default_rng(0).normal(size=(20, 6))
    for method in net.EMBEDDINGS:
        assert net.embed_2d(x, method).shape == (20, 2)
    with pytest.raises(ValueError, match="unknown embedding"):
        net.embed_2d(x, "umap")


# -- the drill-down's filters -------------------------------------------------------------
def _preds(pred, labels=(0, 1, 2, 0, 1)):
    labels = np.array(labels)
    return ex.Predictions(labels, np.array(pred), np.full(len(labels), 0.5, np.float32),
                          ["cat", "dog", "owl"], "test phase")


def test_filters_select_the_right_images():
    p = {"a": _preds([0, 2, 2, 1, 1]), "b": _preds([1, 1, 2, 1, 0])}
    assert ex.select(p, "all").tolist() == [0, 1, 2, 3, 4]
    assert ex.select(p, "A-not-B", a="a", b="b").tolist() == [1]
    assert ex.select(p, "A-not-B", a="b", b="a").tolist() == [0, 4]
    assert ex.select(p, "all-wrong").tolist() == [3]
    assert ex.select(p, "class", true=0).tolist() == [0, 3]
    assert ex.select(p, "cell", true=0, predicted=1).tolist() == [0, 3]
    assert ex.select(p, "cell", true=0, predicted=1, by="a").tolist() == [3]
    # Compare's cell of the group sums its seeds: (image, run) pairs
    assert ex.cell_pairs(p, 0, 1) == 3 == sum(q.confusion()[0, 1] for q in p.values())
    with pytest.raises(ValueError, match="other images"):
        ex.select({"a": _preds([0] * 5), "c": _preds([0] * 5, labels=(1, 1, 1, 1, 1))}, "all")
    with pytest.raises(ValueError, match="pick a class"):
        ex.select(p, "class", true=7)
    assert "true cat" in ex.caption(p, {"a": "lora"}, 0) and "✗ lora: cat" not in \
        ex.caption(p, {"a": "lora"}, 0)


def test_a_clicked_confusion_cell_names_its_classes():
    q = ex.cell_query([{"x": "dog", "y": "cat", "customdata": [0.0, 1.0, 3.0, 0.5]}],
                      ["cat", "dog", "owl"], task="pets", run_ids=["r1", "r2"])
    assert q == {"task": "pets", "runs": ["r1", "r2"], "tab": "Examples", "filter": "cell",
                 "true": "cat", "pred": "dog", "by": "any"}
    assert ex.cell_query([], ["cat"], task="pets", run_ids=["r1"]) is None


# -- figures ------------------------------------------------------------------------------
def test_attribution_maps_of_all_runs_share_one_colour_scale_per_row():
    from vpeft_viz.plots import inside as plots

    maps = {"lora": {"ig": np.full((8, 8), 0.5), "layer": -np.ones((2, 2)),
                     "rollout": np.full((2, 2), 0.25)},
            "ssf": {"ig": np.full((8, 8), -2.0), "layer": np.ones((2, 2)) * 0.1,
                    "rollout": np.full((2, 2), 0.1)}}
    fig = plots.attribution_grid(np.zeros((8, 8, 3)), maps, {"lora": "LoRA"})
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (-2.0, 2.0)
    assert (fig.layout.coloraxis2.cmin, fig.layout.coloraxis2.cmax) == (-1.0, 1.0)
    assert (fig.layout.coloraxis3.cmin, fig.layout.coloraxis3.cmax) == (0.0, 0.25)
    assert len(fig.data) == 2 * 4  # per run: the image and three maps
    curves = plots.cka_curves(["embedding", "block 1"], {"a": [1.0, 0.9], "b": [1.0, 0.99]})
    assert len(curves.data) == 2 and curves.layout.yaxis.range[0] < 0.9 < 1
    emb = plots.embeddings({"frozen backbone": np.zeros((4, 2)), "lora": np.ones((4, 2))},
                           np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert sum(t.showlegend for t in emb.data) == 3  # one legend entry per class
