"""DyT inference: wall-clock speed-up of real token skipping against the FLOP reduction.

For each backbone (the embedded default with its shipped weights when present, and
``vit_base_patch16_224`` with random weights) DyT is attached and its dispatchers' biases are
set so that a chosen share of patch tokens is kept (calibrated on the benchmark images:
the bias is minus that quantile of the logits, so images still keep different counts).
Three eval-mode forwards are timed on the same images, interleaved rep by rep so that load
from other processes hits them alike:

* ``skip``: DyT as the lab runs it, gather → MLP → scatter, skipped tokens never reach it;
* ``masked``: the release's eval path, the MLP on every token times the 0/1 mask;
* ``complete``: the same model without skipping (no dispatcher, every token through the MLP).

speed-up = median(complete) / median(skip); FLOP reduction = FLOPs(complete) / mean FLOPs
per image of the skipping model, counted by torch's FLOP counter from the tokens processed
(matmuls only: LayerNorm, GELU, softmax and the gather/scatter are not FLOPs there). The goal
from the DyT issue is speed-up ≥ 0.8 × FLOP reduction. The machine's load average before and
after is recorded: on a shared machine medians are only as good as the quiet spells.

    python benchmarks/dyt_speed.py [--threads 2] [--reps-b1 20] [--reps-batch 5]
                                   [--rates 0.5] [--skip-vit-b]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import median, write_result  # noqa: E402

BATCHES = (1, 64)
PATHS = ("skip", "masked", "complete")


def set_keep_rate(model, images, rate: float) -> None:
    """Bias each dispatcher so that ``rate`` of the patch tokens of ``images`` are kept."""
    import torch

    from vpeft_viz.methods.dyt import dyt_blocks, dyt_paths

    blocks = dyt_blocks(model)
    with torch.no_grad():
        for b in blocks:
            b.dispatcher.bias.zero_()
        for i, b in enumerate(blocks):  # layer by layer: each layer's input depends on the last
            with dyt_paths(model, gather=True):
                model(images)
            logits = torch.logit(blocks[i].last_prob.clamp(1e-6, 1 - 1e-6)).flatten()
            b.dispatcher.bias.fill_(-float(torch.quantile(logits.double(), 1 - rate)))


def time_paths(model, x, reps: int) -> dict[str, float]:
    import torch

    from vpeft_viz.methods.dyt import dyt_paths

    settings = {"skip": dict(route="dispatch", gather=True),
                "masked": dict(route="dispatch", gather=False),
                "complete": dict(route="complete")}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    with torch.no_grad():
        for p in PATHS:  # warm-up
            with dyt_paths(model, **settings[p]):
                model(x)
        for _ in range(reps):
            for p in PATHS:
                with dyt_paths(model, **settings[p]):
                    t0 = time.perf_counter()
                    model(x)
                    times[p].append(time.perf_counter() - t0)
    return {f"{p}_ms": 1000 * median(times[p]) for p in PATHS} | {
        f"{p}_ms_all": [round(1000 * t, 3) for t in times[p]] for p in PATHS}


def bench_backbone(name: str, *, pretrained: bool, rates: list[float], reps_b1: int,
                   reps_batch: int) -> list[dict]:
    import numpy as np
    import torch

    from vpeft_viz.backbones import create_backbone, image_size
    from vpeft_viz.methods import attach_method, create_method
    from vpeft_viz.methods.dyt import dyt_blocks, dyt_paths, flops_model

    torch.manual_seed(0)
    model = create_backbone(name, num_classes=10, pretrained=pretrained)
    attach_method(model, create_method("dyt"))
    model.eval()
    size = image_size(model)
    images = torch.randn(max(BATCHES), 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for rate in rates:
        set_keep_rate(model, images, rate)
        fm = flops_model(model, images[:1])
        with torch.no_grad(), dyt_paths(model, gather=True):
            model(images)
            kept = sum(b.last_mask.sum(-1) for b in dyt_blocks(model)).numpy()
        flops = fm.of(kept)
        for batch in BATCHES:
            x = images[:batch]
            t = time_paths(model, x, reps_b1 if batch == 1 else reps_batch)
            mean_flops = float(np.mean(flops[:batch]))
            reduction = fm.complete / mean_flops
            speedup = t["complete_ms"] / t["skip_ms"]
            rows.append({
                "backbone": name, "pretrained": pretrained, "target_keep_rate": rate,
                "kept_rate": float(kept[:batch].sum() / (batch * len(dyt_blocks(model))
                                                         * dyt_blocks(model)[0].last_mask
                                                         .shape[-1])),
                "batch": batch, "flops_complete": fm.complete, "flops_skip_mean": mean_flops,
                "flop_reduction": reduction, "speedup_vs_complete": speedup,
                "speedup_vs_masked": t["masked_ms"] / t["skip_ms"],
                "speedup_over_flop_reduction": speedup / reduction,
                "meets_0.8_goal": bool(speedup >= 0.8 * reduction), **t})
            print(f"{name} keep {rate:.2f} batch {batch}: skip {t['skip_ms']:.1f} ms, complete "
                  f"{t['complete_ms']:.1f} ms, masked {t['masked_ms']:.1f} ms → speed-up "
                  f"{speedup:.2f}× vs FLOP reduction {reduction:.2f}×", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps-b1", type=int, default=20)
    p.add_argument("--reps-batch", type=int, default=5)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5],
                   help="shares of patch tokens kept (ViT-B: the first only)")
    p.add_argument("--embedded-rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--skip-vit-b", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vpeft_viz.backbones import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS

    load_before = os.getloadavg()
    t0 = time.time()
    rows = bench_backbone(EMBEDDED_BACKBONE, pretrained=EMBEDDED_WEIGHTS.is_file(),
                          rates=args.embedded_rates, reps_b1=args.reps_b1,
                          reps_batch=args.reps_batch)
    if not args.skip_vit_b:
        rows += bench_backbone("vit_base_patch16_224", pretrained=False, rates=args.rates[:1],
                               reps_b1=args.reps_b1, reps_batch=args.reps_batch)
    path = write_result("dyt_speed", {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": "cpu", "threads": args.threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_s": round(time.time() - t0, 1),
        "note": "medians over interleaved reps; speed-up = complete / skip; FLOPs counted "
                "by torch's FLOP counter (matmuls) from the tokens each image processed",
        "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
