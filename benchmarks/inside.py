"""Time the Inside page's computations on the embedded backbone (docs/inside.md).

* attributions of one test image across 4 runs: Integrated Gradients on the input, layer
  Integrated Gradients on the tokens entering the last block, attention rollout, and captum's
  infidelity and max-sensitivity of both maps (the page's default settings), the models
  already loaded (the page keeps them); median over ``--repeats`` images;
* CKA over all layers for 4 runs on the first 500 test images: one pass of the frozen
  backbone and the 4 tuned models over the images (decoded as it goes), streaming the exact
  linear CKA of every layer's tokens and keeping the CLS features; median over ``--repeats``.

Targets: ≤ 5 s and ≤ 20 s on 2 CPU cores. The runs are the shipped ``cached_runs/`` ones
(``--runs``). The machine's load average is recorded before and after: on a shared machine
the timings are upper bounds.

    .venv/bin/python benchmarks/inside.py --threads 2 [--repeats 3] [--images 500]
        [--runs digits-lora-s0,digits-vpt-deep-s0,digits-ssf-s0,digits-adaptformer-s0]

``--smoke`` (2 runs, 16 images, 1 repeat, 1 thread, 4 integration steps) checks the script
in seconds; its figures mean nothing.
Writes ``benchmarks/results/inside.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = "digits-lora-s0,digits-vpt-deep-s0,digits-ssf-s0,digits-adaptformer-s0"
TARGETS = {"attributions_one_image_4_runs_s": 5.0, "cka_all_layers_4_runs_500_images_s": 20.0}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict:
    import torch

    from vpeft_viz.analysis.inside import attributions as attr
    from vpeft_viz.analysis.inside import models as mdl
    from vpeft_viz.analysis.inside import network as net

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    paths = [ROOT / "cached_runs" / r for r in args.runs.split(",")]
    t = time.perf_counter()
    trained = [mdl.load_view_model(p) for p in paths]
    spec = mdl.FrozenSpec.of(trained[0].config)
    frozen, task = mdl.load_frozen(spec)
    load_s = time.perf_counter() - t

    settings = attr.AttributionSettings(**({"steps": 4, "infidelity_samples": 4,
                                             "sensitivity_samples": 2} if args.smoke else {}))
    att_runs, maps_s, metrics_s = [], [], []
    for i in range(args.repeats):
        images = [mdl.test_image(tm, i) for tm in trained]  # prepared before the clock
        t = time.perf_counter()
        results = [attr.attribute(tm.model, img["x"], mean=img["mean"], std=img["std"],
                                  settings=settings, label=img["label"])
                   for tm, img in zip(trained, images)]
        att_runs.append(time.perf_counter() - t)
        maps_s.append(sum(r["seconds_maps"] for r in results))
        metrics_s.append(sum(r["seconds_metrics"] for r in results))
        print(f"attributions, image {i}: {att_runs[-1]:.2f} s for {len(trained)} runs "
              f"(maps {maps_s[-1]:.2f} s, trust metrics {metrics_s[-1]:.2f} s)", file=sys.stderr)

    cka_runs = []
    for _ in range(args.repeats):
        data = mdl.split_dataset(task, frozen, spec.normalization, "test", args.images)
        t = time.perf_counter()
        res = net.token_cka(frozen, [tm.model for tm in trained], data,
                            net._batch_size(frozen, net.NetworkSettings()))
        cka_runs.append(time.perf_counter() - t)
        print(f"CKA: {cka_runs[-1]:.2f} s for {len(trained)} runs on {len(data)} images",
              file=sys.stderr)
    return {
        "command": "python benchmarks/inside.py " + " ".join(args.argv),
        "runs": [p.name for p in paths], "threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": _load(),
        "note": ("load averages are 1/5/15-minute figures of the whole machine (2 cores, "
                 "shared): timings on a busy machine are upper bounds"),
        "targets": TARGETS, "models_load_s": round(load_s, 3),
        "attributions": {
            "settings": settings.key(), "images": list(range(args.repeats)),
            "seconds": [round(x, 3) for x in att_runs], "median_s": round(median(att_runs), 3),
            "maps_s": [round(x, 3) for x in maps_s], "metrics_s": [round(x, 3) for x in metrics_s]},
        "cka": {"images": args.images, "layers": res["layers"],
                "seconds": [round(x, 3) for x in cka_runs], "median_s": round(median(cka_runs), 3),
                "cka_tokens": {p.name: [round(float(v), 4) for v in row]
                               for p, row in zip(paths, res["cka_tokens"])}},
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=RUNS, help="comma-separated run ids in cached_runs/")
    p.add_argument("--images", type=int, default=500, help="test images of the CKA pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="2 runs, 16 images, 1 repeat")
    p.add_argument("--out", default="inside", help="results/<OUT>.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.runs = ",".join(args.runs.split(",")[:2])
        args.images, args.repeats, args.threads = 16, 1, 1
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    path = write_result(args.out, run(args))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
