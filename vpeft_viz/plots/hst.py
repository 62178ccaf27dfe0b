"""Figures of the HST page: the side network's feature maps per stage for one image, the meta
tokens' norms per ViT layer, and the side blocks' cross-attention on the meta token.

Builders take plain arrays and tables from :mod:`vpeft_viz.analysis.hst` and return a
``go.Figure`` whose hover shows the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

STAGE_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")
META, PATCHES = "#e45756", "#7f7f7f"


def _hide_axes(fig: go.Figure) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")


def stage_maps(image: np.ndarray | None, norms: Sequence[np.ndarray],
               pcas: Sequence[np.ndarray] | None, titles: Sequence[str]) -> go.Figure:
    """Top row: the image (when given), then each stage's token norm (before the stage's final
    norm) on its grid; bottom row (when ``pcas`` are given): each stage's first three
    principal components as red, green, blue."""
    n, off = len(norms), int(image is not None)
    rows = 1 + int(pcas is not None)
    names = (["image"] if off else []) + list(titles)
    if pcas is not None:
        names += ([""] if off else []) + [f"{t} · PCA" for t in titles]
    fig = make_subplots(rows=rows, cols=n + off, horizontal_spacing=0.02,
                        vertical_spacing=0.08, subplot_titles=names)
    if off:
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=1, col=1)
    for i, norm in enumerate(norms):
        h, w = norm.shape
        rr, cc = np.mgrid[0:h, 0:w]
        fig.add_trace(go.Heatmap(
            z=norm, colorscale="Viridis", showscale=False,
            customdata=np.stack([rr, cc], -1),
            hovertemplate=(f"{titles[i]} · token (%{{customdata[0]}}, %{{customdata[1]}})<br>"
                           "norm %{z:.3f}<extra></extra>")), row=1, col=i + 1 + off)
        if pcas is not None:
            fig.add_trace(go.Image(z=(np.clip(pcas[i], 0, 1) * 255).round().astype(np.uint8),
                                   hovertemplate="PC1–3 as RGB %{z}<extra></extra>"),
                          row=2, col=i + 1 + off)
    _hide_axes(fig)
    fig.update_layout(height=60 + 190 * rows, margin=dict(t=40, b=10, l=10, r=10))
    return fig


def meta_norms(table: pd.DataFrame) -> go.Figure:
    """Per ViT layer: the meta token's norm after the block against the mean patch-token
    norm (test-split means), and the learned token itself at init and after training, the
    layers shaded by the side stage they feed."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "after the block (test-split mean)", "the learned token (block input)"])
    x = table["layer"]
    fig.add_trace(go.Scatter(x=x, y=table["meta_out_norm"], name="meta token", mode="lines+markers",
                             line=dict(color=META), customdata=table[["stage", "out_vs_patches"]],
                             hovertemplate="layer %{x} (stage %{customdata[0]})<br>meta token "
                             "%{y:.3f} · %{customdata[1]:.2f}× the patches<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=table["patch_out_norm"], name="patch tokens (mean)",
                             mode="lines+markers", line=dict(color=PATCHES, dash="dot"),
                             hovertemplate="layer %{x}<br>patch tokens %{y:.3f}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=table["meta_token_norm"], name="trained", marker_color=META,
                         customdata=table[["meta_shift_norm"]],
                         hovertemplate="layer %{x}<br>‖token‖ %{y:.3f}<br>moved "
                         "%{customdata[0]:.3f} from its init<extra></extra>"), row=1, col=2)
    if table["meta_init_norm"].notna().all():
        fig.add_trace(go.Bar(x=x, y=table["meta_init_norm"], name="at init",
                             marker_color="rgba(127,127,127,0.5)",
                             hovertemplate="layer %{x}<br>‖token‖ at init %{y:.3f}"
                             "<extra></extra>"), row=1, col=2)
    for stage, rows in table.groupby("stage"):
        for col in (1, 2):
            fig.add_vrect(x0=rows["layer"].min() - 0.5, x1=rows["layer"].max() + 0.5,
                          fillcolor=STAGE_COLOURS[(int(stage) - 1) % len(STAGE_COLOURS)],
                          opacity=0.08, line_width=0, row=1, col=col,
                          annotation_text=f"stage {int(stage)}" if col == 1 else None,
                          annotation_position="top left")
    fig.update_xaxes(title="ViT layer", dtick=1)
    fig.update_yaxes(title="L2 norm", row=1, col=1, rangemode="tozero")
    fig.update_layout(height=380, barmode="group", margin=dict(t=40, b=10, l=10, r=10),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def attention_maps(maps: np.ndarray, layers: Sequence[int], *, stage: int,
                   image: np.ndarray | None = None) -> go.Figure:
    """One panel per side block of a stage: each side token's attention on the meta token
    (0: all on the global token, 1: all on the meta token), on the stage's grid."""
    blocks = maps.shape[0]
    cols = blocks + (image is not None)
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.03, subplot_titles=(
        (["image"] if image is not None else [])
        + [f"block {j + 1} ← ViT layer {layers[j]}" for j in range(blocks)]))
    if image is not None:
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=1, col=1)
    for j in range(blocks):
        h, w = maps[j].shape
        rr, cc = np.mgrid[0:h, 0:w]
        fig.add_trace(go.Heatmap(
            z=maps[j], zmin=0, zmax=1, colorscale="RdBu_r", showscale=j == blocks - 1,
            colorbar=dict(title="on meta", len=0.9), customdata=np.stack([rr, cc], -1),
            hovertemplate=(f"stage {stage} block {j + 1} · token (%{{customdata[0]}}, "
                           "%{customdata[1]})<br>on the meta token %{z:.3f}<extra></extra>")),
            row=1, col=j + 1 + (image is not None))
    _hide_axes(fig)
    fig.update_layout(height=300, margin=dict(t=40, b=10, l=10, r=10))
    return fig


def meta_share_bars(table: pd.DataFrame, *, uniform: float) -> go.Figure:
    """Per side block, the share of its attention on the meta token over the test split: the
    mean over heads (bar) and the lowest and highest head (whisker); ``uniform`` marks equal
    attention to every key."""
    labels = [f"s{s}·b{b} (L{la})" for s, b, la in
              zip(table["stage"], table["block"], table["layer"])]
    fig = go.Figure(go.Bar(
        x=labels, y=table["meta_share"],
        marker_color=[STAGE_COLOURS[(int(s) - 1) % len(STAGE_COLOURS)] for s in table["stage"]],
        error_y=dict(type="data", symmetric=False,
                     array=table["max_head"] - table["meta_share"],
                     arrayminus=table["meta_share"] - table["min_head"]),
        customdata=table[["min_head", "max_head", "heads"]],
        hovertemplate=("%{x}<br>on the meta token %{y:.3f} (mean of %{customdata[2]} heads; "
                       "%{customdata[0]:.3f}–%{customdata[1]:.3f})<extra></extra>")))
    fig.add_hline(y=uniform, line_dash="dot", line_color=PATCHES,
                  annotation_text="equal attention to every key",
                  annotation_position="top right")
    fig.update_yaxes(title="attention on the meta token", range=[0, 1])
    fig.update_xaxes(title="side block (stage·block, the ViT layer feeding it)")
    fig.update_layout(height=360, margin=dict(t=30, b=10, l=10, r=10), showlegend=False)
    return fig
