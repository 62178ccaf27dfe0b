"""Default live run: embedded backbone, one embedded task, 10 epochs, per method.

Target (docs/benchmarks.md): the run finishes in ≤ 60 s on 2 CPU cores, first metric in ≤ 5 s.
"First metric" is reported two ways: the first training-loss update (what the dashboard's
progress bar shows first) and the first per-epoch validation accuracy. Times include data
loading, backbone creation and the method's preparation, as a dashboard user waits for them.

    python benchmarks/live_run.py [--methods lora ssf ...] [--task digits] [--repeats 1]
    python benchmarks/live_run.py --from-store cached_runs   # summarise existing runs

``--from-store`` reads finished runs' own timestamps (status.json: started → finished, the
whole run including data, preparation, training, test and saving) and training times
(summary.json) instead of running anything; every cached run is a default live run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, write_result  # noqa: E402

from vpeft_viz.methods import method_names  # noqa: E402
from vpeft_viz.runs.execute import execute_run, make_run_config  # noqa: E402
from vpeft_viz.runs.store import RunStore  # noqa: E402
from vpeft_viz.train import Callback  # noqa: E402


class Clock(Callback):
    def __init__(self, t0: float):
        self.t0, self.first_step, self.first_epoch = t0, None, None

    def on_step(self, step, total, loss):
        if self.first_step is None:
            self.first_step = time.perf_counter() - self.t0

    def on_epoch(self, row):
        if self.first_epoch is None:
            self.first_epoch = time.perf_counter() - self.t0


def summarise_store(root: Path) -> None:
    runs = [r for r in RunStore(root, read_only=True).list() if r.status()["status"] == "done"]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        st, s = r.status(), r.summary()
        by_method.setdefault(r.config["method"], []).append(
            (st["finished"] - st["started"], s["train_time_s"]))
    rows = []
    for method, xs in by_method.items():
        row = {"method": method, "runs": len(xs), "wall_s": median([w for w, _ in xs]),
               "wall_s_max": max(w for w, _ in xs), "train_s": median([t for _, t in xs])}
        rows.append(row)
        print(f"{method:<12} runs {row['runs']:>2}  wall median {row['wall_s']:5.1f}s  "
              f"max {row['wall_s_max']:5.1f}s  training {row['train_s']:5.1f}s", flush=True)
    path = write_result("live_run_store", {"store": str(root), "rows": rows,
                                           "target": {"wall_s": 60}})
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--task", default=None, help="embedded task (default: the first)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--from-store", type=Path, default=None)
    p.add_argument("--out", default="live_run", help="results/<OUT>.json (default: live_run)")
    args = p.parse_args()
    if args.from_store is not None:
        return summarise_store(args.from_store)
    from vpeft_viz.data.embedded import EMBEDDED_TASKS, ensure_task

    task = args.task or next(iter(EMBEDDED_TASKS))
    ensure_task(task)  # generation is cached; not part of a live run's wait
    methods = args.methods or [m for m in method_names() if m != "full"] + ["full"]
    rows = []
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        for method in methods:
            walls, steps, epochs, summaries = [], [], [], []
            for _ in range(args.repeats):
                cfg = make_run_config(method=method, data=f"embedded:{task}",
                                      train={"epochs": args.epochs})
                run = store.create(cfg)
                t0 = time.perf_counter()
                clock = Clock(t0)
                summary = execute_run(run, callbacks=[clock])
                walls.append(time.perf_counter() - t0)
                steps.append(clock.first_step)
                epochs.append(clock.first_epoch)
                summaries.append(summary)
            row = {"method": method, "wall_s": median(walls), "wall_s_all": walls,
                   "first_loss_s": median(steps), "first_val_acc_s": median(epochs),
                   "train_images_per_s": median([s["images_per_s"] for s in summaries]),
                   "test_acc": median([s["test_acc"] for s in summaries]),
                   "trainable_params": summaries[0]["trainable_params"]}
            rows.append(row)
            print(f"{method:<12} wall {row['wall_s']:6.1f}s"
                  f"  first loss {row['first_loss_s']:.1f}s"
                  f"  first val {row['first_val_acc_s']:.1f}s"
                  f"  {row['train_images_per_s']:.0f} img/s  test {row['test_acc']:.3f}",
                  flush=True)
    path = write_result(args.out, {"task": task, "epochs": args.epochs,
                                     "repeats": args.repeats, "rows": rows,
                                     "load_avg_1_5_15": {"before": load_before,
                                                         "after": os.getloadavg()},
                                     "target": {"wall_s": 60, "first_metric_s": 5}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
