"""Compare pretraining sources for the embedded backbone by linear-probe accuracy.

For each candidate (short pilot pretraining of each source at an equal number of student
images, plus random init) the backbone is frozen, the CLS token after the final norm (the
feature timm's ``forward_head(pre_logits=True)`` gives, which the PEFT methods' heads read)
is extracted for every image, and a scikit-learn ``LogisticRegression`` on standardised
features is fit on (a seeded subsample of) the task's train800val200 split and scored on (a
seeded subsample of) its test split. The suite mean over the embedded tasks is the number
that decides. The mean of the patch tokens is probed the same way, as a second view.

    python benchmarks/pretrain_compare.py --steps 20 --threads 1   # pilots + probe
    python benchmarks/pretrain_compare.py --weights final=vpeft_viz/weights/....safetensors

Writes ``benchmarks/results/pretrain_compare.json`` (machine and versions included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vpeft_viz.backbones import EMBEDDED_ARCH, load_weights  # noqa: E402
from vpeft_viz.pretrain import (  # noqa: E402
    SOURCES,
    PretrainConfig,
    machine_info,
    run_pretraining,
    to_tensor,
)

RESULTS = ROOT / "benchmarks" / "results"
PILOTS = RESULTS / "pretrain_pilots"


def build(weights: Path | None, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**EMBEDDED_ARCH, "num_classes": 0})
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


@torch.no_grad()
def features(model: VisionTransformer, images: np.ndarray,
             batch: int = 256) -> dict[str, np.ndarray]:
    """Frozen features: ``cls`` (what the model's head reads) and ``mean`` (patch tokens)."""
    cls, mean = [], []
    for i in range(0, len(images), batch):
        tokens = model.forward_features(to_tensor(images[i:i + batch]))
        cls.append(model.forward_head(tokens, pre_logits=True))
        mean.append(tokens[:, model.num_prefix_tokens:].mean(dim=1))
    return {"cls": torch.cat(cls).numpy(), "mean": torch.cat(mean).numpy()}


def subsample(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int):
    if n is None or len(labels) <= n:
        return images, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return images[idx], labels[idx]


def linear_probe(model: VisionTransformer, task: str, max_train: int | None,
                 max_test: int | None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vpeft_viz.data.embedded import load_arrays

    xtr, ytr = load_arrays(task, "trainval")
    xte, yte = load_arrays(task, "test")
    xtr, ytr = subsample(xtr, ytr, max_train, 0)
    xte, yte = subsample(xte, yte, max_test, 1)
    ftr, fte = features(model, xtr), features(model, xte)
    acc = {}
    for kind in ("cls", "mean"):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        probe.fit(ftr[kind], ytr)
        acc[kind] = float(probe.score(fte[kind], yte))
    return {"acc": acc["cls"], "acc_mean_tokens": acc["mean"], "n_train": int(len(ytr)),
            "n_test": int(len(yte)), "chance": float(np.bincount(yte).max() / len(yte))}


def probe_suite(model: VisionTransformer, tasks: list[str], max_train, max_test) -> dict:
    per_task = {}
    for t in tasks:
        t0 = time.time()
        per_task[t] = linear_probe(model, t, max_train, max_test)
        per_task[t]["seconds"] = round(time.time() - t0, 1)
        print(f"  {t:<16} {per_task[t]['acc']:.3f}  (mean tokens "
              f"{per_task[t]['acc_mean_tokens']:.3f})", file=sys.stderr, flush=True)
    return {"mean_acc": float(np.mean([r["acc"] for r in per_task.values()])),
            "mean_acc_mean_tokens": float(np.mean([r["acc_mean_tokens"]
                                                   for r in per_task.values()])),
            "tasks": per_task}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", nargs="*", default=list(SOURCES))
    p.add_argument("--steps", type=int, default=20, help="pilot steps per source")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH",
                   help="extra candidates: existing weight files")
    p.add_argument("--train-only", action="store_true", help="pretrain pilots, no probe")
    p.add_argument("--probe", nargs="*", default=None, metavar="NAME",
                   help="probe only these candidates; earlier results in --out are kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-train", type=int, default=300, help="probe fit images per task")
    p.add_argument("--max-test", type=int, default=200, help="probe test images per task")
    p.add_argument("--out", type=Path, default=RESULTS / "pretrain_compare.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    candidates: dict[str, Path | None] = {"random_init": None}
    pilots = {}
    for source in args.sources:
        path = PILOTS / f"{source}_s{args.seed}_{args.steps}x{args.batch_size}.safetensors"
        if not path.exists():
            cfg = PretrainConfig(source=source, steps=args.steps, batch_size=args.batch_size,
                                 seed=args.seed, threads=args.threads)
            run_pretraining(cfg, path)
        pilots[source] = json.loads(path.with_suffix(".json").read_text())
        candidates[f"pilot_{source}"] = path
    for item in args.weights:
        name, _, path = item.partition("=")
        candidates[name] = Path(path)
    if args.train_only:
        return 0

    from vpeft_viz.data.embedded import EMBEDDED_TASKS

    tasks = list(EMBEDDED_TASKS)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = old.get("candidates", {}) if old.get("tasks") == tasks else {}
    for name, path in candidates.items():
        if args.probe is not None and name not in args.probe:
            continue
        print(f"{name}:", file=sys.stderr, flush=True)
        results[name] = probe_suite(build(path, args.seed), tasks, args.max_train, args.max_test)
        results[name]["weights"] = (None if path is None else
                                    str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
                                    else str(path))
        print(f"  mean {results[name]['mean_acc']:.3f}", file=sys.stderr, flush=True)
    base = results["random_init"]["mean_acc"] if "random_init" in results else float("nan")
    record = {
        "feature": "CLS token after the final norm (forward_head pre_logits), frozen; "
                   "acc_mean_tokens: mean of the patch tokens after the final norm",
        "probe": "StandardScaler + LogisticRegression(C=0.1), fit on train+val, scored on test",
        "max_train": args.max_train, "max_test": args.max_test,
        "tasks": tasks,
        "candidates": results,
        "gain_over_random_init": {k: round(v["mean_acc"] - base, 4) for k, v in results.items()},
        "pilot_records": {**old.get("pilot_records", {}), **pilots},
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for k, v in results.items():
        print(f"{k:<20} {v['mean_acc']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
