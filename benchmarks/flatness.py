"""Time the flatness measurements on the embedded backbone.

A 21×21 2-D loss landscape on 256 validation images of ``embedded:digits`` and the Hessian's
top eigenvalue (Lanczos, up to 20 Hessian-vector products, stopping when the value settles to
1e-4), in two parameter spaces: a 1-bit Bi-AdaptFormer's weights (read back from the
shipped run when it exists) and every backbone weight (full fine-tuning). Median of
``--repeats`` runs each; the machine's load average is recorded before and after, since the
timings scale with it.

    .venv/bin/python benchmarks/flatness.py [--repeats 3] [--threads N] [--grid 21]
        [--images 256] [--lanczos-steps 20] [--spaces bi-adaptformer,full]

On a loaded machine a smaller ``--grid`` keeps it short; the record then gives the measured
time per grid point and the 21×21 time projected from it (marked as a projection).

Writes ``benchmarks/results/flatness.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, write_result  # noqa: E402

RUN = Path(__file__).resolve().parents[1] / "cached_runs" / "digits-bi-adaptformer-s0"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def space(kind: str, images: int):
    """(model, params, batches, where the weights came from) for one parameter space."""
    from vpeft_viz.analysis.flatness import validation_batches
    from vpeft_viz.data import resolve_data
    from vpeft_viz.methods import attach_method, create_method
    from vpeft_viz.runs.store import Run
    from vpeft_viz.runs.weights import TrainedModel, load_run_model

    if kind == "bi-adaptformer" and (RUN / "weights.packed").is_file():
        trained, source = load_run_model(Run(RUN, read_only=True)), f"run {RUN.name}"
    else:
        from vpeft_viz.backbones import create_backbone

        task = resolve_data("embedded:digits", seed=0)
        model = create_backbone(num_classes=task.num_classes)
        method = create_method(kind, {"bits": 1} if kind == "bi-adaptformer" else None)
        attach_method(model, method)
        cfg = {"data": {"normalization": "backbone"}}
        trained, source = TrainedModel(model.eval(), method, cfg, task), "pretrained backbone"
    params = [p for _, p in trained.method.trainable_parameters(trained.model)]
    batches = validation_batches(trained, images, 256, "cpu")
    return trained.model, params, batches, source


def main() -> int:
    import torch

    from vpeft_viz.probes import hessian, landscape

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--grid", type=int, default=21, help="points per side (the target: 21)")
    p.add_argument("--images", type=int, default=256, help="validation images (target: 256)")
    p.add_argument("--lanczos-steps", type=int, default=20)
    p.add_argument("--spaces", default="bi-adaptformer,full",
                   help="parameter spaces to time, comma-separated")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="landscape precisions to time (bf16: autocast), comma-separated")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    results = {}
    for kind in args.spaces.split(","):
        model, params, batches, source = space(kind, args.images)
        grid = landscape.symmetric_grid(args.grid, 1.0)
        gen = torch.Generator().manual_seed(0)
        d1 = landscape.filter_normalised_direction(params, gen)
        d2 = landscape.filter_normalised_direction(params, gen)
        precisions = args.precisions.split(",")
        times2d: dict[str, list[float]] = {k: [] for k in precisions}
        timeseig, eig = [], []
        for _ in range(args.repeats):
            for prec in precisions:
                t = time.perf_counter()
                landscape.landscape_2d(model, params, batches, d1, d2, grid, grid,
                                       amp=torch.bfloat16 if prec == "bf16" else None)
                times2d[prec].append(time.perf_counter() - t)
            t = time.perf_counter()
            op = hessian.HessianOperator(model, params, batches)
            ext = hessian.lanczos_extremes(op, max_steps=args.lanczos_steps, tol=1e-4)
            timeseig.append(time.perf_counter() - t)
            eig.append({"top": ext.top, "products": ext.steps, "converged": ext.converged})
            print(f"{kind}: 2-D " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times2d.items())
                  + f", top eigenvalue {ext.top:.4g} in "
                  f"{timeseig[-1]:.1f} s ({ext.steps} products)", file=sys.stderr)
        points = len(grid) ** 2
        results[kind] = {
            "weights_from": source, "params": int(sum(q.numel() for q in params)),
            "images": int(sum(int(y.numel()) for _, y in batches)),
            "grid": f"{len(grid)}x{len(grid)}",
            "landscape_2d_s": {k: {"median": round(median(v), 2),
                                   "runs": [round(x, 2) for x in v]} for k, v in times2d.items()},
            "per_point_s": {k: round(median(v) / points, 3) for k, v in times2d.items()},
            # a projection from the measured per-point time, not a measurement
            "projected_21x21_s": {k: round(median(v) / points * 441, 1)
                                  for k, v in times2d.items()},
            "top_eigenvalue_s": {"median": round(median(timeseig), 2),
                                 "runs": [round(x, 2) for x in timeseig]},
            "top_eigenvalue": eig,
        }
    path = write_result("flatness", {
        "command": "python benchmarks/flatness.py " + " ".join(sys.argv[1:]),
        "targets": {"landscape_2d_21x21_256_images_s": 60, "top_eigenvalue_s": 30},
        "load_average_before": load_before, "load_average_after": _load(),
        "note": ("load averages are 1/5/15-minute figures of the whole machine (2 cores, "
                 "shared): timings on a busy machine are upper bounds"),
        "threads": torch.get_num_threads(), "results": results})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
