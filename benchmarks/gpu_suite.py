"""Every registered method on ViT-B/16 at 224 px, bf16, against a plain loop and HF PEFT.

One prepared script for a GPU lease (docs/benchmarks.md): for each method and batch size it
trains on synthetic VTAB-layout data already on the device and records

* training images/s through the project's engine (:func:`vpeft_viz.train.fit`) and through
  a plain PyTorch loop doing the same work (same model, method, loss and optimiser; no
  callbacks, no schedule, no per-step host sync) — their ratio is the engine's overhead;
* time to the first step (method preparation, e.g. SPT sensitivity or SCT saliency,
  included) and the allocator's peak memory;
* model FLOPs utilisation: the FLOPs of one training step as counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (forward and backward, what this method
  really computes), times steps/s, over the chip's bf16 peak (``--peak-tflops``);
* for LoRA, HF PEFT's LoRA on the same timm model as a peer, when ``peft`` is installed: PEFT
  wraps the fused ``qkv`` whole (q, k and v), so it is compared at equal trainable
  parameters — rank r on qkv (768·r + r·2304 per block) equals the project's rank r on q
  and v (2·(768·r + r·768)).

``--smoke`` is a CPU configuration that runs in seconds (embedded backbone, 32 px, batch 8,
two measured steps) so CI checks the script end to end; its figures mean nothing.

    python benchmarks/gpu_suite.py                      # on a GPU: ViT-B/16, batch 64 and 128
    python benchmarks/gpu_suite.py --smoke --out gpu_suite_smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import median, write_result  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vpeft_viz.backbones import create_backbone  # noqa: E402
from vpeft_viz.methods import attach_method, count_parameters, create_method, method_names  # noqa: E402
from vpeft_viz.train import Callback, TrainConfig, autocast_dtype, fit, make_optimizer  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; override with --peak-tflops.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
NUM_CLASSES = 100


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def synthetic_batches(n: int, batch: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, backbone: str | None, batches, device: torch.device):
    """Backbone (random init) + method, prepared and attached; the preparation time."""
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=NUM_CLASSES, pretrained=False)
    method = create_method(name)
    t0 = time.perf_counter()
    model.to(device)
    if method.needs_data:
        method.prepare(model, batches, device=device)
    attach_method(model, method)
    sync(device)
    return model.to(device), method, time.perf_counter() - t0


def step_flops(model: nn.Module, method, batch, amp) -> int:
    """FLOPs of one training step (forward + backward) as torch counts them."""
    work = copy.deepcopy(model)
    criterion = nn.CrossEntropyLoss()
    x, y = batch
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss, _ = method.training_loss(work, x, y, criterion)
        loss.backward()
    return int(counter.get_total_flops())


def plain_loop(model: nn.Module, method, batches, cfg: TrainConfig, amp, device) -> float:
    """Images/s of the same work with nothing around it (the speed limit for the engine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    opt = make_optimizer(params, cfg, lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i == 1:  # the first step warms up (allocator, kernels)
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = method.training_loss(model, x, y, criterion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return sum(int(y.numel()) for _, y in batches[1:]) / (time.perf_counter() - t0)


def engine(model: nn.Module, method, batches, cfg: TrainConfig, device) -> tuple[float, float]:
    """Images/s through the project's engine, and the time to its first step."""
    first = []
    t0 = time.perf_counter()

    class FirstStep(Callback):
        def on_step(self, step, total, loss):
            if not first:
                first.append(time.perf_counter() - t0)

    res = fit(model, method, batches, batches[:1], NUM_CLASSES, cfg, callbacks=[FirstStep()],
              device=device)
    return res.images_per_s, first[0] if first else float("nan")


def hf_peft_lora(backbone: str | None, batches, cfg: TrainConfig, amp, device, rank: int):
    """HF PEFT's LoRA on the fused qkv (equal trainable parameters at equal rank)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=NUM_CLASSES, pretrained=False)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"],
                                             modules_to_save=["head"])).to(device)
    lora = create_method("lora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"images_per_s": plain_loop(model, lora, batches, cfg, amp, device),
            "trainable_params": trainable}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    amp = autocast_dtype("auto" if device.type == "cuda" else "fp32", device)
    peak = bf16_peak(device, args.peak_tflops)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_sizes[0], device=device.type,
                      precision="auto" if device.type == "cuda" else "fp32")
    rows = []
    for batch in args.batch_sizes:
        batches = synthetic_batches(args.steps + 1, batch, args.img_size, device)
        for name in args.methods or method_names():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model, method, prep_s = build(name, args.backbone, batches, device)
            counts = count_parameters(model, method)
            flops = step_flops(model, method, batches[0], amp)
            ref = copy.deepcopy(model)
            eng_ips, first_s = engine(model, method, batches, cfg, device)
            peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            plain_ips = plain_loop(ref, method, batches, cfg, amp, device)
            achieved = flops / batch * eng_ips
            row = {"method": name, "batch": batch, "trainable_params": counts["trainable"],
                   "prepare_s": prep_s, "time_to_first_step_s": prep_s + first_s,
                   "engine_images_per_s": eng_ips, "plain_images_per_s": plain_ips,
                   "engine_vs_plain": eng_ips / plain_ips, "step_flops": flops,
                   "achieved_tflops": achieved / 1e12,
                   "mfu": achieved / peak if peak else None, "peak_memory_bytes": peak_mem}
            if name == "lora":
                row["hf_peft"] = hf_peft_lora(args.backbone, batches, cfg, amp, device,
                                              method.config.rank)
                if row["hf_peft"]:
                    row["engine_vs_hf_peft"] = eng_ips / row["hf_peft"]["images_per_s"]
            rows.append(row)
            print(f"{name:<12} b{batch:<4} engine {eng_ips:8.1f} img/s  plain {plain_ips:8.1f}"
                  f"  ×{row['engine_vs_plain']:.2f}  first step {row['time_to_first_step_s']:.2f}s"
                  + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else ""), flush=True)
            del model, ref, method
    return {"device": str(device), "backbone": args.backbone or "embedded default",
            "img_size": args.img_size, "steps": args.steps, "bf16_peak_flops": peak,
            "precision": str(amp) if amp else "fp32", "rows": rows,
            "summary": {"engine_vs_plain_median": median([r["engine_vs_plain"] for r in rows])},
            "targets": {"engine_vs_plain": 0.95, "lora_vs_hf_peft": 1.0, "full_mfu": 0.40}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU, embedded backbone, 32 px, batch 8, 2 steps: checks the script")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--steps", type=int, default=20, help="measured steps (after one warm-up)")
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered one")
    p.add_argument("--peak-tflops", type=float, default=None, help="chip's dense bf16 peak")
    p.add_argument("--out", default="gpu_suite", help="results/<OUT>.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.backbone, args.img_size = "cpu", None, 32
        args.batch_sizes, args.steps = [8], 2
        torch.set_num_threads(1)  # tiny models: more threads only add synchronisation
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    path = write_result(args.out, run(args))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
