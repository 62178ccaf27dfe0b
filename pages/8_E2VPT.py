"""E2VPT: which visual prompts and prompt pieces pruning removes, and where attention goes.

Token and piece masks per round with their importance scores, accuracy against the pruning
ratio, parameters against accuracy next to VPT-deep and LoRA, and the attention mass on the
key-value and visual prompts per block and head.
"""

from pathlib import Path

import numpy as np
import streamlit as st

from vpeft_viz.analysis import e2vpt as ana
from vpeft_viz.methods import methods_with_view
from vpeft_viz.plots import e2vpt as plots
from vpeft_viz.ui import method_views
from vpeft_viz.ui.stores import load_run_table

METHODS = methods_with_view(Path(__file__).name)  # from each method's view_page



@st.cache_data(max_entries=8, show_spinner="Measuring attention on the run's test images…")
def attention(path: str, n: int, weights_mtime_ns: int) -> dict:
    """Rebuilt once per run, image count and weights file."""
    return ana.run_attention_mass(path, n)


st.set_page_config(page_title="E2VPT · vpeft-viz", layout="wide")
st.title("E2VPT: key-value prompts, visual prompts and prompt pruning")
st.caption("Every attention layer gets learnable prompts joined to its keys and values; every "
           "block gets visual prompt tokens (VPT-deep). One token mask and one piece mask "
           "(16 pieces per token, piece j = dims j, j+16, …), shared by all blocks, are "
           "trained in a first round; their mean signed gradients rank tokens and pieces, the "
           "lowest are pruned, and each candidate pruning is retrained from a re-initialised "
           "start (rewind). The round best on validation is kept; test is evaluated once, on "
           "it. Key-value prompts are never pruned.")

runs, run = method_views.pick_run_or_stop(METHODS, what="E2VPT", key="e2vpt")
rec = method_views.read_record(run, ana.PruningRecord.from_artifacts, "E2VPT pruning")
if rec is None:
    st.stop()
summary = method_views.run_summary(run)
test_acc = summary.get("test_acc")
full = rec.depth * rec.width * (rec.num_tokens + rec.kv_tokens)
kept_tokens = int((rec.token_mask != 0).sum())
grid = ana.mask_grid(rec.token_mask, rec.piece_mask)
c = st.columns(5)
c[0].metric("visual tokens kept", f"{kept_tokens} of {rec.num_tokens}")
c[1].metric("pieces kept per token", f"{int(grid[rec.token_mask != 0].sum(1).min())} of 16"
            if kept_tokens else "0")
c[2].metric("trainable (no head)", f"{rec.params_after_pruning:,}",
            delta=f"{rec.params_after_pruning - full:,} by pruning" if rec.pruned else None,
            delta_color="off")
c[3].metric("rewind rounds", len(rec.rounds) if rec.pruned else 0)
c[4].metric("test accuracy", f"{test_acc:.3f}" if test_acc is not None else "–")
if not rec.pruned:
    st.info("This run did not prune (`prune=false`, the release's documented 'origin' VTAB "
            "recipe): all masks are 1. The attention view below still applies.",
            icon=":material/info:")

tab_masks, tab_acc, tab_params, tab_attn = st.tabs(
    ["Masks per round", "Accuracy vs pruning", "Parameters vs accuracy", "Attention on prompts"])

with tab_masks:
    labels = ["r0 mask training"] + ([f"r{int(r)}: −{int(t)} tokens, −{int(p)} pieces"
                                      for r, t, p in zip(rec.rounds["round"],
                                                         rec.rounds["tokens_pruned"],
                                                         rec.rounds["pieces_pruned"])]
                                     if rec.pruned else [])
    token_ranks = ana.score_ranks(rec.token_scores) if rec.token_scores is not None else None
    st.plotly_chart(plots.tokens_by_round(
        ana.pieces_kept_by_round(rec), labels, rec.token_scores, rec.token_scores_abs,
        token_ranks, selected=rec.selected), key="e2vpt-tokens")
    st.caption("Each row is a round; ✓ marks the round kept. The masks are shared by all "
               f"{rec.depth} blocks, so one row holds every block's mask. Hover for the "
               "importance score: the mean over training batches of the signed mask gradient "
               "(most negative is pruned first), and its mean magnitude.")
    pick = st.selectbox("Piece mask of round", range(len(labels)), format_func=lambda i:
                        labels[i], index=(rec.selected + 1) if rec.selected is not None else 0,
                        key="e2vpt-round")
    if pick == 0:
        kept = np.ones_like(rec.piece_mask, dtype=bool)
    else:
        kept = ana.mask_grid(rec.round_token_masks[pick - 1], rec.round_piece_masks[pick - 1])
    piece_ranks = ana.score_ranks(rec.piece_scores) if rec.piece_scores is not None else None
    st.plotly_chart(plots.piece_mask(kept, rec.piece_scores, rec.piece_scores_abs,
                                     piece_ranks), key="e2vpt-pieces")
    if rec.soft_token is not None:
        st.caption("After the mask-training round the soft token masks were "
                   + ", ".join(f"p{i}: {v:.3f}" for i, v in enumerate(rec.soft_token))
                   + " (they start at 1; rewinds use binary masks).")

with tab_acc:
    acc = ana.accuracy_vs_pruning(rec, test_acc)
    st.plotly_chart(plots.accuracy_vs_pruning(acc), key="e2vpt-acc")
    st.dataframe(acc, hide_index=True)
    st.caption("Validation accuracy of each round (its best epoch); the selection uses "
               "validation only (ties → more pruning). Round 0 trains soft masks and is not "
               "a candidate.")

with tab_params:
    table = load_run_table().runs
    points = ana.reference_points(table, run.task, run.backbone)
    missing = [m for m in ana.REFERENCE_METHODS if m not in set(points["method"])]
    if len(points):
        st.plotly_chart(plots.params_vs_accuracy(
            points, highlight=(rec.params_after_pruning, test_acc) if test_acc is not None
            else None), key="e2vpt-params")
        st.caption(f"Finished runs on {run.task} with {run.backbone}; E2VPT counted after "
                   "pruning. Error bars: standard deviation over seeds.")
    for m in missing:
        method_views.launch_button(
            f"Train {m} on {run.task} (reference)", key=f"e2vpt-ref-{m}", method=m,
            data=run.config["data"]["spec"], backbone=method_views.recorded(run.config))
    if missing:
        st.caption(f"No finished {', '.join(missing)} run on this task and backbone yet.")

with tab_attn:
    n = st.slider("Test images", 8, 128, 32, step=8, key="e2vpt-images")
    try:
        weights = Path(run.path) / "weights.safetensors"
        mass = attention(run.path, n, weights.stat().st_mtime_ns if weights.exists() else 0)
    except Exception as e:  # a run that cannot be rebuilt here is reported, not raised
        st.error(f"Cannot measure attention for run {run.id}: {e}", icon=":material/error:")
    else:
        layout = mass["layout"]
        st.plotly_chart(plots.attention_mass(mass["kv"].mean(0), mass["visual"].mean(0),
                                             title=f"mean over {len(mass['kv'])} test images"),
                        key="e2vpt-attn-mean")
        st.plotly_chart(plots.attention_split({k: mass[k].mean((0, 2)) for k in
                                               ("kv", "visual", "cls", "patches")}),
                        key="e2vpt-attn-split")
        st.caption(f"Share of the attention that image tokens (CLS and patches, as queries) "
                   f"give to the {layout['kv_tokens']} key-value prompts and the "
                   f"{layout['visual_tokens']} visual prompts kept. Uniform attention would "
                   "give each key the same share.")
        i = st.number_input("Image", 0, len(mass["kv"]) - 1, 0, key="e2vpt-image")
        col_img, col_map = st.columns([1, 3])
        names = mass["class_names"]
        col_img.image(mass["images"][i], width=160, caption=(
            f"label {names[int(mass['labels'][i])]}, predicted "
            f"{names[int(mass['predictions'][i])]}"))
        col_map.plotly_chart(plots.attention_mass(mass["kv"][i], mass["visual"][i],
                                                  title=f"test image {i}"),
                             key="e2vpt-attn-one")
