"""Figures of the DyT page: per-layer token masks over an image, activation rates, skipped
regions, costs against the target rate r, and the kept tokens against CLS attention.

Builders take plain arrays from :mod:`vpeft_viz.analysis.dyt` and return a ``go.Figure``
whose hover shows the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..analysis.cost import human_count

SKIPPED = "rgba(20, 20, 40, 0.72)"
KEPT_LINE = "#ff4b4b"
AGREEMENT_COLOURS = ("#eeeeee", "#4c78a8", "#f58518", "#2ca02c")
_REF_STYLE = {"full": ("#7f7f7f", "dash"), "adaptformer": ("#9467bd", "dot")}


def _grid_shape(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def mask_overlays(image: np.ndarray, masks: np.ndarray, probs: np.ndarray,
                  grid: tuple[int, int], *, cols: int = 4) -> go.Figure:
    """One panel per layer: the image with the patches that layer's MLP skipped darkened;
    hovering a patch gives the dispatcher's probability σ(logit) and the decision."""
    depth = masks.shape[0]
    rows, cols = _grid_shape(depth, cols)
    h, w = image.shape[:2]
    gh, gw = grid
    ph, pw = h / gh, w / gw
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[
        f"layer {i} · {int(masks[i].sum())}/{masks.shape[1]} kept" for i in range(depth)],
        horizontal_spacing=0.02, vertical_spacing=0.06)
    for i in range(depth):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=r, col=c)
        kept = masks[i].reshape(gh, gw)
        rr, cc = np.mgrid[0:gh, 0:gw]
        fig.add_trace(go.Heatmap(
            z=(~kept).astype(float), x0=pw / 2 - 0.5, dx=pw, y0=ph / 2 - 0.5, dy=ph,
            colorscale=[[0, "rgba(0,0,0,0)"], [1, SKIPPED]], zmin=0, zmax=1, showscale=False,
            customdata=np.stack([probs[i].reshape(gh, gw), rr, cc], -1),
            hovertemplate=(f"layer {i} · patch (%{{customdata[1]}}, %{{customdata[2]}})<br>"
                           "p(keep) = %{customdata[0]:.3f}<extra></extra>")),
            row=r, col=c)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False)
    fig.update_layout(height=60 + 190 * rows, margin=dict(t=30, b=10, l=10, r=10))
    return fig


def layer_rate_figure(stats: dict[str, np.ndarray], *, target: float | None = None
                      ) -> go.Figure:
    """Per layer: mean activation rate over the test images (± one standard deviation) and
    the 10th–90th percentile band."""
    layers = [f"layer {i}" for i in range(len(stats["mean"]))]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers + layers[::-1],
                             y=np.concatenate([stats["p90"], stats["p10"][::-1]]),
                             fill="toself", fillcolor="rgba(76,120,168,0.18)",
                             line=dict(width=0), hoverinfo="skip",
                             name="10th–90th percentile of images"))
    fig.add_trace(go.Scatter(
        x=layers, y=stats["mean"], mode="lines+markers", name="mean over test images",
        error_y=dict(type="data", array=stats["std"], visible=True),
        line=dict(color="#4c78a8"),
        hovertemplate="%{x}<br>mean %{y:.3f} ± %{error_y.array:.3f}<extra></extra>"))
    if target is not None:
        fig.add_hline(y=target, line=dict(dash="dot", color="#888"),
                      annotation_text=f"target r = {target:g} (whole-model mean)")
    fig.update_yaxes(title="share of patch tokens through the MLP", range=[-0.02, 1.02])
    fig.update_layout(height=360, margin=dict(t=10), legend=dict(orientation="h", y=-0.2))
    return fig


def class_rate_heatmap(rates: np.ndarray, counts: np.ndarray,
                       class_names: Sequence[str]) -> go.Figure:
    """Classes × layers mean activation rate."""
    names = [f"{class_names[c] if c < len(class_names) else c} ({counts[c]})"
             for c in range(rates.shape[0])]
    fig = go.Figure(go.Heatmap(
        z=rates, x=[f"layer {i}" for i in range(rates.shape[1])], y=names, zmin=0, zmax=1,
        colorscale="Viridis", colorbar=dict(title="rate"),
        hovertemplate="%{y} · %{x}<br>rate %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="class (test images)")
    fig.update_layout(height=120 + 26 * len(names), margin=dict(t=10))
    return fig


def rate_distribution(rate: np.ndarray) -> go.Figure:
    """Per layer, the distribution of the per-image activation rate (box)."""
    fig = go.Figure()
    for i in range(rate.shape[1]):
        fig.add_trace(go.Box(y=rate[:, i], name=f"layer {i}", marker_color="#4c78a8",
                             boxpoints=False, showlegend=False))
    fig.update_yaxes(title="per-image rate", range=[-0.02, 1.02])
    fig.update_layout(height=340, margin=dict(t=10))
    return fig


def skipped_maps(maps: np.ndarray, *, cols: int = 5) -> go.Figure:
    """(L + 1, gh, gw) share of test images skipping each patch: one panel per layer and
    one for the mean over layers (the last)."""
    n = maps.shape[0]
    rows, cols = _grid_shape(n, cols)
    titles = [f"layer {i}" for i in range(n - 1)] + ["mean over layers"]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.02, vertical_spacing=0.07)
    for i in range(n):
        fig.add_trace(go.Heatmap(
            z=maps[i], zmin=0, zmax=1, colorscale="Magma", showscale=i == 0,
            colorbar=dict(title="skipped"),
            hovertemplate=(f"{titles[i]}<br>patch row %{{y}}, col %{{x}}<br>"
                           "skipped by %{z:.1%} of images<extra></extra>")),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(height=60 + 170 * rows, margin=dict(t=30, b=10))
    return fig


def flops_histogram(flops: np.ndarray, complete: float) -> go.Figure:
    """Per-image FLOPs of the test split, with the no-skipping model's FLOPs marked."""
    fig = go.Figure(go.Histogram(x=flops, nbinsx=40, marker_color="#4c78a8",
                                 hovertemplate="%{x}<br>%{y} images<extra></extra>"))
    fig.add_vline(x=complete, line=dict(dash="dash", color="#888"),
                  annotation_text=f"no skipping: {human_count(complete)}FLOPs")
    fig.add_vline(x=float(np.mean(flops)), line=dict(color=KEPT_LINE),
                  annotation_text=f"mean {human_count(float(np.mean(flops)))}",
                  annotation_position="top left")
    fig.update_xaxes(title="FLOPs per image (counted from the tokens processed)")
    fig.update_yaxes(title="test images")
    fig.update_layout(height=340, margin=dict(t=30), bargap=0.02)
    return fig


def r_sweep_figure(sweep: pd.DataFrame, refs: pd.DataFrame) -> go.Figure:
    """Test accuracy, mean FLOPs per image and measured batch-1 latency against the target
    rate r; full fine-tuning and AdaptFormer runs of the same task as horizontal lines, and
    each DyT run's own no-skipping latency as open markers."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "test accuracy", "FLOPs per image", "latency at batch 1 (ms, in-run)"),
        horizontal_spacing=0.08)
    hover = "r = %{x}<br>%{y:.4g}<br>%{customdata}<extra></extra>"
    ids = sweep["run_id"]
    for col, y, name in ((1, "test_acc", "DyT"), (2, "flops", "DyT"),
                         (3, "latency_b1_ms", "DyT (skipping)")):
        fig.add_trace(go.Scatter(x=sweep["r"], y=sweep[y], mode="lines+markers", name=name,
                                 customdata=ids, line=dict(color=KEPT_LINE),
                                 showlegend=col == 1, hovertemplate=hover), row=1, col=col)
    fig.add_trace(go.Scatter(x=sweep["r"], y=sweep["latency_b1_complete_ms"], mode="markers",
                             name="same run, no skipping", customdata=ids,
                             marker=dict(symbol="circle-open", size=9, color="#555"),
                             hovertemplate=hover), row=1, col=3)
    for _, ref in refs.iterrows():
        colour, dash = _REF_STYLE.get(ref["method"], ("#888", "dash"))
        label = f"{ref['method']} ({int(ref['runs'])} run{'s' if ref['runs'] > 1 else ''})"
        for col, y in ((1, ref["test_acc"]), (2, ref["flops"])):
            if y is not None and not (isinstance(y, float) and math.isnan(y)):
                fig.add_hline(y=float(y), line=dict(dash=dash, color=colour), row=1, col=col,
                              annotation_text=label if col == 1 else ref["method"],
                              annotation_font_size=10)
    fig.update_xaxes(title="target rate r", range=[0, 1.05])
    fig.update_layout(height=380, margin=dict(t=40), legend=dict(orientation="h", y=-0.25))
    return fig


def attention_overlap_figure(overlap: np.ndarray, chance: np.ndarray) -> go.Figure:
    """Per layer: share of the kept tokens that are also among the same number of tokens
    with the most CLS attention in the frozen model, and that share for a random pick."""
    layers = [f"layer {i}" for i in range(len(overlap))]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=overlap, name="kept ∩ top CLS attention",
                         marker_color="#2ca02c",
                         hovertemplate="%{x}<br>overlap %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=chance, mode="lines+markers",
                             name="chance (random pick of as many tokens)",
                             line=dict(dash="dot", color="#888"),
                             hovertemplate="%{x}<br>chance %{y:.3f}<extra></extra>"))
    fig.update_yaxes(title="share of kept tokens", range=[0, 1.02])
    fig.update_layout(height=340, margin=dict(t=10), legend=dict(orientation="h", y=-0.2))
    return fig


def agreement_grid(codes: np.ndarray, grid: tuple[int, int], labels: Sequence[str], *,
                   cols: int = 6) -> go.Figure:
    """One panel per layer: each patch coloured by whether the dispatcher kept it and
    whether it is among the top-CLS-attention tokens of the same count."""
    depth = codes.shape[0]
    rows, cols = _grid_shape(depth, cols)
    n = len(labels)
    scale = [[v, AGREEMENT_COLOURS[i]] for i in range(n) for v in (i / n, (i + 1) / n)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {i}" for i in
                                                              range(depth)],
                        horizontal_spacing=0.02, vertical_spacing=0.08)
    names = np.array(labels, dtype=object)
    for i in range(depth):
        z = codes[i].reshape(grid)
        fig.add_trace(go.Heatmap(
            z=z, zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=i == 0,
            customdata=names[z],
            colorbar=dict(tickvals=list(range(n)), ticktext=list(labels), title=""),
            hovertemplate=f"layer {i}<br>row %{{y}}, col %{{x}}<br>%{{customdata}}"
                          "<extra></extra>"), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(height=60 + 160 * rows, margin=dict(t=30, b=10))
    return fig
