"""A default live run through the project's engine against a plain PyTorch loop doing the
same work, side by side in one process (issue #9's bar: the engine's run ≤ 1.15× the loop).

For each method (default: LoRA) and repeat, alternating which goes first:

* **engine**: ``make_run_config`` + ``execute_run`` into a temporary store — the whole run a
  dashboard user waits for: data decoding, backbone, the method's preparation, 10 epochs with
  a validation pass after each, the best epoch's weights, test once, FLOPs count, artifacts
  and the run directory written;
* **plain**: the same model (embedded backbone, shipped weights, the method attached), the
  same recipe (the run config's learning rate, AdamW and weight-decay groups, warm-up then
  cosine, batch size, epochs, per-epoch validation keeping the best trainable weights, test
  once), on the same splits **already decoded into tensors before its clock starts** (the
  issue's "data preloaded"), and nothing else: no callbacks, no recording, no files.

The ratio engine / plain of the median wall times is the engine's cost. Run it on a quiet
machine (other processes inflate both, unevenly):

    python benchmarks/live_vs_plain.py [--methods lora] [--task digits] [--repeats 3]

Writes ``benchmarks/results/live_vs_plain.json`` (machine, versions, load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import median, write_result  # noqa: E402
from torch import nn  # noqa: E402

from vpeft_viz.backbones import create_backbone, image_size, input_stats  # noqa: E402
from vpeft_viz.data import resolve_data  # noqa: E402
from vpeft_viz.data.dataset import ImageDataset, resolve_normalization  # noqa: E402
from vpeft_viz.methods import attach_method, create_method  # noqa: E402
from vpeft_viz.runs.execute import execute_run, make_run_config  # noqa: E402
from vpeft_viz.runs.store import RunStore  # noqa: E402
from vpeft_viz.train import TrainConfig, lr_factor, make_optimizer  # noqa: E402


def decoded_splits(spec: str, backbone: str, seed: int) -> tuple[int, dict]:
    """(classes, split → (images, labels)) decoded and normalised as the engine does."""
    task = resolve_data(spec, seed=seed)
    probe = create_backbone(backbone, num_classes=task.num_classes, pretrained=False)
    mean, std = resolve_normalization("backbone", *input_stats(probe))  # the engine's rule
    out = {}
    for split in ("train", "val", "test"):
        ds = ImageDataset(task.splits[split], image_size=image_size(probe), mean=mean, std=std,
                          num_classes=task.num_classes)
        x, y = ds[list(range(len(ds)))]
        out[split] = (x, y)
    return task.num_classes, out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
               for i in range(0, len(y), batch))
    return hits / len(y)


def plain_run(method_name: str, cfg: dict, classes: int, data: dict) -> dict:
    """The same training as the engine's run of ``cfg``, written as a bare loop."""
    t = TrainConfig.from_dict(cfg["train"])
    t0 = time.perf_counter()
    torch.manual_seed(t.seed)
    model = create_backbone(cfg["backbone"]["name"], num_classes=classes, pretrained=True)
    method = create_method(method_name, cfg["method_config"])
    x, y = data["train"]
    if method.needs_data:
        method.prepare(model, [(x[i:i + t.batch_size], y[i:i + t.batch_size])
                               for i in range(0, len(y), t.batch_size)],
                       device=torch.device("cpu"))
    attach_method(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, t, t.lr)
    steps_per_epoch = -(-len(y) // t.batch_size)
    total, warmup = t.epochs * steps_per_epoch, int(round(t.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    g = torch.Generator().manual_seed(t.seed)
    best, best_state = -1.0, None
    for _ in range(t.epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), t.batch_size):
            idx = order[i:i + t.batch_size]
            loss, _ = method.training_loss(model, x[idx], y[idx], criterion)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, *data["val"], t.eval_batch_size)
        if val > best:
            best = val
            best_state = {n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad}
    model.load_state_dict(best_state, strict=False)
    test = accuracy(model, *data["test"], t.eval_batch_size)
    return {"wall_s": time.perf_counter() - t0, "val_acc": best, "test_acc": test}


def engine_run(store: RunStore, cfg: dict) -> dict:
    t0 = time.perf_counter()
    summary = execute_run(store.create(cfg))
    return {"wall_s": time.perf_counter() - t0, "val_acc": summary["val_acc"],
            "test_acc": summary["test_acc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=["lora"])
    p.add_argument("--task", default="digits", help="embedded task")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="live_vs_plain", help="results/<OUT>.json")
    args = p.parse_args()
    from vpeft_viz.data.embedded import ensure_task

    ensure_task(args.task)  # generation is cached; not part of a live run's wait
    spec = f"embedded:{args.task}"
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        for name in args.methods:
            cfg = make_run_config(method=name, data=spec, train={"epochs": args.epochs})
            classes, data = decoded_splits(spec, cfg["backbone"]["name"], cfg["train"]["seed"])
            eng, plain = [], []
            for r in range(args.repeats):
                for kind in (("engine", "plain") if r % 2 == 0 else ("plain", "engine")):
                    res = (engine_run(store, cfg) if kind == "engine"
                           else plain_run(name, cfg, classes, data))
                    (eng if kind == "engine" else plain).append(res)
                    print(f"{name:<12} {kind:<6} {res['wall_s']:6.1f}s  val {res['val_acc']:.3f}"
                          f"  test {res['test_acc']:.3f}", flush=True)
            row = {"method": name, "lr": cfg["train"]["lr"],
                   "engine_wall_s": median([e["wall_s"] for e in eng]),
                   "plain_wall_s": median([e["wall_s"] for e in plain]),
                   "engine_all": eng, "plain_all": plain}
            row["engine_vs_plain"] = row["engine_wall_s"] / row["plain_wall_s"]
            rows.append(row)
            print(f"{name:<12} engine {row['engine_wall_s']:.1f}s  plain "
                  f"{row['plain_wall_s']:.1f}s  ×{row['engine_vs_plain']:.2f}", flush=True)
    path = write_result(args.out, {
        "task": args.task, "epochs": args.epochs, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "rows": rows,
        "load_avg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "target": {"engine_vs_plain": 1.15}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
