"""VeLoRA: how much training memory rank-1 sub-token projections save, and what the gradients lose.

Bytes kept for backward (and the CUDA allocator peak, when measured) against G next to test
accuracy, with LoRA on the same model and batch as the reference; the cosine similarity of
the compressed to the exact weight gradients per layer over training.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import velora as ana
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import human_bytes
from vpeft_viz.plots import velora as plots
from vpeft_viz.ui import method_views
from vpeft_viz.ui.stores import load_run_table

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page

st.set_page_config(page_title="VeLoRA · vpeft-viz", layout="wide")
st.title("VeLoRA: rank-1 sub-token projections")
st.caption("LoRA on the query and value projections, with the same forward and the same "
           "input gradients. What changes is what training keeps for the weight gradient of "
           "the down-projections A: instead of each input token (D numbers), VeLoRA cuts it "
           "into G sub-tokens and keeps one fp16 number per sub-token, its projection z onto a "
           "fixed unit vector v per layer (the mean sub-token of the first training batch). "
           "Backward rebuilds the input as z·v, so the weight gradient is approximate.")

runs, run = method_views.pick_run_or_stop(METHODS, what="VeLoRA", key="velora")
rec = method_views.read_record(run, ana.VeLoRARecord.from_artifacts, "VeLoRA")
if rec is None:
    st.stop()
summary = method_views.run_summary(run)
test_acc = summary.get("test_acc")

c = st.columns(4)
c[0].metric("test accuracy", f"{test_acc:.3f}" if test_acc is not None else "–")
c[1].metric("kept for backward, one step", human_bytes(rec.saved_velora),
            f"{-rec.saving:.1%} vs LoRA ({human_bytes(rec.saved_lora)})", delta_color="off",
            delta_arrow="off", help=f"Counted with autograd's saved-tensor hooks at the run's "
            f"first step: batch {rec.batch_size}, {rec.device}, {rec.precision}; the model's "
            "parameters excluded (they are kept anyway).")
c[2].metric("down-projection inputs kept", human_bytes(rec.z_bytes),
            f"LoRA: {human_bytes(rec.lora_inputs)}", delta_color="off", delta_arrow="off",
            help=f"G = {rec.groups} sub-tokens of {rec.sub_token} per token, one fp16 number "
            "each, once per layer (q and v read the same input).")
if rec.peak_velora is not None and rec.peak_lora is not None:
    c[3].metric("allocator peak of the step", human_bytes(rec.peak_velora),
                f"LoRA: {human_bytes(rec.peak_lora)}", delta_color="off", delta_arrow="off",
                help="CUDA max_memory_allocated over forward + backward, above what was "
                "allocated before the step.")
else:
    c[3].metric("allocator peak of the step", "–", help="Measured on CUDA only; this run "
                f"trained on {rec.device}.")

tab_g, tab_grad, tab_kept = st.tabs(["Memory and accuracy vs G", "Gradient cosine",
                                     "What one step keeps"])

with tab_g:
    table = load_run_table().runs
    records = []
    for other in runs:
        if other.task != run.task or other.backbone != run.backbone:
            continue
        o_rec = rec if other.path == run.path else method_views.read_record(
            other, ana.VeLoRARecord.from_artifacts, "VeLoRA")
        if o_rec is not None:
            records.append({"run_id": other.id, "task": other.task, "backbone": other.backbone,
                            "record": o_rec})
    sweep, ref = ana.g_sweep(records, table, task=run.task, backbone=run.backbone,
                             batch_size=rec.batch_size)
    st.plotly_chart(plots.memory_vs_g(sweep, ref), key="velora-sweep")
    st.caption(f"VeLoRA runs on {run.task} with {run.backbone} whose memory was measured at "
               f"batch {rec.batch_size}. Bars: what one training step keeps for backward "
               "(parameters excluded); dashed line: plain LoRA on the same model and batch, "
               "measured in the same run. Only the down-projections' inputs change; the rest "
               "(attention, MLP, norms) is the same in both.")
    if sweep["groups"].nunique() < 2:
        st.info(f"Only one G on {run.task} so far. Train another to see the trade-off, e.g. "
                f"`python -m vpeft_viz train --method velora --data embedded:{run.task} "
                "--set groups=8`.", icon=":material/info:")
    if ref.empty:
        st.caption(f"No LoRA run on {run.task} with this backbone to compare accuracy with.")
        method_views.launch_button(
            f"Train lora on {run.task} (reference)", key="velora-ref-lora", method="lora",
            data=run.config["data"]["spec"], backbone=method_views.recorded(run.config))
    st.dataframe(sweep, hide_index=True)

with tab_grad:
    if not rec.has_gradients:
        st.info("This run recorded no gradient comparison.", icon=":material/info:")
    else:
        options = ["both", *rec.targets]
        pick = st.radio("Down-projection", options, horizontal=True, key="velora-target",
                        format_func=lambda t: "q and v (mean)" if t == "both" else t)
        target = None if pick == "both" else pick
        matrix, steps = ana.cosine_matrix(rec, target)
        st.plotly_chart(plots.cosine_heatmap(matrix, steps), key="velora-cos-map")
        st.plotly_chart(plots.cosine_lines(ana.cosine_by_point(rec, target), rec.sub_token),
                        key="velora-cos-lines")
        st.caption(f"At {len(steps)} points over the {rec.total_steps} training steps, a few "
                   "consecutive steps compare the down-projections' weight gradient VeLoRA "
                   "used with the exact one of the same step (the input gradients are exact, "
                   "so both see the same upstream gradient). Cosine 1: same direction. "
                   "VeLoRA's gradient is the exact one with each row's sub-tokens projected "
                   "onto v, so its norm is the exact norm times the cosine (times "
                   f"velora_scale = {rec.velora_scale:g}). Right: how much of the sub-tokens "
                   "themselves lies along v. Step 1 is skipped: with LoRA's B still zero, A's "
                   "gradient is zero.")

with tab_kept:
    st.plotly_chart(plots.saved_breakdown(rec.breakdown()), key="velora-breakdown")
    st.caption(f"One training step at batch {rec.batch_size} ({rec.tokens} tokens per image, "
               f"{rec.depth} layers, width {rec.width}). LoRA keeps the down-projections' "
               f"input: {rec.width} numbers per token per layer. VeLoRA keeps {rec.groups} "
               f"fp16 numbers per token per layer: {rec.lora_inputs / rec.z_bytes:.0f}× fewer "
               "bytes for these tensors. Everything else is the same tensors in both.")
