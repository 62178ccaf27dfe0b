"""Flatness: why 1-bit adapters work — loss landscapes, curvature and weight noise of trained runs.

Landscapes along filter-normalised directions, Hessian sharpness, noise robustness, weight
histograms with the codebook, and the storage–accuracy frontier of low-bit adapters.
"""

from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from vpeft_viz.analysis import flatness as fl
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import flatness as plots
from vpeft_viz.ui import flatness as ui
from vpeft_viz.ui import method_views
from vpeft_viz.ui.inside import inside_link

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page
SETTINGS = fl.FlatnessSettings()

st.set_page_config(page_title="Flatness · vpeft-viz", layout="wide")
st.title("Flatness: why 1-bit adapters work")
st.caption("Quantising an adapter's weights to 1 bit moves them a long way, yet accuracy "
           "barely drops: the adapter sits in a flat region of the loss. Here the loss of "
           "trained runs is measured around their weights, in each method's own parameter "
           "space (every weight for full fine-tuning), on the first validation images "
           f"(default {SETTINGS.images}): along random filter-normalised directions "
           "(Li et al., 2018), by the Hessian's top eigenvalue and trace, and under "
           "Gaussian weight noise.")

runs = ui.measurable_runs()
if not runs:
    method_views.no_runs_note("Flatness", METHODS)
    method_views.new_run_form(METHODS, key="flat-new")
    with st.expander("Queue and live runs"):
        method_views.queue_panel()
    st.stop()

tasks = sorted({r.task for r in runs})
lowbit_tasks = [t for t in tasks if any(r.method in METHODS and r.task == t for r in runs)]
task = st.selectbox("Task", tasks, index=tasks.index(lowbit_tasks[0]) if lowbit_tasks else 0,
                    key="flat-task")
on_task = [r for r in runs if r.task == task]
measured = [i for i, r in enumerate(on_task) if ui.record(r) is not None]
default = measured[:6] or [i for i, r in enumerate(on_task)
                           if r.method in (*METHODS, "lora", "full", "adaptformer")][:6] or [0]
picked = st.multiselect("Runs to compare (same task)", range(len(on_task)), default=default,
                        format_func=lambda i: ui.label(on_task[i]), key="flat-runs")
chosen = [on_task[i] for i in picked]
if not chosen:
    st.info("Pick at least one run.")
    st.stop()
inside_link(task, [r.id for r in chosen][:8], "Inside these runs: test images, attributions, "
            "where each changed the network")

records = {}
missing = []
for r in chosen:
    rec = ui.record(r)  # any settings: a shipped record may use lighter ones
    if rec is None:
        missing.append(r)
    else:
        records[f"{fl.run_label(r.method, r.config.get('method_config', {}))} · {r.id[-8:]}"] = rec
mixed = fl.settings_differ(list(records.values()))
if mixed:
    st.warning("The picked runs were measured with different settings (" + mixed + "): "
               "their landscapes are not on the same grid or images.",
               icon=":material/warning:")
if missing:
    st.warning(f"{len(missing)} of the picked runs have no flatness record yet: "
               + ", ".join(f"`{r.id}`" for r in missing) + ". Measuring one is slow on a CPU: "
               "every landscape point and Hessian-vector product is a pass over the chosen "
               "images (docs/benchmarks.md gives measured times); fewer images and a "
               "coarser grid are much faster.",
               icon=":material/hourglass_empty:")
    fast = st.toggle("Faster landscapes in bf16", value=False, key="flat-bf16",
                     help="Landscapes and weight noise under bf16 autocast (about 3× faster "
                          "on CPUs with AMX; the centre is then the trained model's loss in "
                          "bf16). The Hessian figures stay fp32.")
    if st.button(f"Measure {len(missing)} run(s) now", key="flat-compute", type="primary"):
        if ui.compute(missing, replace(SETTINGS, precision="bf16" if fast else "fp32")) == 0:
            st.rerun()
if not records:
    st.stop()

tab_land, tab_sharp, tab_noise, tab_hist, tab_front = st.tabs(
    ["Landscapes", "Sharpness", "Noise robustness", "Weight histograms", "Storage frontier"])

with tab_land:
    metric = st.radio("Show", ["loss", "acc"], horizontal=True, key="flat-metric",
                      format_func=lambda m: "loss" if m == "loss" else "accuracy")
    st.plotly_chart(plots.landscape_1d(records, metric=metric), key="flat-1d")
    surface = st.toggle("3-D surfaces", value=False, key="flat-surface")
    st.plotly_chart(plots.landscape_2d(records, surface=surface, metric=metric), key="flat-2d")
    st.caption("Each run's weights θ move to θ + α·d₁ + β·d₂, where d₁, d₂ are Gaussian "
               "directions rescaled filter by filter (each row of each matrix) to the norm "
               "of the trained weights; α = 1 is a step as large as the weights. The centre "
               "(×) is the trained model. A wide, shallow bowl is a flat minimum.")

with tab_sharp:
    table = pd.DataFrame(fl.sharpness_rows(records)).set_index("run")
    st.dataframe(table.style.format({
        "weights": "{:,}", "val loss": "{:.4f}", "val acc": "{:.3f}",
        "top eigenvalue": "{:.4g}", "trace": "{:.4g}", "trace ± (s.e.)": "{:.2g}",
        "trace / weight": "{:.3g}", "loss rise at radius": "{:.4f}"}))
    st.caption("Top eigenvalue: Lanczos on Hessian-vector products; trace: Hutchinson's "
               "estimate from Rademacher vectors (± its standard "
               "error). Both are in the run's own parameter space, so they grow with the "
               "number of weights: compare the trace per weight across methods.")

with tab_noise:
    nm = st.radio("Show", ["acc", "loss"], horizontal=True, key="flat-noise-metric",
                  format_func=lambda m: "accuracy" if m == "acc" else "loss")
    st.plotly_chart(plots.noise_curves(records, metric=nm), key="flat-noise")
    st.caption("Each weight tensor gets Gaussian noise of std σ × its RMS; mean ± std over "
               "several draws (the record's settings).")
    with st.expander("Settings of each record"):
        st.dataframe(pd.DataFrame({n: r["settings"] for n, r in records.items()}).T)

with tab_hist:
    lowbit = [r for r in chosen if r.method in METHODS]
    if not lowbit:
        st.info("Pick a low-bit run (" + ", ".join(METHODS) + ") to see its weights.")
    else:
        hr = st.selectbox("Run", lowbit, format_func=ui.label, key="flat-hist-run")
        hist = method_views.read_record(hr, fl.weight_histograms, "weight histogram")
        if hist is not None:
            j = st.selectbox("Matrix", range(len(hist["names"])),
                             format_func=lambda k: hist["names"][k], key="flat-hist-matrix")
            st.plotly_chart(plots.weight_histogram(
                hist["edges"], hist["counts"][j], hist["codebook"], name=hist["names"][j],
                bits=hist["bits"]), key="flat-hist")
            st.caption("The latent full-precision weights at the end of training, "
                       "standardised by the matrix's own mean and std. Every weight in a "
                       "cell is stored as that cell's code: a bell-shaped histogram loses "
                       "little to the snap.")

with tab_front:
    all_task = [r for r in runs if r.task == task]
    summaries = [ui.summary(r) for r in all_task]
    rows = fl.frontier_rows(summaries, [r.config for r in all_task])
    if rows:
        st.plotly_chart(plots.frontier(rows), key="flat-frontier")
        st.caption("Every finished run on this task: its method weights as stored — the "
                   "packed file for low-bit adapters, 4 bytes per weight otherwise — "
                   "against test accuracy. The head (fp32) is not counted.")
    else:
        st.info("No finished runs with a test accuracy on this task.")
