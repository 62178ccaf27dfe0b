"""HST: hierarchical side-tuning, what the side network beside the frozen ViT sees.

The side network's feature maps per stage for a test image, the meta tokens' norms per ViT
layer, and how much of each side block's cross-attention goes to the meta token.
"""

from pathlib import Path

import streamlit as st

from vpeft_viz.analysis import hst as ana
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import hst as plots
from vpeft_viz.ui import method_views

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page


@st.cache_data(max_entries=16, show_spinner="Tracing the image through the run's model…")
def traced(path: str, index: int, weights_mtime_ns: int) -> dict:
    """Rebuilt once per run, image and weights file."""
    return ana.run_trace(path, index)


st.set_page_config(page_title="HST · vpeft-viz", layout="wide")
st.title("HST: hierarchical side-tuning")
st.caption("The ViT stays frozen (only its block LayerNorms train). Every ViT layer gets a "
           "learned meta token, prepended before CLS and read out after the block. A small "
           "side network runs beside it in stages at falling resolution, starting from the "
           "image through a conv stem; each stage is fed by consecutive ViT layers, one side "
           "block per layer. A side block lets its tokens cross-attend to two keys, the "
           "layer's meta token and the mean of its patch features (both bridged to the "
           "stage's width), then adds the bridged patch features, resized to its grid. The "
           "classifier reads the last stage, mean-pooled and batch-normalised.")

runs, run = method_views.pick_run_or_stop(METHODS, what="HST", key="hst")
rec = method_views.read_record(run, ana.SideRecord.from_artifacts, "HST side-network")
if rec is None:
    st.stop()
summary = method_views.run_summary(run)
class_names = method_views.run_class_names(run)
layers = ana.layer_table(rec)
blocks = ana.block_table(rec)
uniform = rec.num_meta / (rec.num_meta + 1)  # equal attention to every key
stage_titles = [f"stage {i + 1} · {g[0]}×{g[1]} · {w} wide"
                for i, (g, w) in enumerate(zip(rec.grids, rec.widths))]

c = st.columns(4)
test_acc = summary.get("test_acc", rec.accuracy)
c[0].metric("test accuracy", f"{test_acc:.1%}", help=f"{len(rec.labels)} test images")
n_params = summary.get("trainable_params_excl_head")
c[1].metric("trainable (no head)", f"{n_params:,}" if n_params is not None else "–")
c[2].metric("side stages", f"{rec.n_stages}",
            " / ".join(f"{g[0]}×{g[1]}" for g in rec.grids) + f" (ViT {rec.vit_grid[0]}×"
            f"{rec.vit_grid[1]})", delta_color="off", delta_arrow="off",
            help="Stage grids; each stage is fed by ViT layers "
            + ", ".join(f"{la[0]}–{la[-1]}" for la in rec.stage_layers))
c[3].metric("attention on the meta token", f"{blocks['meta_share'].mean():.1%}",
            f"equal split: {uniform:.0%}", delta_color="off", delta_arrow="off",
            help="Mean over side blocks, heads, side tokens and test images")


def sample_label(i: int) -> str:
    y, p = int(rec.labels[i]), int(rec.preds[i])
    name = class_names[y] if y < len(class_names) else str(y)
    pred = class_names[p] if p < len(class_names) else str(p)
    return f"test image {i}: {name} " + ("✓" if y == p else f"✗ predicted {pred}")


tab_maps, tab_meta, tab_attn = st.tabs(["Side feature maps", "Meta tokens", "Cross-attention"])

with tab_maps:
    i = st.selectbox("Test image", range(rec.samples.n_images), format_func=sample_label,
                     key="hst-image")
    s = rec.samples
    st.plotly_chart(plots.stage_maps(s.images[i], [n[i] for n in s.norms],
                                     [p[i] for p in s.pcas], stage_titles), key="hst-maps")
    st.caption("Top: the norm of each side token at the end of its stage (before the stage's "
               "final LayerNorm). Bottom: the stage's first three principal components as "
               f"red, green and blue, fitted over the {s.n_images} stored test images "
               "together, so colours compare across them. Bright, structured maps show "
               "where the side network puts its features.")
    st.plotly_chart(plots.stage_maps(None, rec.mean_norm, None, stage_titles).update_layout(
        title=f"Token norms, mean over the {len(rec.labels)} test images"), key="hst-mean-maps")

    with st.expander("Another test image, traced again from the run's weights"):
        j = st.number_input("Test image index", 0, 100_000, rec.samples.n_images,
                            key="hst-trace-index")
        weights = Path(run.path) / "weights.safetensors"
        if not weights.is_file():
            st.info(f"Run {run.id} has no stored weights (shipped runs of a side network this "
                    "size leave them out); train one to trace any image.",
                    icon=":material/info:")
        elif st.toggle("Trace it", key="hst-trace", help="Rebuilds the run's model (a few "
                       "seconds the first time) and traces the image through it"):
            try:
                out = traced(run.path, int(j), weights.stat().st_mtime_ns)
            except Exception as e:  # a run that cannot be rebuilt here is reported
                st.error(f"Cannot trace run {run.id}: {e}", icon=":material/error:")
            else:
                t, names = out["trace"], out["class_names"]
                st.plotly_chart(plots.stage_maps(t.images[0], [n[0] for n in t.norms],
                                                 [p[0] for p in t.pcas], stage_titles),
                                key="hst-traced-maps")
                st.caption(f"Test image {int(j)}: {names[out['label']]}, predicted "
                           f"{names[out['pred']]}. Principal components fitted on this "
                           "image alone.")

with tab_meta:
    st.plotly_chart(plots.meta_norms(layers), key="hst-meta")
    st.caption("Left: the meta token's norm after each ViT block against the mean norm of the "
               "patch tokens there. Right: the learned token itself (what is prepended), at "
               "initialisation (Xavier uniform) and after training; hover for how far it "
               "moved. The bridge and a LayerNorm per layer map the block's output to the "
               "stage's width before the side blocks read it.")
    st.dataframe(layers, hide_index=True)

with tab_attn:
    c1, c2, c3 = st.columns(3)
    k = c1.selectbox("Test image", range(rec.samples.n_images), format_func=sample_label,
                     key="hst-attn-image")
    stage = c2.selectbox("Stage", range(rec.n_stages), format_func=lambda s: stage_titles[s],
                         key="hst-stage")
    head = c3.selectbox("Head", range(rec.heads[stage] + 1), key=f"hst-head-{stage}",
                        format_func=lambda h: f"head {h - 1}" if h else "mean over heads")
    maps = ana.meta_attention_maps(rec.samples.attn[stage][k], rec.grids[stage], rec.num_meta,
                                   head - 1 if head else None)
    st.plotly_chart(plots.attention_maps(maps, rec.stage_layers[stage], stage=stage + 1,
                                         image=rec.samples.images[k]), key="hst-attn-maps")
    st.caption("Each side token (query) spreads its attention over two keys: the ViT layer's "
               "meta token and the mean of that layer's bridged patch features (the global "
               "token). Red: mostly the meta token; blue: mostly the global token.")
    st.plotly_chart(plots.meta_share_bars(blocks, uniform=uniform), key="hst-share")
    st.caption(f"Over the {len(rec.labels)} test images: the share of each side block's "
               "attention on the meta token (bar: mean over heads and side tokens; whisker: "
               "the lowest and highest head).")
