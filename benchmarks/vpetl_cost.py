"""Cost of a V-PETL-scale sweep: ViT-B/16 steps timed here, FLOPs counted, GPU-hours estimated.

The plan in docs/sweeps.md: 25 methods × 24 tasks (VTAB-1k's 19, FGVC's 5) × 3 seeds on
ViT-B/16 at 224 px, 100 epochs each (the VPT / V-PETL protocol). For a few representative
methods (default: ``linear``, no backbone gradients; ``lora`` and ``vpt-deep``, frozen
backbone with activation gradients, the latter on 50 more tokens; ``full``, every weight's
gradient) on random-init ViT-B/16 (nothing is downloaded), it measures on this machine

* training images/s (a plain loop of the method's training step, fp32, after one warm-up
  step) and evaluation images/s (eval-mode forward without gradients), at ``--threads``;
* training FLOPs per image (forward + backward of one step) and forward FLOPs per image,
  counted by ``torch.utils.flop_counter`` as ``gpu_suite.py`` counts them;

and from them the sweep's cost: per run (each run trains ``epochs × train`` images,
validates ``epochs × val`` and tests once, as the lab's engine does) in CPU core-hours at
the measured speed, and in GPU-hours **estimated** from the FLOPs at an assumed model FLOPs
utilisation (``--mfu``) of a chip's dense bf16 peak; then how many GPUs finish it in a day.
A PEFT method is costed as the mean of the measured frozen-backbone methods (``--peft-like``).
The machine's load average before and after is recorded: on a shared machine the speeds are
only as good as the quiet spells.

    python benchmarks/vpetl_cost.py [--threads 2] [--batch 8] [--steps 3] [--mfu 0.3]
    python benchmarks/vpetl_cost.py --smoke     # CPU, embedded backbone, 32 px: checks the script
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import median, write_result  # noqa: E402
from gpu_suite import BF16_PEAK_TFLOPS, build, plain_loop, step_flops, synthetic_batches  # noqa: E402

from vpeft_viz.train import TrainConfig, flops_per_image  # noqa: E402

EPOCHS = 100
SEEDS = 3
METHODS = 25
# Test split sizes of VTAB-1k's tasks as distributed with VPT/NOAH (train800 + val200 each).
VTAB_1K_TEST = {
    "cifar100": 10_000, "caltech101": 6_084, "dtd": 1_880, "oxford_flowers102": 6_149,
    "oxford_iiit_pet": 3_669, "svhn": 26_032, "sun397": 21_750, "patch_camelyon": 32_768,
    "eurosat": 5_400, "resisc45": 6_300, "diabetic_retinopathy": 42_670,
    "clevr_count": 15_000, "clevr_distance": 15_000, "dmlab": 22_735, "kitti": 711,
    "dsprites_location": 73_728, "dsprites_orientation": 73_728,
    "smallnorb_azimuth": 12_150, "smallnorb_elevation": 12_150}
# FGVC as split by VPT: (train, val, test).
FGVC = {"cub_200_2011": (5_394, 600, 5_794), "nabirds": (21_536, 2_393, 24_633),
        "oxford_flowers": (1_020, 1_020, 6_149), "stanford_dogs": (10_800, 1_200, 8_580),
        "stanford_cars": (7_329, 815, 8_041)}


def tasks() -> dict[str, tuple[int, int, int]]:
    out = {name: (800, 200, test) for name, test in VTAB_1K_TEST.items()}
    out.update(FGVC)
    return out


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def eval_images_per_s(model, batches) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for i, (x, _) in enumerate(batches):
            t0 = time.perf_counter()
            model(x)
            if i:  # the first forward warms up
                times.append((time.perf_counter() - t0) / len(x))
    return 1.0 / median(times)


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    batches = synthetic_batches(args.steps + 1, args.batch, args.img_size, device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch, warmup_epochs=0.0, device="cpu")
    rows = []
    for name in args.methods:
        model, method, _ = build(name, args.backbone, batches, device)
        flops_train = step_flops(model, method, batches[0], None) / args.batch
        flops_fwd = flops_per_image(model, batches[0][0])
        train_ips = plain_loop(model, method, batches, cfg, None, device)
        eval_ips = eval_images_per_s(model, batches)
        rows.append({"method": name, "train_images_per_s": train_ips,
                     "eval_images_per_s": eval_ips, "train_flops_per_image": flops_train,
                     "forward_flops_per_image": flops_fwd})
        print(f"{name}: train {train_ips:.3g} img/s, eval {eval_ips:.3g} img/s, "
              f"{flops_train / 1e9:.1f} / {flops_fwd / 1e9:.1f} GFLOP per image", flush=True)
        del model, method
    return rows


def plan(rows: list[dict], args: argparse.Namespace) -> dict:
    """The V-PETL sweep's cost from the measured rows (see the module docstring)."""
    by = {r["method"]: r for r in rows}
    peft = [by[m] for m in args.peft_like if m in by] or rows
    typical = {k: sum(r[k] for r in peft) / len(peft) for k in
               ("train_flops_per_image", "forward_flops_per_image")}
    typical["train_s_per_image"] = sum(1 / r["train_images_per_s"] for r in peft) / len(peft)
    typical["eval_s_per_image"] = sum(1 / r["eval_images_per_s"] for r in peft) / len(peft)
    per_task = {}
    for name, (n_train, n_val, n_test) in tasks().items():
        trained, evaluated = args.epochs * n_train, args.epochs * n_val + n_test
        per_task[name] = {
            "images_trained": trained, "images_evaluated": evaluated,
            "flops": trained * typical["train_flops_per_image"]
            + evaluated * typical["forward_flops_per_image"],
            "cpu_hours": (trained * typical["train_s_per_image"]
                          + evaluated * typical["eval_s_per_image"]) / 3600}
    runs = args.methods_total * len(per_task) * args.seeds
    per_seed_method = {k: sum(t[k] for t in per_task.values()) for k in ("flops", "cpu_hours")}
    total_flops = args.methods_total * args.seeds * per_seed_method["flops"]
    gpus = {}
    for chip in ("A100", "H100"):
        rate = BF16_PEAK_TFLOPS[chip] * 1e12 * args.mfu
        hours = total_flops / rate / 3600
        vtab = [t for n, t in per_task.items() if n in VTAB_1K_TEST]
        gpus[chip] = {"peak_bf16_tflops": BF16_PEAK_TFLOPS[chip], "mfu_assumed": args.mfu,
                      "gpu_hours": hours, "gpus_for_24h": math.ceil(hours / 24),
                      "vtab_run_minutes_mean": sum(t["flops"] for t in vtab) / len(vtab)
                      / rate / 60,
                      "nabirds_run_minutes": per_task["nabirds"]["flops"] / rate / 60}
    return {"epochs": args.epochs, "seeds": args.seeds, "methods": args.methods_total,
            "tasks": len(per_task), "runs": runs, "costed_as": [r["method"] for r in peft],
            "typical_method": typical, "per_task": per_task,
            "per_method_and_seed": per_seed_method,
            "total_flops": total_flops,
            "cpu_core_hours_total": args.methods_total * args.seeds
            * per_seed_method["cpu_hours"] * args.threads,
            "gpu_estimate": gpus}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="embedded backbone, 32 px, batch 2, 1 step: checks the script")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--methods", nargs="+", default=["linear", "lora", "vpt-deep", "full"])
    p.add_argument("--peft-like", nargs="+", default=["lora", "vpt-deep"],
                   help="measured methods whose mean costs each of the sweep's methods")
    p.add_argument("--methods-total", type=int, default=METHODS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--mfu", type=float, default=0.3,
                   help="assumed model FLOPs utilisation of the GPU estimate")
    p.add_argument("--out", default="vpetl_cost", help="results/<OUT>.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.img_size, args.batch, args.steps = None, 32, 2, 1
        args.threads = 1
    return args


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    before = load()
    t0 = time.time()
    rows = measure(args)
    return {"backbone": args.backbone or "embedded default", "img_size": args.img_size,
            "batch": args.batch, "steps": args.steps, "threads": args.threads,
            "precision": "fp32", "load_before": before, "load_after": load(),
            "seconds": round(time.time() - t0, 1), "rows": rows, "plan": plan(rows, args)}


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    path = write_result(args.out, run(args))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
