"""SPT sensitivity on the embedded default (target: ≤ 20 s on 2 CPU cores, the SPT issue).

Times :func:`vpeft_viz.methods.spt.compute_sensitivity` — the official recipe: 16
mini-batches of 32 training images in file order, fresh head, train mode, ``s += g²`` — on
the embedded backbone and one embedded task, median of ``--repeats`` runs after one
warm-up. The allocation and the stored record (what ``prepare`` does after the scores) are
timed too, as is process CPU time, and the machine's load average is recorded: on a shared
machine, wall time over CPU time ÷ threads shows how much the neighbours took.

Without the embedded weights file the backbone is random-init: the timing is the same.

    python benchmarks/spt_sensitivity.py [--task digits] [--repeats 3] [--threads 2]
                                         [--random-init]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import median, write_result  # noqa: E402

TARGET_S = 20.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", help="embedded task")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--random-init", action="store_true",
                   help="skip the shipped weights (the timing is the same)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vpeft_viz.backbones import (
        EMBEDDED_BACKBONE,
        EMBEDDED_WEIGHTS,
        create_backbone,
        image_size,
        input_stats,
    )
    from vpeft_viz.data import resolve_data
    from vpeft_viz.data.dataset import ImageDataset, make_loader
    from vpeft_viz.methods import create_method, spt

    task = resolve_data(f"embedded:{args.task}")
    pretrained = EMBEDDED_WEIGHTS.is_file() and not args.random_init
    model = create_backbone(num_classes=task.num_classes, pretrained=pretrained)
    mean, std = input_stats(model)
    train = ImageDataset(task.splits["train"], image_size=image_size(model), mean=mean,
                         std=std, num_classes=task.num_classes)
    train.preload()
    loader = make_loader(train, batch_size=64, shuffle=True, seed=0)  # as a run's loader
    cfg = create_method("spt-lora").config
    load0 = os.getloadavg()

    def once() -> tuple[float, float, float, object]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        scores, info = spt.compute_sensitivity(model, loader, batches=cfg.sensitivity_batches,
                                               batch_size=cfg.sensitivity_batch_size,
                                               seed=cfg.seed)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        t1 = time.perf_counter()
        units = spt.scored_units(model)
        table = spt.SortedScores(units, scores)
        spt.allocate(units, scores, budget=round(cfg.budget_fraction *
                                                 sum(u.numel for u in units)),
                     alpha=cfg.alpha, beta=cfg.beta, kind="lora", rank=cfg.rank,
                     cls_token=spt.cls_token_cost(model), strict=False, table=table)
        spt.sensitivity_summary(table, "lora", cfg.rank)
        return wall, cpu, time.perf_counter() - t1, info

    once()  # warm-up (allocator, thread pool)
    walls, cpus, rest = [], [], []
    for i in range(args.repeats):
        wall, cpu, after, info = once()
        walls.append(wall)
        cpus.append(cpu)
        rest.append(after)
        print(f"repeat {i + 1}: sensitivity {wall:.2f} s (cpu {cpu:.1f} s), "
              f"allocation + record {after:.2f} s", file=sys.stderr)
    result = {
        "target_s": TARGET_S, "task": args.task, "backbone": EMBEDDED_BACKBONE,
        "pretrained_weights": pretrained, "threads": args.threads,
        "batches": info.batches, "batch_size": info.batch_size, "images": info.images,
        "sensitivity_s": walls, "sensitivity_median_s": median(walls),
        "sensitivity_min_s": min(walls),
        "sensitivity_cpu_s": cpus,
        "cpu_bound_estimate_s": median(cpus) / args.threads,
        "allocation_and_record_s": rest, "allocation_and_record_median_s": median(rest),
        "load_average_before": load0, "load_average_after": os.getloadavg(),
        "meets_target": median(walls) <= TARGET_S,
    }
    path = write_result("spt_sensitivity", result)
    print(f"median {result['sensitivity_median_s']:.2f} s (target ≤ {TARGET_S:.0f} s); "
          f"CPU time / threads {result['cpu_bound_estimate_s']:.2f} s → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
