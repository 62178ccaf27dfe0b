"""SPT: sensitivity maps, which weights a task needs.

Sensitivity maps, live re-allocation of the budget, two tasks side by side.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import sensitivity as sens
from vpeft_viz.methods import get_method_class, methods_with_view
from vpeft_viz.plots import human_count
from vpeft_viz.plots import spt as plots
from vpeft_viz.ui import method_views

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page
KIND = {m: get_method_class(m).kind for m in METHODS}  # which structured module

st.set_page_config(page_title="SPT · vpeft-viz", layout="wide")
st.title("SPT: sensitivity-aware tuning")
st.caption("Each backbone weight is scored by its squared gradient on the task, summed over "
           "training mini-batches with a fresh head (16 × 32 images). The most sensitive "
           "weights get the budget: a matrix with many of them gets a whole LoRA or adapter "
           "(structured), every other sensitive weight is tuned alone (sparse).")

runs, run = method_views.pick_run_or_stop(METHODS, what="SPT", key="spt")
smap = method_views.read_record(run, sens.SensitivityMap.from_artifacts, "sensitivity")
if smap is None:
    st.stop()
info = method_views.method_state(run).get("sensitivity") or {}
kind = KIND[run.method]
own = sens.run_layout(smap)
c = st.columns(4)
c[0].metric("budget used", human_count(own.used), f"target {human_count(own.target)}",
            delta_color="off", delta_arrow="off", help=f"{own.used:,} trainable parameters "
            "(head excluded, CLS token included); target " + f"{own.target:,}")
c[1].metric("structured matrices", int((own.structured & smap.is_matrix).sum()))
c[2].metric("sensitive weights", f"{own.sensitive:,}")
c[3].metric("scored from", f"{info.get('images', '?')} images",
            f"seed {info.get('seed', '?')}, {info.get('order', '')}", delta_color="off",
            delta_arrow="off")

tab_map, tab_budget, tab_matrix, tab_two = st.tabs(
    ["Sensitivity map", "Budget", "One matrix", "Two tasks"])

with tab_map:
    st.plotly_chart(plots.sensitivity_heatmap(sens.block_op_grid(smap, own), kind=kind),
                    key="spt-map")
    st.caption("Colour: share of each matrix's weights that are sensitive at the run's "
               "budget. Outlined cells got a whole structured module.")
    st.plotly_chart(plots.share_bars(sens.sensitive_shares(smap, own)), key="spt-shares")

with tab_budget:
    selected, totals = sens.budget_curve(smap)
    options = {f"{human_count(v)} ({v:,})": v for v in sorted(set(totals.tolist()))}
    start = min(options, key=lambda o: abs(options[o] - own.used))
    budget = options[st.select_slider("Budget (trainable parameters, head excluded)",
                                      options=list(options), value=start, key="spt-budget")]
    typed = st.number_input("…or type any budget (empty: the slider's)", min_value=1,
                            value=None, step=1000, key="spt-typed")
    target = int(typed) if typed is not None else int(budget)
    layout = sens.reallocate(smap, target)
    if layout.reachable:
        st.success(f"{human_count(layout.used)} parameters ({layout.used:,}): "
                   f"{int((layout.structured & smap.is_matrix).sum())} structured matrices, "
                   f"{layout.sensitive:,} sensitive weights.", icon=":material/check:")
    else:
        st.warning(f"{target:,} is not reachable within 2%: the nearest reachable budget "
                   f"is {layout.used:,} (a structured module switches on in between).",
                   icon=":material/warning:")
    left, right = st.columns([3, 2])
    left.plotly_chart(plots.sensitivity_heatmap(sens.block_op_grid(smap, layout), kind=kind,
                                                title=f"at {human_count(layout.used)}"),
                      key="spt-realloc")
    right.plotly_chart(plots.budget_breakdown([("the run", own.breakdown(smap)),
                                               ("chosen", layout.breakdown(smap))]),
                       key="spt-breakdown")
    right.plotly_chart(plots.budget_curve(selected, totals, target=target,
                                          used=layout.used), key="spt-curve")
    method_views.launch_button(
        f"Train {run.method} at {human_count(layout.used)} on {run.task}", key="spt-launch",
        help="Queues a run with this budget (same task, backbone, seed and settings); its "
             "sensitivity is recomputed, so the layout matches when the data and seed do.",
        method=run.method, data=run.config["data"]["spec"],
        method_config={**run.config["method_config"], "budget": int(layout.used)},
        train=run.config.get("train"), backbone=method_views.recorded(run.config))
    with st.expander("Queue and live runs"):
        method_views.queue_panel()

with tab_matrix:
    name = st.selectbox("Matrix", smap.matrix_names(), key="spt-matrix")
    st.plotly_chart(plots.matrix_image(sens.matrix_image(smap, name), name=name),
                    key="spt-image")
    st.caption("Cyan contour: the run's global threshold (cells above it hold sensitive "
               "weights; pooled cells show the mean).")

with tab_two:
    others = [r for r in runs if r.path != run.path]
    if not others:
        st.info("Only one SPT run so far: launch one on another task to compare.")
    else:
        other = method_views.run_picker(others, label="Compare with", key="spt-other")
        smap2 = method_views.read_record(other, sens.SensitivityMap.from_artifacts, "sensitivity")
        if smap2 is not None:
            both = st.toggle("Same budget for both (re-allocated from the stored sensitivity)",
                             key="spt-same")
            lay1 = sens.reallocate(smap, own.used) if both else own
            lay2 = sens.reallocate(smap2, own.used) if both else sens.run_layout(smap2)
            grids = [sens.block_op_grid(smap, lay1), sens.block_op_grid(smap2, lay2)]
            top = 100 * max(float(g["density"].max()) for g in grids)  # one colour scale
            cols = st.columns(2)
            for col, r, grid, lay, k in ((cols[0], run, grids[0], lay1, "a"),
                                         (cols[1], other, grids[1], lay2, "b")):
                col.plotly_chart(plots.sensitivity_heatmap(
                    grid, kind=KIND[r.method], zmax=top or None,
                    title=f"{r.task} · {r.method} · {human_count(lay.used)}"), key=f"spt-two-{k}")
            overlap = sens.structured_overlap(lay1, lay2, smap, smap2)
            if overlap is not None:
                st.caption(f"Structured matrices shared (Jaccard): {overlap:.2f}")
