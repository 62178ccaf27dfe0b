"""Figures of the SCT page: block × channel saliency, score distributions, overlaps.

Builders take plain arrays from :mod:`vpeft_viz.analysis.saliency` and return a
``go.Figure`` whose hover shows the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go


def saliency_heatmap(scores: np.ndarray, normalised: np.ndarray, ranks: np.ndarray,
                     channels: np.ndarray, *, title: str = "") -> go.Figure:
    """Blocks (rows) × channels (columns): each block's saliency scaled to its maximum;
    the selected channels are marked."""
    depth, width = scores.shape
    custom = np.stack([scores, ranks], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=normalised, x=np.arange(width), y=[f"block {b}" for b in range(depth)],
        customdata=custom, colorscale="Viridis", zmin=0, zmax=1,
        colorbar=dict(title="score /<br>block max"),
        hovertemplate=("%{y} · channel %{x}<br>score %{customdata[0]:.4g} "
                       "(%{z:.2f} of the block's max)<br>rank %{customdata[1]}<extra></extra>")))
    ys = np.repeat(np.arange(depth), channels.shape[1])
    xs = channels.reshape(-1)
    fig.add_trace(go.Scatter(
        x=xs, y=[f"block {y}" for y in ys], mode="markers", name="selected (top K)",
        marker=dict(symbol="line-ns-open", size=10, color="#ff4b4b", line=dict(width=2)),
        customdata=np.stack([scores[ys, xs], ranks[ys, xs]], axis=-1),
        hovertemplate=("%{y} · channel %{x} (selected)<br>score %{customdata[0]:.4g}, "
                       "rank %{customdata[1]}<extra></extra>")))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title="channel")
    fig.update_layout(title=title or None, height=140 + 32 * depth, margin=dict(t=40 if title
                                                                                  else 10),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def score_distributions(scores: np.ndarray, channels: np.ndarray) -> go.Figure:
    """Per block, the distribution of channel scores (box), selected channels as points."""
    fig = go.Figure()
    depth = scores.shape[0]
    for b in range(depth):
        fig.add_trace(go.Box(
            y=scores[b], name=f"block {b}", marker_color="#4c78a8", boxpoints=False,
            showlegend=False, hovertemplate="block " + str(b) + "<br>%{y:.4g}<extra></extra>"))
    ys = np.concatenate([scores[b, channels[b]] for b in range(depth)])
    xs = np.concatenate([[f"block {b}"] * channels.shape[1] for b in range(depth)])
    chans = channels.reshape(-1)
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", name="selected channels", customdata=chans,
        marker=dict(color="#ff4b4b", size=4, opacity=0.7),
        hovertemplate="%{x} · channel %{customdata}<br>score %{y:.4g}<extra></extra>"))
    fig.update_yaxes(title="class-aware score (mean per-class L2 norm)", type="log")
    fig.update_layout(height=380, margin=dict(t=10), legend=dict(orientation="h", y=-0.15))
    return fig


def overlap_heatmap(names: Sequence[str], matrix: np.ndarray, *, chance: float | None = None
                    ) -> go.Figure:
    """Mean per-block Jaccard overlap of the selected channels between runs (tasks)."""
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(names), y=list(names), zmin=0, zmax=1, colorscale="Blues",
        text=np.round(matrix, 2), texttemplate="%{text}",
        colorbar=dict(title="Jaccard"),
        hovertemplate="%{y} vs %{x}<br>mean Jaccard %{z:.3f}<extra></extra>"))
    title = f"chance level ≈ {chance:.3f}" if chance is not None else None
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=140 + 60 * len(names), margin=dict(t=40))
    return fig


def class_aware_vs_plain(jaccard: np.ndarray, spearman: np.ndarray, *,
                         chance: float | None = None) -> go.Figure:
    """Per block: overlap of the class-aware and plain top-K, and their rank correlation."""
    blocks = [f"block {b}" for b in range(len(jaccard))]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=blocks, y=jaccard, name="Jaccard of the top-K sets",
                         marker_color="#9ecae9",
                         hovertemplate="%{x}<br>Jaccard %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=blocks, y=spearman, mode="lines+markers",
                             name="Spearman ρ of all scores", line=dict(color="#f58518"),
                             hovertemplate="%{x}<br>Spearman ρ %{y:.3f}<extra></extra>"))
    if chance is not None:
        fig.add_hline(y=chance, line=dict(dash="dot", color="#888"),
                      annotation_text="chance Jaccard")
    fig.update_yaxes(range=[min(0.0, float(np.nanmin(spearman))) - 0.02, 1.02])
    fig.update_layout(height=340, margin=dict(t=10), legend=dict(orientation="h", y=-0.2))
    return fig


def score_scatter(class_aware: np.ndarray, plain: np.ndarray, selected: np.ndarray,
                  plain_selected: np.ndarray, *, block: int) -> go.Figure:
    """One block's channels: class-aware against plain score, coloured by which selection
    keeps them."""
    width = class_aware.shape[0]
    ca, pl = np.zeros(width, bool), np.zeros(width, bool)
    ca[selected], pl[plain_selected] = True, True
    groups = (("both", ca & pl, "#2ca02c"), ("class-aware only", ca & ~pl, "#ff4b4b"),
              ("plain only", ~ca & pl, "#1f77b4"), ("neither", ~ca & ~pl, "#bbbbbb"))
    fig = go.Figure()
    for label, mask, colour in groups:
        idx = np.flatnonzero(mask)
        fig.add_trace(go.Scatter(
            x=plain[idx], y=class_aware[idx], mode="markers", name=f"{label} ({idx.size})",
            customdata=idx, marker=dict(color=colour, size=6),
            hovertemplate=("channel %{customdata}<br>plain %{x:.4g}<br>class-aware %{y:.4g}"
                           "<extra>" + label + "</extra>")))
    fig.update_xaxes(title="plain activation norm", type="log")
    fig.update_yaxes(title="class-aware score", type="log")
    fig.update_layout(title=f"block {block}", height=380, margin=dict(t=40))
    return fig
