"""SCT: salient channels, which channels a task uses.

Saliency maps, score distributions, overlap between tasks, class-aware vs plain.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import saliency as sal
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import sct as plots
from vpeft_viz.ui import method_views

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page

st.set_page_config(page_title="SCT · vpeft-viz", layout="wide")
st.title("SCT: salient channel tuning")
st.caption("The frozen model sees every training image. At the input of each block's second "
           "LayerNorm (right after attention), each channel's L2 norm is taken over each "
           "class's images and tokens and averaged over the classes (class-aware score). The "
           "top K channels per block (1/8 of the width) get a small K×K layer.")

runs, run = method_views.pick_run_or_stop(METHODS, what="SCT", key="sct")
sel = method_views.read_record(run, sal.ChannelSelection.from_artifacts, "saliency")
if sel is None:
    st.stop()
state = method_views.method_state(run)
c = st.columns(4)
c[0].metric("channels per block", f"{sel.k} of {sel.width}")
c[1].metric("trainable (no head)", f"{sel.depth * (sel.k ** 2 + sel.k):,}")
c[2].metric("images scored", f"{state.get('images', int(sel.class_counts.sum())):,}")
c[3].metric("classes", state.get("classes", int((sel.class_counts > 0).sum())))

tab_map, tab_dist, tab_tasks, tab_plain = st.tabs(
    ["Saliency map", "Score distributions", "Across tasks", "Class-aware vs plain"])

with tab_map:
    st.plotly_chart(plots.saliency_heatmap(sel.class_aware, sal.normalised_scores(
        sel.class_aware), sal.channel_ranks(sel.class_aware), sel.channels), key="sct-map")
    st.caption("Each block is scaled to its own maximum (the residual stream grows with "
               "depth). Red ticks: the selected channels.")

with tab_dist:
    st.plotly_chart(plots.score_distributions(sel.class_aware, sel.channels), key="sct-dist")

with tab_tasks:
    same = [r for r in runs if r.backbone == run.backbone]
    picked = st.multiselect("Runs to compare (same backbone)", range(len(same)),
                            default=list(range(min(len(same), 6))),
                            format_func=lambda i: same[i].label, key="sct-tasks")
    if len(picked) < 2:
        st.info("Pick at least two runs (ideally one per task) to see their overlap.")
    else:
        chosen = {}
        for i in picked:
            name = f"{same[i].task} · s{same[i].seed}"
            name += f" ({same[i].id[-6:]})" if name in chosen else ""
            other = method_views.read_record(same[i], sal.ChannelSelection.from_artifacts,
                                        "saliency")
            if other is not None:
                chosen[name] = other.channels
        names, matrix = sal.overlap_matrix(chosen)
        st.plotly_chart(plots.overlap_heatmap(names, matrix, chance=sal.expected_random_jaccard(
            sel.width, sel.k)), key="sct-overlap")
        st.caption("Mean over blocks of |A ∩ B| / |A ∪ B|; the chance level is the expected "
                   "overlap of two random selections of the same size.")

with tab_plain:
    cmp = sal.class_aware_vs_plain(sel)
    st.plotly_chart(plots.class_aware_vs_plain(cmp["jaccard"], cmp["spearman"],
                                               chance=cmp["chance"]), key="sct-plain")
    block = (st.slider("Block", 0, sel.depth - 1, sel.depth - 1, key="sct-block")
             if sel.depth > 1 else 0)
    st.plotly_chart(plots.score_scatter(sel.class_aware[block], sel.plain[block],
                                        sel.channels[block], cmp["plain_channels"][block],
                                        block=block), key="sct-scatter")
    st.caption("Plain selection: the top K channels by activation norm over all images, "
               "ignoring classes. Averaging per-class norms keeps channels that matter for "
               "small classes too.")
