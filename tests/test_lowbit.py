"""Low-bit adapters: the computed codebook, the straight-through quantiser, bit packing and the
exact reload of a packed run (in memory and through the run machinery)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vpeft_viz.methods import attach_method, create_method, head_parameters
from vpeft_viz.methods.lowbit import quant
from vpeft_viz.methods.lowbit.quant import QLinear
from vpeft_viz.runs.store import RunStore

# The codes the paper's recipe gives (positive half; the codebook is symmetric).
EXPECTED = {
    1: [0.6745],
    2: [0.3778, 1.2657],
    4: [0.1056, 0.3190, 0.5401, 0.7752, 1.0340, 1.3331, 1.7077, 2.2655],
}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebook_matches_the_papers_values(bits):
    c = quant.codebook(bits)
    assert c.numel() == 2 ** bits
    assert torch.equal(c, -c.flip(0)), "the codebook is symmetric"
    assert c[2 ** (bits - 1):].tolist() == pytest.approx(EXPECTED[bits], abs=1e-4)


def test_8_bit_codebook():
    c = quant.codebook(8)
    assert c.numel() == 256 and bool((c[1:] >= c[:-1]).all())
    assert c[-1].item() == pytest.approx(2.8095, abs=1e-4)
    assert c[0].item() == pytest.approx(-2.8095, abs=1e-4)


def test_each_code_is_the_median_of_its_cell():
    from scipy.stats import norm

    for bits in (1, 2, 4):
        c = quant.codebook(bits).double().numpy()
        t = np.concatenate([[-np.inf], quant.thresholds(bits).double().numpy(), [np.inf]])
        assert np.allclose(t[1:-1], (c[1:] + c[:-1]) / 2, atol=1e-6)
        assert np.allclose(norm.cdf(c), (norm.cdf(t[1:]) + norm.cdf(t[:-1])) / 2, atol=1e-5)


def test_quantise_snaps_to_destandardised_codes():
    torch.manual_seed(0)
    w = torch.randn(16, 8) * 0.3 + 0.1
    q = quant.quantise(w, 2)
    mu, sigma = w.mean(), w.std()
    levels = quant.codebook(2) * sigma + mu
    assert torch.isclose(q.unsqueeze(-1), levels).any(-1).all()
    # every entry goes to the nearest level (thresholds at midpoints)
    nearest = levels[(w.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.allclose(q, nearest)
    assert quant.quantise(w, 32) is w


def test_straight_through_gradient():
    """Same gradient as the textbook STE surrogate ``z + (c − z).detach()``: identity through
    the snap, μ and σ differentiable."""
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 5)
    (quant.quantise(w, 1) * g).sum().backward()
    got = w.grad.clone()

    w2 = w.detach().clone().requires_grad_(True)
    mu, sigma = w2.mean(), w2.std()
    z = (w2 - mu) / (sigma + quant.EPS)
    c = quant.codebook(1)[torch.bucketize(z.detach(), quant.thresholds(1))]
    ((z + (c - z).detach()) * sigma + mu).mul(g).sum().backward()
    assert torch.allclose(got, w2.grad, atol=1e-6)
    assert not torch.allclose(got, g, atol=1e-3), "σ's gradient term is missing"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_codes_round_trip(bits, n):
    rng = np.random.default_rng(n)
    idx = rng.integers(0, 2 ** bits, n)
    data = quant.pack_codes(idx, bits)
    assert len(data) == -(-n * bits // 8)
    assert np.array_equal(quant.unpack_codes(data, n, bits), idx)


def test_pack_codes_rejects_out_of_range():
    with pytest.raises(ValueError, match="does not fit in 1 bits"):
        quant.pack_codes(np.array([0, 2]), 1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_packed_matrices_round_trip_exactly(bits):
    torch.manual_seed(bits)
    layers = [(f"l{i}", QLinear(9, 5 + i, bits)) for i in range(3)]
    for _, layer in layers:
        nn.init.normal_(layer.weight, 0.2, 0.5)
    expected = [layer.effective_weight().detach().clone() for _, layer in layers]
    data = quant.pack_matrices(layers)
    numel = sum(layer.weight.numel() for _, layer in layers)
    payload = sum(quant.payload_bytes(layer.weight.numel(), bits) for _, layer in layers)
    assert len(data) == quant.header_bytes(3) + payload
    if bits < 32:
        assert payload == sum(-(-layer.weight.numel() * bits // 8) + 8 for _, layer in layers)
        assert payload < numel * 4

    fresh = [(n, QLinear(9, 5 + i, bits)) for i, (n, _) in enumerate(layers)]
    got_bits, matrices = quant.unpack_matrices(data, [n for n, _ in fresh])
    assert got_bits == bits
    for (_, layer), m, want in zip(fresh, matrices, expected):
        if bits == 32:
            layer.weight.data.copy_(torch.from_numpy(m.data).view_as(layer.weight))
        else:
            layer.load_codes(torch.from_numpy(m.data), m.mu, m.sigma)
        assert torch.equal(layer.effective_weight(), want)


def test_unpack_rejects_other_layers_and_truncation():
    layers = [("a", QLinear(4, 4, 1)), ("b", QLinear(4, 4, 1))]
    data = quant.pack_matrices(layers)
    with pytest.raises(ValueError, match="other layers"):
        quant.unpack_matrices(data, ["a", "c"])
    with pytest.raises(ValueError, match="truncated"):
        quant.unpack_matrices(data[:-1], ["a", "b"])
    with pytest.raises(ValueError, match="not a packed"):
        quant.unpack_matrices(b"XXXX" + data[4:], ["a", "b"])


def _images(model, n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["bi-adaptformer", "bi-lora"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_packed_reload_gives_identical_logits(name, bits, tiny_vit):
    backbone = copy.deepcopy(tiny_vit)
    method = create_method(name, {"bits": bits, "rank": 6})
    attach_method(tiny_vit, method)
    with torch.no_grad():
        for _, p in method.trainable_parameters(tiny_vit):
            p.add_(torch.randn_like(p) * 0.05)
    x = _images(tiny_vit)
    expected = tiny_vit.eval()(x)

    data, names = method.pack_weights(tiny_vit)
    layers = method.quantised_layers(tiny_vit)
    assert names == {f"{n}.weight" for n, _ in layers}
    assert {n for n, _ in method.trainable_parameters(tiny_vit)} == names
    assert len(data) == method.stored_bytes(tiny_vit) + quant.header_bytes(len(layers))

    method2 = create_method(name, {"bits": bits, "rank": 6})
    torch.manual_seed(99)
    attach_method(backbone, method2)
    backbone.get_classifier().load_state_dict(tiny_vit.get_classifier().state_dict())
    method2.load_packed_weights(backbone, data)
    assert torch.equal(backbone.eval()(x), expected)


def test_low_bit_init():
    torch.manual_seed(0)
    for bits, zero_up in ((1, False), (32, True)):
        m = create_method("bi-adaptformer", {"bits": bits})
        model = nn.Module()
        from vpeft_viz.methods.lowbit.methods import LowBitBranch

        model.branch = LowBitBranch(64, 32, bits, relu=True, dropout=0.1)
        up = model.branch.up.weight
        assert bool((up == 0).all()) == zero_up
        if not zero_up:
            assert up.abs().max() <= 2e-3 and 0.5e-3 < up.std() < 1.5e-3
        assert m.config.rank == 32 and m.config.scale == 1.0


def test_bi_lora_changes_only_query_and_value(tiny_vit):
    method = create_method("bi-lora", {"rank": 4})
    attach_method(tiny_vit, method)
    qkv = tiny_vit.blocks[0].attn.qkv
    h = torch.randn(2, 5, 48)
    base = qkv.base_layer(h)
    out = qkv(h)
    d = 48
    assert torch.equal(out[..., d:2 * d], base[..., d:2 * d])
    assert not torch.allclose(out[..., :d], base[..., :d])
    assert not torch.allclose(out[..., 2 * d:], base[..., 2 * d:])


def test_run_writes_packed_adapter_and_reloads_exactly(vtab_task, tmp_path):
    """A 1-bit Bi-AdaptFormer run on the embedded backbone: ``adapter_bytes`` is the packed
    file, ≤ weights/8 + 1 KiB; the rebuilt model reproduces the test loss exactly."""
    from vpeft_viz.data import resolve_data
    from vpeft_viz.runs.execute import build_loaders, execute_run, make_run_config
    from vpeft_viz.runs.weights import PACKED_WEIGHTS, load_run_model
    from vpeft_viz.train import TrainConfig, evaluate

    cfg = make_run_config(method="bi-adaptformer", data=str(vtab_task), pretrained=False,
                          train={"epochs": 1, "batch_size": 8})
    run = RunStore(tmp_path / "store").create(cfg)
    summary = execute_run(run)
    packed = run.path / PACKED_WEIGHTS
    assert summary["adapter_bytes"] == packed.stat().st_size
    assert summary["head_bytes"] == run.weights_path.stat().st_size
    assert summary["weight_bytes"] == summary["adapter_bytes"] + summary["head_bytes"]
    n = summary["trainable_params_excl_head"]
    assert n == 6 * 2 * 128 * 32
    assert summary["adapter_bytes"] <= n / 8 + 1024

    trained = load_run_model(run)
    assert set(run.load_weights()) == {f"head.{k}" for k, _ in
                                       trained.model.head.named_parameters()}
    assert head_parameters(trained.model)
    task = resolve_data(cfg["data"]["spec"], seed=0)
    train_cfg = TrainConfig.from_dict(cfg["train"])
    loaders = build_loaders(task, trained.model, cfg, train_cfg)
    test = evaluate(trained.model, loaders["test"], task.num_classes, device=torch.device("cpu"))
    assert test.loss == summary["test_loss"] and test.acc == summary["test_acc"]
