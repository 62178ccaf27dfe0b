"""The model card's per-task table: embedded backbone vs random init, per method.

For every embedded task: linear probe and LoRA from the embedded backbone and from random
init, and full fine-tuning from each; test accuracy (selected on validation). Writes
``benchmarks/results/suite_table.json`` (machine + versions) and prints a Markdown table.

    python benchmarks/suite_table.py [--epochs 10] [--tasks digits count ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_result  # noqa: E402

from vpeft_viz.runs.execute import execute_run, make_run_config  # noqa: E402
from vpeft_viz.runs.store import RunStore  # noqa: E402

COLUMNS = [("linear", True), ("linear", False), ("lora", True), ("lora", False),
           ("full", True), ("full", False)]


def label(method: str, pretrained: bool) -> str:
    return f"{method} ({'embedded' if pretrained else 'random init'})"


def main() -> None:
    from vpeft_viz.data.embedded import EMBEDDED_TASKS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="*", default=list(EMBEDDED_TASKS))
    p.add_argument("--methods", nargs="*", default=["linear", "lora", "full"])
    p.add_argument("--columns", nargs="*", default=None, metavar="METHOD:INIT",
                   help="only these columns, e.g. lora:embedded full:random")
    p.add_argument("--out", default="suite_table", help="result name under results/")
    args = p.parse_args()
    columns = [(m, pt) for m, pt in COLUMNS if m in args.methods]
    if args.columns:
        wanted = {(c.split(":")[0], c.split(":")[1] == "embedded") for c in args.columns}
        columns = [c for c in COLUMNS if c in wanted]
    results: dict[str, dict[str, dict]] = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        for task in args.tasks:
            results[task] = {}
            for method, pretrained in columns:
                cfg = make_run_config(method=method, data=f"embedded:{task}",
                                      pretrained=pretrained,
                                      train={"epochs": args.epochs, "seed": args.seed})
                s = execute_run(store.create(cfg))
                results[task][label(method, pretrained)] = {
                    "test_acc": s["test_acc"], "val_acc": s["val_acc"],
                    "train_time_s": s["train_time_s"],
                    "trainable_params": s["trainable_params"]}
                print(f"{task:<12} {label(method, pretrained):<26} test {s['test_acc']:.3f}"
                      f"  ({s['train_time_s']:.0f} s)", flush=True)
    means = {label(m, pt): statistics.mean(results[t][label(m, pt)]["test_acc"]
                                           for t in args.tasks) for m, pt in columns}
    path = write_result(args.out, {"epochs": args.epochs, "seed": args.seed,
                                        "tasks": args.tasks, "results": results,
                                        "plain_mean_test_acc": means,
                                        "wall_s": time.time() - t_start})
    header = "| task | " + " | ".join(label(m, pt) for m, pt in columns) + " |"
    print(header)
    print("|" + "---|" * (len(columns) + 1))
    for task in args.tasks:
        cells = " | ".join(f"{results[task][label(m, pt)]['test_acc']:.3f}" for m, pt in columns)
        print(f"| {task} | {cells} |")
    print("| **plain mean** | " + " | ".join(f"**{means[label(m, pt)]:.3f}**"
                                           for m, pt in columns) + " |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
