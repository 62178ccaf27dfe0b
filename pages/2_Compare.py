"""Compare: accuracy against parameters, FLOPs and memory; curves, confusion, export.

Finished runs: table with seed spreads, Pareto plots, curves, per-class, export. The task and
the tab shown live in the URL (``?task=count&tab=...``), so a view can be shared.
"""

import pandas as pd
import streamlit as st

from vpeft_viz.analysis.compare import (
    aggregate,
    export_csv,
    export_json,
    multi_task_means,
    pareto_front,
)
from vpeft_viz.analysis.pixel_baseline import reference_rows
from vpeft_viz.plots import group_label, group_styles
from vpeft_viz.plots.compare import (
    CURVE_LABELS,
    confusion_heatmap,
    pareto_scatter,
    per_class_bars,
    training_curves,
)
from vpeft_viz.ui.common import comparison_table, embedded_info, means_table, protocol_note
from vpeft_viz.ui.inside import inside_link, open_confusion_cell
from vpeft_viz.ui.stores import (
    group_eval,
    load_run_table,
    pixel_reference,
    run_curves,
    run_filters,
)

st.set_page_config(page_title="Compare · vpeft-viz", layout="wide")
st.title("Compare methods")
protocol_note()

table = load_run_table()
if table.skipped:
    with st.expander(f"{len(table.skipped)} run(s) could not be read and are left out"):
        st.code("\n".join(table.skipped))
if table.runs.empty:
    st.info("No finished runs yet. Start some on the Train page, or regenerate the shipped "
            "set with `python -m vpeft_viz cache-runs`.")
    st.stop()

# One look per group (method × setting) over every loaded run: filters never recolour.
styles = group_styles(zip(table.runs["method"], table.runs["setting"]))
runs = run_filters(table.runs, key="compare")
if runs.empty:
    st.warning("No run matches the filters in the sidebar.")
    st.stop()
agg = aggregate(runs)
reference, reference_problems = pixel_reference()
for problem in reference_problems:
    st.warning(problem, icon=":material/warning:")
pixel_rows = reference_rows(agg, reference)

st.subheader("Per task")
st.caption(f"{len(runs)} runs in {len(agg)} groups; a group is one task × backbone × method "
           "× setting, averaged over its seeds (Seeds = how many). Setting names what differs "
           "between the loaded runs: on every group when stores differ in it (your 3-epoch runs "
           "beside the shipped 10-epoch ones), else where a group departs from the usual value "
           "or runs of one method differ.")
show_pixels = not pixel_rows.empty and st.toggle(
    "Show the “pixels, no backbone” reference", value=True, key="pixels",
    help="A logistic regression on the raw standardised pixels of train800, C chosen on "
         "val200, test scored once (`python -m vpeft_viz pixels`). A method that does not beat "
         "it is not being helped by the backbone.")
comparison_table(pd.concat([agg, pixel_rows], ignore_index=True) if show_pixels else agg)

if agg["task"].nunique() > 1:
    st.subheader("Averaged over tasks")
    means = multi_task_means(agg)
    st.caption("A plain mean weights every task alike; a group mean is the mean of the "
               "natural / specialized / structured group means (VTAB-1k's “G”), given only "
               "when every task's group is known. Compare rows only over the same task set.")
    if means["tasks"].nunique() > 1:
        st.warning("These rows average over different task sets; they are not comparable.")
    means_table(means)
else:
    means = None

st.subheader("One task in detail")
c1, c2 = st.columns(2)
task = c1.selectbox("Task", list(dict.fromkeys(agg["task"])), key="task", bind="query-params")
acc = c2.radio("Accuracy", ["test_acc", "val_acc"], horizontal=True, key="acc",
               bind="query-params",
               format_func=lambda a: {"test_acc": "test", "val_acc": "validation"}[a])
on_task = agg[agg["task"] == task].reset_index(drop=True)
labels = [group_label(m, s) for m, s in zip(on_task["method"], on_task["setting"])]
shown = st.multiselect("Groups on the charts", labels, default=labels, key="detail-groups",
                       help="Each group keeps its colour and marker on every chart.")
on_task = on_task[[lab in shown for lab in labels]].reset_index(drop=True)
classes = on_task["num_classes"].dropna()
chance = 1 / classes.iloc[0] if len(classes) and classes.nunique() == 1 else None
ref = reference.get(task) if show_pixels else None
if ref is not None:  # the test split's own chance level (majority class when unbalanced)
    chance = ref["chance"] if acc == "test_acc" else chance
pixels = None if ref is None else ref[acc]
if on_task.empty:
    st.info("Pick at least one group to draw the charts.")
    st.stop()

tabs = st.tabs(["vs trainable parameters", "vs FLOPs per image", "vs peak memory"], key="tab",
               bind="query-params")
for tab, (cost, label, log_x) in zip(tabs, [
        ("trainable_params", "trainable parameters", True),
        ("flops_per_image", "inference FLOPs per image", False),
        ("peak_memory_bytes", "peak memory", False)]):
    with tab:
        st.plotly_chart(pareto_scatter(on_task, cost=cost, cost_label=label, acc=acc,
                                       log_x=log_x, styles=styles, chance=chance,
                                       pixels=pixels),
                        key=f"pareto-{cost}")
        front = on_task[pareto_front(on_task[acc], on_task[cost])].sort_values(cost)
        st.caption("On the frontier, cheapest first (nothing is both more accurate and "
                   "cheaper): "
                   + (", ".join(group_label(m, s) for m, s in zip(front["method"],
                                                                   front["setting"])) or "–")
                   + (f". Dotted line: chance ({100 * chance:.1f}%)." if chance else "")
                   + (" Dashed line: pixels, no backbone." if pixels is not None else ""))
        if cost == "peak_memory_bytes" and len(on_task) > 2 and on_task[cost].nunique() == 1:
            st.warning("Every group here has the same peak memory: these runs recorded their "
                       "process's high-water mark, not their own peak (runs made before "
                       "per-run measurement; `python -m vpeft_viz cache-runs` remeasures the "
                       "shipped ones).", icon=":material/warning:")

st.markdown("**Training curves** (mean over seeds, band: ±1 std)")
metric = st.selectbox("Metric", list(CURVE_LABELS), format_func=CURVE_LABELS.get,
                      key="detail-metric")
on_runs = runs[runs["task"] == task]
curves = run_curves(on_runs[[group_label(m, s) in shown for m, s in
                             zip(on_runs["method"], on_runs["setting"])]])
if curves.empty:
    st.caption("No per-epoch metrics recorded for these runs.")
else:
    st.plotly_chart(training_curves(curves, metric=metric, styles=styles, chance=chance,
                                    pixels=ref.get(metric) if ref else None),
                    key="curves")

st.markdown("**Per class** (test set)")
names = next((tuple(t["class_names"]) for t in embedded_info()["tasks"]
              if t["name"] == task), None)
evals = {group_label(r.method, r.setting): group_eval(tuple(runs.loc[runs["run_id"].isin(
    r.run_ids), "path"]), names) for r in on_task.itertuples()}
evals = {k: v for k, v in evals.items() if v is not None}
if not evals:
    st.caption("No per-class evaluation recorded for these runs.")
else:
    first = next(iter(evals.values()))
    same = {k: v for k, v in evals.items() if v.class_names == first.class_names}
    if len(same) < len(evals):
        st.caption("Left out (different classes): " + ", ".join(sorted(set(evals) - set(same))))
    st.plotly_chart(per_class_bars({k: v.per_class_acc for k, v in same.items()},
                                   first.class_names, styles=styles, chance=chance),
                    key="per-class")
    pick = st.selectbox("Confusion matrix of", list(evals), key="detail-confusion")
    ev = evals[pick]
    group_runs = {group_label(r.method, r.setting): list(r.run_ids) for r in on_task.itertuples()}
    st.caption(f"**{pick}**: images summed over {ev.n_runs} seed(s); rows: true class, "
               "colour: share of the true class. Click a cell to see its images.")
    # (a title in the figure would meet its toolbar)
    event = st.plotly_chart(confusion_heatmap(ev.confusion, ev.class_names, clickable=True),
                            key="confusion", on_select="rerun", selection_mode="points")
    open_confusion_cell(event, ev.class_names, task=task, run_ids=group_runs[pick])
    inside_link(task, [ids[0] for ids in group_runs.values()][:8],  # one seed per group
                "Look inside these runs: every test image, attributions, what changed")

st.subheader("Export")
e1, e2 = st.columns(2)
e1.download_button("Per-task table (CSV)", export_csv(agg), file_name="vpeft_compare.csv",
                   mime="text/csv", key="export-csv")
e2.download_button("Everything (JSON)", export_json(agg, runs, means),
                   file_name="vpeft_compare.json", mime="application/json", key="export-json")
