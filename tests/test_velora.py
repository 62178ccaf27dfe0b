"""VeLoRA (docs/methods.md): the forward and the input gradient are LoRA's, the weight
gradient is the compressed one, exact for sub-tokens of size 1, and a training step keeps
fewer bytes for backward than LoRA's; the memory probe counts what autograd saves; a run
records the memory and the gradient comparison and rebuilds ``v`` on reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vpeft_viz.methods import attach_method, create_method, trainable_state
from vpeft_viz.methods.lora import LoRAQKV
from vpeft_viz.methods.velora import (
    VeLoRAQKV,
    measure_memory,
    probe_steps,
    velora_modules,
)
from vpeft_viz.probes.memory import count_saved_tensors, measure_training_step, model_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

D, RANK, SCALING = 48, 4, 2.0  # alpha / rank


def pair(groups: int, scale: float = 1.0, seed: int = 0) -> tuple[LoRAQKV, VeLoRAQKV]:
    """A LoRA and a VeLoRA module on the same frozen qkv with the same (non-zero) weights."""
    torch.manual_seed(seed)
    base = nn.Linear(D, 3 * D).requires_grad_(False)
    lora = LoRAQKV(copy.deepcopy(base), RANK, RANK * SCALING, 0.0, "qv")
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_(0, 0.1)
    vel = VeLoRAQKV(copy.deepcopy(base), RANK, RANK * SCALING, 0.0, "qv", groups, scale)
    vel.load_state_dict(lora.state_dict(), strict=False)
    return lora.train(), vel.train()


def inputs(seed: int = 1, fp16_exact: bool = False) -> torch.Tensor:
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(seed)) + 0.3
    return (x * 64).round() / 64 if fp16_exact else x  # multiples of 1/64: exact in fp16


def run(module: nn.Module, x: torch.Tensor, weight: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of ``sum(module(x) * weight)``."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


def expected_weight_grads(vel: VeLoRAQKV, x: torch.Tensor, weight: torch.Tensor,
                          v: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """By hand: g_t = scaling · weight_t B_t; ∂L/∂A_t = scale · Σ g ĥᵀ with ĥ = fp16(⟨s, v⟩)·v."""
    s = x.reshape(-1, v.numel())
    h_hat = ((s @ v).half().float()[:, None] * v[None]).reshape(-1, D)
    out = {}
    for i, t in ((0, "q"), (2, "v")):
        g = SCALING * weight[..., i * D:(i + 1) * D].reshape(-1, D) @ vel.lora_B[t].detach()
        out[t] = scale * g.T @ h_hat
    return out


def test_forward_and_input_gradient_equal_loras():
    lora, vel = pair(groups=16)
    x = inputs()
    weight = torch.randn(3, 7, 3 * D, generator=torch.Generator().manual_seed(2))
    out_l, gx_l = run(lora, x, weight)
    out_v, gx_v = run(vel, x, weight)
    assert torch.equal(out_v, out_l)
    assert torch.equal(gx_v, gx_l)
    for t in "qv":  # the up-projections keep their exact input too
        assert torch.equal(vel.lora_B[t].grad, lora.lora_B[t].grad)
        assert not torch.allclose(vel.lora_A[t].grad, lora.lora_A[t].grad, rtol=1e-2)
    vel.eval()  # evaluation is plain LoRA
    with torch.no_grad():
        assert torch.equal(vel(x), lora.eval()(x))


def test_equal_to_lora_under_bf16_autocast():
    """As training runs on a GPU (here CPU autocast): the output and the input gradient are
    LoRA's bit for bit. The input is not a leaf, as in a ViT (a leaf's cast is cached and
    shared by the base projection, which sums its gradients in bf16)."""
    lora, vel = pair(groups=16)
    weight = torch.randn(3, 7, 3 * D, generator=torch.Generator().manual_seed(2))
    got = []
    for m in (lora, vel):
        x = inputs().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x * 1.0)
        (out.float() * weight).sum().backward()
        got.append((out, x.grad))
    assert got[0][0].dtype == torch.bfloat16
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    for t in "qv":
        assert torch.equal(vel.lora_B[t].grad, lora.lora_B[t].grad)
        assert vel.lora_A[t].grad.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_weight_gradient_is_the_compressed_one(scale):
    lora, vel = pair(groups=12, scale=scale)
    x = inputs()
    weight = torch.randn(3, 7, 3 * D, generator=torch.Generator().manual_seed(2))
    run(vel, x, weight)
    v = F.normalize(x.reshape(-1, D // 12).mean(0), dim=0)  # the first batch's mean sub-token
    torch.testing.assert_close(vel.velora_v, v, rtol=1e-6, atol=1e-7)
    assert vel.velora_v.shape == (D // 12,)
    expected = expected_weight_grads(vel, x, weight, v, scale)
    for t in "qv":
        torch.testing.assert_close(vel.lora_A[t].grad, expected[t], rtol=1e-5, atol=1e-6)

    # v stays frozen: a second batch uses it as it is
    vel.zero_grad(set_to_none=True)
    v = vel.velora_v.clone()
    x2 = inputs(seed=5) * 2 - 1
    run(vel, x2, weight)
    assert torch.equal(vel.velora_v, v)
    expected = expected_weight_grads(vel, x2, weight, vel.velora_v, scale)
    for t in "qv":
        torch.testing.assert_close(vel.lora_A[t].grad, expected[t], rtol=1e-5, atol=1e-6)


def test_subtokens_of_size_one_reconstruct_exactly():
    lora, vel = pair(groups=D)  # G = D: every sub-token is one number
    weight = torch.randn(3, 7, 3 * D, generator=torch.Generator().manual_seed(2))
    x = inputs(fp16_exact=True)
    run(lora, x, weight)
    run(vel, x, weight)
    assert vel.velora_v.abs().tolist() == [1.0]  # v = ±1: ĥ = z·v = s
    for t in "qv":  # exact inputs in fp16: the same gradient, bit for bit
        assert torch.equal(vel.lora_A[t].grad, lora.lora_A[t].grad)
    for m in (lora, vel):
        m.zero_grad(set_to_none=True)
    x = inputs(seed=3)  # any input: LoRA's gradient up to fp16 rounding of the input
    run(lora, x, weight)
    run(vel, x, weight)
    for t in "qv":
        torch.testing.assert_close(vel.lora_A[t].grad, lora.lora_A[t].grad, rtol=2e-3,
                                   atol=2e-3)


def test_saved_for_backward_bytes_are_lower_than_loras():
    lora, vel = pair(groups=16)
    x = inputs().requires_grad_(True)
    saved = {}
    for name, m in (("lora", lora), ("velora", vel)):
        with count_saved_tensors(model_tensors(m)) as s:
            out = m(x)
        saved[name] = s
        del out
    n = x.numel() // D  # tokens
    # LoRA keeps x (fp32, D per token) once for both down-projections; VeLoRA G fp16 numbers
    assert saved["lora"].activation_bytes - saved["velora"].activation_bytes == (
        n * D * 4 - n * 16 * 2)
    assert saved["velora"].by_dtype.get("float16") == n * 16 * 2


def test_a_model_step_keeps_less_than_lora(tiny_vit):
    method = create_method("velora", {"groups": 16})
    attach_method(tiny_vit, method)
    tiny_vit.train()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 5
    rec = measure_memory(tiny_vit, x, y, nn.CrossEntropyLoss())
    depth, n = len(tiny_vit.blocks), 8 * 17
    assert rec["saved_bytes_lora"] - rec["saved_bytes_velora"] == depth * (n * 48 * 4 - n * 16 * 2)
    assert rec["z_bytes"] == depth * n * 16 * 2
    assert rec["memory_batch_size"] == 8 and rec["memory_tokens"] == 17
    assert "peak_step_bytes_velora" not in rec  # CPU: no allocator peak
    assert all(m.v_ready for m in velora_modules(tiny_vit))  # v from this batch
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_probe_counts_each_storage_once():
    w = nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with count_saved_tensors([w]) as s:
        a = x @ w  # saves x and w
        b = (x * 3.0).sum() + (x[:2] @ w).sum()  # x again (a view of it), w again
        loss = a.sum() + b
    assert s.tensors >= 4 and s.storages == 2
    assert s.bytes == x.numel() * 4 + w.numel() * 4
    assert s.excluded_bytes == w.numel() * 4 and s.activation_bytes == x.numel() * 4
    del loss


def test_step_measurement_clears_gradients_and_skips_the_cpu_peak(tiny_vit):
    tiny_vit.train()
    x = torch.rand(2, 3, 32, 32)
    m = measure_training_step(tiny_vit, lambda: tiny_vit(x).sum(), device=torch.device("cpu"))
    assert m.peak_bytes is None and m.start_bytes is None
    assert m.saved.activation_bytes > 0
    assert all(p.grad is None for p in tiny_vit.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_measured(tiny_vit):
    device = torch.device("cuda")
    method = create_method("velora", {"groups": 16})
    attach_method(tiny_vit, method)
    tiny_vit.to(device).train()
    x = torch.rand(16, 3, 32, 32, device=device)
    y = torch.arange(16, device=device) % 5
    rec = measure_memory(tiny_vit, x, y, nn.CrossEntropyLoss())
    assert 0 < rec["peak_step_bytes_velora"] and 0 < rec["peak_step_bytes_lora"]
    assert rec["saved_bytes_velora"] < rec["saved_bytes_lora"]


def test_probing_does_not_change_the_update():
    _, vel = pair(groups=12)
    x = inputs()
    weight = torch.randn(3, 7, 3 * D, generator=torch.Generator().manual_seed(2))
    run(vel, x, weight)
    plain = {t: vel.lora_A[t].grad.clone() for t in "qv"}
    vel.zero_grad(set_to_none=True)
    vel.probe = True
    run(vel, x, weight)
    for t in "qv":
        assert torch.equal(vel.lora_A[t].grad, plain[t])
    cos_q, cos_v, energy = vel.probe_results
    lora, _ = pair(groups=12)
    run(lora, x, weight)
    for res, t in ((cos_q, "q"), (cos_v, "v")):
        exact, approx = lora.lora_A[t].grad.flatten(), plain[t].flatten()
        assert res["cos"] == pytest.approx(float(F.cosine_similarity(exact, approx, dim=0)),
                                           abs=1e-5)
        assert res["ratio"] == pytest.approx(float(approx.norm() / exact.norm()), rel=1e-5)
        assert 0 < res["cos"] < 1
        # the compressed gradient is the exact one projected (rows' sub-tokens onto v):
        # ‖compressed‖ / ‖exact‖ = cosine, up to z's fp16 rounding
        assert res["ratio"] == pytest.approx(res["cos"], rel=1e-3)
    s = x.reshape(-1, 4)
    z = (s @ vel.velora_v).half().float()
    assert energy["energy"] == pytest.approx(float((z ** 2).sum() / (s ** 2).sum()), rel=1e-4)


def test_probe_schedule():
    assert probe_steps(0) == {}
    assert probe_steps(2) == {0: 0, 1: 0}  # too short to skip the first step
    assert probe_steps(6) == {1: 0, 2: 0, 3: 0, 4: 2, 5: 3}  # short: points overlap
    plan = probe_steps(100, points=5, batches=3)  # from the second step (B = 0 at the first)
    assert sorted(plan) == [1, 2, 3, 25, 26, 27, 49, 50, 51, 73, 74, 75, 97, 98, 99]
    assert [plan[s] for s in (1, 25, 49, 73, 97)] == [0, 1, 2, 3, 4]


def test_groups_must_divide_the_width(tiny_vit):
    with pytest.raises(ValueError, match=r"velora\.groups = 32 must divide .* width 48"):
        attach_method(tiny_vit, create_method("velora"))


def test_loaded_v_is_kept(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    method = create_method("velora", {"groups": 16})
    attach_method(tiny_vit, method)
    tiny_vit.train()
    tiny_vit(torch.rand(4, 3, 32, 32)).sum().backward()
    state = trainable_state(tiny_vit)
    assert sum(k.endswith("velora_v") for k in state) == len(tiny_vit.blocks)
    attach_method(model, create_method("velora", {"groups": 16}))
    model.load_state_dict(state, strict=False)
    model.train()
    model(torch.rand(4, 3, 32, 32) * 5).sum().backward()  # another batch: v is not retaken
    for a, b in zip(velora_modules(tiny_vit), velora_modules(model)):
        assert torch.equal(a.velora_v, b.velora_v) and a.v_ready


def test_a_run_records_memory_and_gradients_and_reloads_v(tmp_path):
    from conftest import write_vtab_task

    from vpeft_viz.runs import RunStore
    from vpeft_viz.runs.execute import execute_run, make_run_config
    from vpeft_viz.runs.weights import load_run_model

    task = write_vtab_task(tmp_path / "colours", sizes=(16, 6, 6))
    cfg = make_run_config(method="velora", data=str(task), pretrained=False,
                          train={"epochs": 3, "batch_size": 8, "eval_batch_size": 8})
    run = RunStore(tmp_path / "store").create(cfg)
    execute_run(run)
    art = run.load_artifact("method.npz")
    width, depth, groups = 128, 6, 32  # the embedded backbone, the default G
    n = 8 * 65  # batch × tokens
    assert int(art["groups"]) == groups and int(art["memory_batch_size"]) == 8
    assert int(art["saved_bytes_lora"]) - int(art["saved_bytes_velora"]) == (
        depth * (n * width * 4 - n * groups * 2))
    assert int(art["z_bytes"]) == depth * n * groups * 2
    steps = probe_steps(6)  # 2 steps per epoch, 3 epochs: steps 2 to 6 are probed
    assert art["grad_steps"].tolist() == [s + 1 for s in sorted(steps)]
    assert art["grad_cos"].shape == art["grad_norm_ratio"].shape == (len(steps), depth, 2)
    assert np.all(np.abs(art["grad_cos"]) <= 1 + 1e-6) and np.all(art["grad_norm_ratio"] > 0)
    assert art["captured_energy"].shape == (len(steps), depth)
    assert np.all((art["captured_energy"] > 0) & (art["captured_energy"] <= 1 + 1e-3))
    assert art["v"].shape == (depth, width // groups)
    np.testing.assert_allclose(np.linalg.norm(art["v"], axis=1), 1, rtol=1e-5)

    rebuilt = load_run_model(run)
    v = np.stack([m.velora_v.numpy() for m in velora_modules(rebuilt.model)])
    np.testing.assert_array_equal(v, art["v"])


def test_memory_benchmark_smoke():
    """benchmarks/velora_memory.py in its smoke configuration (embedded backbone, random
    init, batch 4): the script runs end to end and its rows hold the exact difference."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("velora_memory", bench / "velora_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.run(module.parse(["--smoke"]))
    finally:
        sys.path.remove(str(bench))
    assert [r["groups"] for r in result["rows"]] == [8, 32, 128]
    n = 4 * 65  # batch × tokens of the embedded backbone
    for r in result["rows"]:
        kept = r["saved_bytes_lora"] - r["saved_bytes_velora"]
        assert kept == 6 * n * (128 * 4 - r["groups"] * 2)
        assert "peak_step_bytes_velora" not in r
