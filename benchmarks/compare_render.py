"""Compare page render time from the shipped cached_runs/ (target ≤ 2 s: docs/benchmarks.md).

Measured with Streamlit's AppTest (the page script run headless, as the server runs it):

- ``first_render_s``: the first render in a fresh process (imports, reading every run,
  building every figure) — what the first visitor after a server start waits for;
- ``new_session_render_s``: median render for a new session (a new browser tab) once the
  process is warm: the run-table caches hit, the page and its figures are rebuilt;
- ``rerun_s``: median rerun within a session (what a widget change costs);
- ``build_s``: median of the page's data and figure work alone, no Streamlit and no caches
  (``load_runs`` + ``aggregate`` + means + 5 figures + exports): what a cache miss costs.

AppTest polls the script thread, so its figures carry a few ms of polling on top. The user
store is pointed at an empty temp folder so only cached runs are measured.

    python benchmarks/compare_render.py [--repeats 7] [--cached DIR | --synthetic]

``--synthetic`` writes a stand-in store shaped like the cached-runs recipe (8 methods × 3
tasks × 3 seeds, 10 epochs) for machines where cached_runs/ is still empty.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import median, write_result  # noqa: E402

import vpeft_viz.runs as run_stores  # noqa: E402
from vpeft_viz.runs.store import RunStore  # noqa: E402

TARGET_S = 2.0


def synthetic_store(root: Path) -> RunStore:
    """Run directories shaped like the cached-runs recipe, with plausible numbers."""
    import numpy as np

    from vpeft_viz.runs.cached import EPOCHS, TASKS, default_recipe

    rng = np.random.default_rng(0)
    store = RunStore(root)
    params = {"linear": 0, "full": 2_691_648, "bitfit": 13_056, "vpt-shallow": 1_920,
              "vpt-deep": 11_520, "lora": 36_864, "adaptformer": 19_632, "ssf": 26_112}
    seeds = {m: s for m, _, s, _ in default_recipe() if m in params}
    for task, classes in zip(TASKS, (10, 4, 8)):
        for method, method_seeds in seeds.items():
            base = 0.5 + 0.4 * rng.random()
            for seed in method_seeds:
                cfg = {"method": method, "method_config": {},
                       "backbone": {"name": "vit_tiny_patch4_32_vpeft", "pretrained": True,
                                    "checkpoint": None},
                       "data": {"spec": f"embedded:{task}", "name": task,
                                "normalization": "backbone"},
                       "train": {"epochs": EPOCHS, "seed": seed}, "versions": {}}
                run = store.create(cfg, run_id=f"{task}-{method}-s{seed}")
                acc = float(np.clip(base + 0.02 * rng.standard_normal(), 0, 1))
                for e in range(1, EPOCHS + 1):
                    run.append_metrics({"epoch": e, "train_loss": 2 / e, "train_acc": acc * e
                                        / EPOCHS, "val_loss": 2.2 / e,
                                        "val_acc": acc * e / EPOCHS})
                conf = rng.integers(0, 20, (classes, classes)) + np.eye(classes, dtype=int) * 80
                run.save_artifact("eval.json", {
                    "class_names": [str(i) for i in range(classes)],
                    "test_confusion": conf.tolist(),
                    "test_per_class_acc": (np.diag(conf) / conf.sum(1)).tolist()})
                head = 193 * classes
                run.write_summary({
                    "run_id": run.id, "method": method, "task": task, "seed": seed,
                    "num_classes": classes, "epochs": EPOCHS, "best_epoch": EPOCHS,
                    "val_acc": acc, "test_acc": acc - 0.01, "test_loss": 1.0,
                    "trainable_params": params[method] + head,
                    "trainable_params_excl_head": params[method],
                    "total_params": 2_691_648 + head, "backbone_params": 2_691_648,
                    "weight_bytes": 4 * (params[method] + head), "train_time_s": 30.0,
                    "images_per_s": 300.0, "peak_memory_bytes": 1.2e9,
                    "flops_per_image": 3.46e8, "device": "cpu"})
                run.set_status("done")
    return store


def build_once(store: RunStore) -> None:
    """The page's data and figure work, uncached."""
    from vpeft_viz.analysis.compare import (
        aggregate,
        export_csv,
        export_json,
        load_curves,
        load_runs,
        multi_task_means,
        seed_eval,
    )
    from vpeft_viz.plots.compare import (
        confusion_heatmap,
        pareto_scatter,
        per_class_bars,
        training_curves,
    )

    runs = load_runs({"cached": store}).runs
    agg = aggregate(runs)
    means = multi_task_means(agg)
    task = agg["task"].iloc[0]
    on_task = agg[agg["task"] == task].reset_index(drop=True)
    for cost in ("trainable_params", "flops_per_image", "peak_memory_bytes"):
        pareto_scatter(on_task, cost=cost, cost_label=cost).to_json()
    training_curves(load_curves(runs[runs["task"] == task]), metric="val_acc").to_json()
    evals = {r.method: seed_eval(runs.loc[runs["run_id"].isin(r.run_ids), "path"])
             for r in on_task.itertuples()}
    first = next(iter(evals.values()))
    per_class_bars({k: v.per_class_acc for k, v in evals.items()}, first.class_names).to_json()
    confusion_heatmap(first.confusion, first.class_names).to_json()
    export_csv(agg)
    export_json(agg, runs, means)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cached", type=Path, default=None, help="store to read (cached_runs/)")
    g.add_argument("--synthetic", action="store_true", help="a recipe-shaped stand-in store")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VPEFT_VIZ_RUNS"] = str(Path(tmp) / "user")  # empty: cached runs only
        if args.synthetic:
            store = synthetic_store(Path(tmp) / "cached")
        else:
            store = RunStore(args.cached or run_stores.CACHED_STORE, read_only=True)
        n_runs = len(store.list())
        if not n_runs:
            raise SystemExit(f"no runs in {store.root}: generate them (python -m vpeft_viz "
                             "cache-runs) or pass --synthetic")
        run_stores.CACHED_STORE = store.root

        from streamlit.testing.v1 import AppTest

        def session() -> AppTest:
            at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
            at.switch_page("pages/2_Compare.py")
            return at

        t0 = time.perf_counter()
        at = session().run()
        first = time.perf_counter() - t0
        if at.exception:
            raise SystemExit(f"Compare page failed: {at.exception[0].message}")
        charts = len(at.get("plotly_chart"))

        reruns, sessions, builds = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            at.run()
            reruns.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            session().run()
            sessions.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build_once(store)
            builds.append(time.perf_counter() - t0)

    import pandas
    import plotly
    import streamlit

    result = {
        "target_s": TARGET_S, "store": "synthetic" if args.synthetic else str(store.root),
        "runs": n_runs, "charts": charts, "repeats": args.repeats,
        "first_render_s": round(first, 3),
        "new_session_render_s": round(median(sessions), 3),
        "rerun_s": round(median(reruns), 3), "build_s": round(median(builds), 3),
        "all_s": {"new_session": [round(x, 3) for x in sessions],
                  "rerun": [round(x, 3) for x in reruns], "build": [round(x, 3) for x in builds]},
        "meets_target": max(median(sessions), median(reruns)) <= TARGET_S,
        "load_average": os.getloadavg(),
        "versions": {"streamlit": streamlit.__version__, "plotly": plotly.__version__,
                     "pandas": pandas.__version__},
    }
    path = write_result("compare_render", result)
    print(f"{n_runs} runs: first render {first:.2f} s; new session {median(sessions):.2f} s, "
          f"rerun {median(reruns):.2f} s, uncached build {median(builds):.2f} s "
          f"(median of {args.repeats}; target ≤ {TARGET_S} s) → {path}")


if __name__ == "__main__":
    main()
