"""DyT: dynamic tuning, which tokens each layer's MLP skips and what that buys.

Token masks per layer over test images, activation rates, skipped regions, accuracy, FLOPs
and latency against the target rate r, and the kept tokens against CLS attention.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import dyt as dyt_view
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import dyt as plots
from vpeft_viz.plots import human_count
from vpeft_viz.ui import method_views
from vpeft_viz.ui.stores import load_run_table

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page

st.set_page_config(page_title="DyT · vpeft-viz", layout="wide")
st.title("DyT: dynamic tuning")
st.caption("In every block a one-neuron dispatcher scores each patch token after attention; "
           "only the tokens it keeps go through the MLP (the CLS token always does), the "
           "others skip it. A small adapter beside the MLP sees every token. Training pulls "
           "the share of kept tokens towards a target rate r. At test time the skipped "
           "tokens really never reach the MLP, so the FLOPs of each image depend on what "
           "its layers kept.")

runs, run = method_views.pick_run_or_stop(METHODS, what="DyT", key="dyt")
rec = method_views.read_record(run, dyt_view.TokenRecord.from_artifacts, "token")
if rec is None:
    st.stop()
target = float(run.config.get("method_config", {}).get("r", 0.5))
class_names = method_views.run_class_names(run)
lat = rec.latency_ms

c = st.columns(4)
c[0].metric("test accuracy", f"{rec.accuracy:.1%}", help=f"{rec.n_images} test images")
c[1].metric("tokens through the MLPs", f"{rec.mean_rate:.1%}", f"target r = {target:g}",
            delta_color="off", delta_arrow="off",
            help="Mean over layers, test images and patch tokens (CLS excluded)")
c[2].metric("FLOPs per image", human_count(rec.mean_flops),
            f"{rec.flop_reduction:.2f}× fewer than no skipping", delta_color="off",
            delta_arrow="off", help=f"No skipping: {rec.flops_complete:,} FLOPs per image")
if "b1_dispatch" in lat and "b1_complete" in lat:
    c[3].metric("latency, batch 1", f"{lat['b1_dispatch']:.1f} ms",
                f"no skipping: {lat['b1_complete']:.1f} ms", delta_color="off",
                delta_arrow="off", help="Median of 5 forwards, measured at the end of the run "
                "on its machine (shared CPUs make it noisy); benchmarks/dyt_speed.py "
                "measures it properly.")

tab_masks, tab_rates, tab_map, tab_cost, tab_attn = st.tabs(
    ["Masks per layer", "Activation rate", "Skipped regions", "Cost vs r", "vs CLS attention"])

with tab_masks:
    def sample_label(i: int) -> str:
        y, p = int(rec.labels[i]), int(rec.preds[i])
        name = class_names[y] if y < len(class_names) else str(y)
        pred = class_names[p] if p < len(class_names) else str(p)
        mark = "✓" if y == p else f"✗ predicted {pred}"
        return f"test image {i}: {name} {mark} · {human_count(rec.sample_flops[i])}FLOPs"

    i = st.selectbox("Test image", range(rec.n_samples), format_func=sample_label,
                     key="dyt-image")
    st.plotly_chart(plots.mask_overlays(rec.sample_images[i], rec.sample_masks[i],
                                        rec.sample_probs[i], rec.grid), key="dyt-masks")
    st.caption("Darkened patches skipped that layer's MLP (they still took part in "
               "attention and went through the adapter). Hover a patch for the dispatcher's "
               "probability of keeping it; the decision is p > 0.5.")

with tab_rates:
    st.plotly_chart(plots.layer_rate_figure(dyt_view.layer_rates(rec), target=target),
                    key="dyt-layer-rates")
    st.caption("The loss only pulls the whole-model mean towards r: layers are free to "
               "differ, and so are images. In training a token is kept with probability "
               "σ(logit) (Gumbel noise, then the 0.5 threshold); at test time only when "
               "σ(logit) > 0.5. While the logits stay near 0 the two rates can differ a lot: "
               "a layer whose tokens all sit at σ ≈ 0.3 keeps 30 % of them in training and "
               "none at test time.")
    rates, counts = dyt_view.class_rates(rec, len(class_names))
    st.plotly_chart(plots.class_rate_heatmap(rates, counts, class_names), key="dyt-class")
    st.plotly_chart(plots.rate_distribution(rec.rate), key="dyt-rate-dist")

with tab_map:
    st.plotly_chart(plots.skipped_maps(dyt_view.skipped_map(rec)), key="dyt-skipped")
    st.caption(f"Share of the {rec.n_images} test images whose layer skipped each patch "
               f"({rec.grid[0]}×{rec.grid[1]} patch grid over the image).")

with tab_cost:
    st.plotly_chart(plots.flops_histogram(rec.flops, rec.flops_complete), key="dyt-flops")
    table = load_run_table().runs
    records = []
    for other in runs:
        if other.task != run.task or other.backbone != run.backbone:
            continue
        r_rec = rec if other.path == run.path else method_views.read_record(
            other, dyt_view.TokenRecord.from_artifacts, "token")
        if r_rec is not None:
            records.append({"run_id": other.id, "task": other.task, "backbone": other.backbone,
                            "r": other.config.get("method_config", {}).get("r", 0.5),
                            "record": r_rec})
    sweep, refs = dyt_view.r_sweep(records, table, task=run.task, backbone=run.backbone)
    st.plotly_chart(plots.r_sweep_figure(sweep, refs), key="dyt-sweep")
    n_r = sweep["r"].nunique()
    if n_r < 2:
        st.info(f"Only one target rate on {run.task} so far. Train another to see the "
                "trade-off, e.g. "
                f"`python -m vpeft_viz train --method dyt --data embedded:{run.task} "
                "--set r=0.3`.", icon=":material/info:")
    if refs.empty:
        st.caption(f"No full fine-tuning or AdaptFormer run on {run.task} with this backbone "
                   "to compare with.")
    st.caption("Latency is measured at the end of each run on its own machine (median of 5); "
               "open markers: the same model with every token through the MLP.")

with tab_attn:
    st.plotly_chart(plots.attention_overlap_figure(rec.overlap, rec.chance), key="dyt-overlap")
    st.caption("Does the dispatcher keep what the frozen model attends to? Per layer, the "
               "share of kept tokens that are also among the same number of patch tokens "
               "with the most CLS attention (mean over heads) in the frozen pretrained "
               "model; the dotted line is what a random pick of as many tokens would reach.")
    j = st.selectbox("Test image", range(rec.n_samples), format_func=sample_label,
                     key="dyt-attn-image")
    codes = dyt_view.agreement_codes(rec.sample_masks[j], rec.sample_attention[j])
    st.plotly_chart(plots.agreement_grid(codes, rec.grid, dyt_view.AGREEMENT),
                    key="dyt-agreement")
