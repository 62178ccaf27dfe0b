"""The guided tour of the Methods page: one comparison on the cached runs, step by step.

Every number in the tour's text is read from the per-task aggregate and the per-run table
that :mod:`vpeft_viz.analysis.compare` builds; nothing is typed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .compare import pareto_front
from .cost import human_bytes, human_count

TOUR_METHODS = ("linear", "lora", "full")


@dataclass
class TourStep:
    """One step of the guided tour: a title, markdown with numbers read from the runs, and
    what to show beside it (``figure="pareto"``: the task's accuracy-vs-parameters plot)."""

    title: str
    text: str
    figure: str | None = None
    table: pd.DataFrame | None = None


def pick_tour_task(agg: pd.DataFrame, methods: Iterable[str] = TOUR_METHODS) -> str | None:
    """The task with every tour method on it and the most seeds behind the fewest-seeded one."""
    methods = list(methods)
    best, best_seeds = None, 0
    for task, g in agg.groupby("task", sort=False):
        if set(methods) <= set(g["method"]):
            seeds = min(g[g["method"] == m]["n_seeds"].max() for m in methods)
            if seeds > best_seeds:
                best, best_seeds = task, seeds
    return best


def tour_step_index(step: str | None, n_steps: int) -> int:
    """The 0-based step a URL's 1-based ``?step=`` names, clamped; the first when unreadable."""
    try:
        i = int(step) - 1 if step is not None else 0
    except ValueError:
        return 0
    return min(max(i, 0), max(n_steps - 1, 0))


def _tour_rows(agg: pd.DataFrame, task: str, methods: list[str]) -> pd.DataFrame:
    on = agg[(agg["task"] == task) & agg["method"].isin(methods)]
    # One setting per method: the one with most seeds (the first listed on a tie).
    on = on.sort_values("n_seeds", ascending=False, kind="stable").drop_duplicates("method")
    return on.set_index("method").loc[methods].reset_index()


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def tour_steps(agg: pd.DataFrame, runs: pd.DataFrame, task: str,
               methods: Iterable[str] = TOUR_METHODS,
               titles: Mapping[str, str] | None = None,
               summaries: Mapping[str, str] | None = None) -> list[TourStep]:
    """The guided tour through one comparison on ``task``, every number read from ``agg``
    (per-task aggregate) and ``runs`` (per-run table)."""
    methods = list(methods)
    titles = dict(titles or {})
    name = {m: titles.get(m, m) for m in methods}
    rows = _tour_rows(agg, task, methods)
    r = {row["method"]: row for _, row in rows.iterrows()}
    first = rows.iloc[0]
    group = f"{first['task_group']} group, " if isinstance(first["task_group"], str) else ""
    seeds = sorted({int(n) for n in rows["n_seeds"]})
    pretrained = runs[runs["task"] == task]["pretrained"].astype(bool).all()
    start = "pretrained" if pretrained else "randomly initialised (not pretrained)"
    steps = []

    lines = [f"- **{name[m]}**: {(summaries or {}).get(m, '')}" for m in methods]
    steps.append(TourStep("One task, three ways to adapt", "\n".join([
        f"Task **{task}** ({group}{int(first['num_classes'])} classes). The same {start} "
        f"backbone `{first['backbone']}` was adapted in three ways, each run with "
        f"{' or '.join(map(str, seeds))} seeds for {int(first['epochs'])} epochs:", "",
        *lines, "",
        "Every run kept the epoch with the best **validation** accuracy; its **test** accuracy "
        "was measured once, on that checkpoint. Picking epochs on the test set (as several "
        "papers do) would flatter every method."])))

    best = max(methods, key=lambda m: r[m]["test_acc"])
    acc_lines = [f"- **{name[m]}**: test {_pts(r[m]['test_acc'])} %"
                 + (f" ± {_pts(r[m]['test_acc_std'])}" if not math.isnan(r[m]["test_acc_std"])
                    else "") + f" (validation {_pts(r[m]['val_acc'])} %)" for m in methods]
    gaps = []
    for m in methods:
        if m == best:
            continue
        gap = 100 * (r[m]["test_acc"] - r[best]["test_acc"])
        spread = 100 * np.nansum([r[m]["test_acc_std"], r[best]["test_acc_std"]])
        verdict = "within" if abs(gap) <= spread else "beyond"
        gaps.append(f"{name[m]} is {abs(gap):.1f} points below ({verdict} the seeds' spread: "
                    f"their standard deviations add up to {spread:.1f}).")
    steps.append(TourStep("Accuracy", "\n".join([
        "Mean over seeds, ± the sample standard deviation:", "", *acc_lines, "",
        f"**{name[best]}** is the most accurate here. " + " ".join(gaps)])))

    cost_lines = [f"- **{name[m]}**: {human_count(r[m]['trainable_params_excl_head'])} "
                  f"trainable weights besides the head ({r[m]['pct_backbone']:.2f} % of the "
                  f"backbone), {human_bytes(r[m]['weight_bytes'])} to store per task, "
                  f"{r[m]['train_time_s']:.0f} s to train" for m in methods]
    heavy = max(methods, key=lambda m: r[m]["trainable_params"])
    light = [m for m in methods if m != heavy and r[m]["trainable_params_excl_head"] > 0]
    ratio = " ".join(
        f"{name[m]} trains {r[heavy]['trainable_params'] / r[m]['trainable_params']:.0f}× "
        f"fewer parameters than {name[heavy]} (head included)." for m in light)
    steps.append(TourStep("Parameter cost", "\n".join([
        "What each method trains and must keep for this task:", "", *cost_lines, "", ratio])))

    on_task = agg[agg["task"] == task].reset_index(drop=True)
    front = pareto_front(on_task["test_acc"], on_task["trainable_params"])
    cheapest_first = on_task[front].sort_values("trainable_params")
    on_front = [m + (f" ({s})" if s else "") for m, s in
                zip(cheapest_first["method"], cheapest_first["setting"])]
    verdicts = []
    for m in methods:
        i = on_task.index[(on_task["method"] == m)
                          & (on_task["setting_key"] == r[m]["setting_key"])][0]
        if front[i]:
            verdicts.append(f"{name[m]} is on the frontier.")
            continue
        better = on_task[(on_task["test_acc"] >= on_task.at[i, "test_acc"])
                         & (on_task["trainable_params"] <= on_task.at[i, "trainable_params"])]
        better = better.drop(index=i).sort_values("test_acc", ascending=False)
        verdicts.append(f"{name[m]} is dominated: {better.iloc[0]['method']} is at least as "
                        "accurate with no more parameters.")
    steps.append(TourStep("The Pareto plot", "\n".join([
        f"Every method run on {task} (not only these three): test accuracy against trainable "
        "parameters, log scale. A point is on the **Pareto frontier** (ringed, joined) when no "
        "other point is both more accurate and cheaper.", "",
        f"On the frontier, cheapest first: {', '.join(on_front)}. " + " ".join(verdicts)]),
        figure="pareto"))

    per_seed = runs[(runs["task"] == task) & runs["run_id"].isin(
        [i for m in methods for i in r[m]["run_ids"]])]
    table = per_seed.pivot_table(index="seed", columns="method", values="test_acc")
    table = (100 * table.reindex(columns=methods)).round(1)
    ranges = {m: float(table[m].max() - table[m].min()) for m in methods}
    widest = max(methods, key=lambda m: ranges[m])
    steps.append(TourStep("Seeds matter", "\n".join([
        "Test accuracy (%) of every seed:", "",
        f"The widest seed-to-seed range here is **{ranges[widest]:.1f} points** "
        f"({name[widest]}). A gap between methods smaller than the spread of their seeds is "
        "not evidence of a difference; published results vary with seeds too (VPT reports "
        "SVHN from 65.9 to 81.8 across seeds)."]), table=table))

    ppt = {m: 100 * r[m]["ppt"] for m in methods}
    order = sorted(methods, key=lambda m: -ppt[m])
    top = on_task.loc[on_task["ppt"].idxmax()]
    steps.append(TourStep("One number: PPT", "\n".join([
        "V-PETL Bench's PPT discounts accuracy by the trainable parameters P: "
        "acc × exp(−log10(P/10⁷ + 1)).", "",
        *[f"- **{name[m]}**: PPT {ppt[m]:.1f} (accuracy {_pts(r[m]['test_acc'])})"
          for m in order], "",
        f"Best PPT of all methods on {task}: **{top['method']}** ({100 * top['ppt']:.1f}). "
        "The Compare page does this for every task and method, with curves, per-class "
        "accuracy and export."])))
    return steps
