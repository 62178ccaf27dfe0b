"""Figures of the SPT page: the block × matrix sensitivity map, shares, budget curve, images.

Builders take the plain tables of :mod:`vpeft_viz.analysis.sensitivity` and return a
``go.Figure`` whose hover shows the numbers behind every cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import human_count

STRUCTURED_LABEL = {"lora": "LoRA", "adapter": "adapter"}


def sensitivity_heatmap(grid: dict[str, Any], *, kind: str = "lora", title: str = "",
                        zmax: float | None = None) -> go.Figure:
    """Blocks (rows) × matrices (columns): sensitive weights per matrix, as a share of the
    matrix; cells that get a whole structured module are outlined and labelled."""
    counts, numel, structured = grid["counts"], grid["numel"], grid["structured"]
    density = 100 * grid["density"]
    ops = grid["ops"]
    depth = counts.shape[0]
    label = STRUCTURED_LABEL.get(kind, kind)
    custom = np.stack([counts, numel, grid["costs"],
                       np.where(structured, f"yes: {label}", "no: sparse entries")], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=density, x=ops, y=[f"block {b}" for b in range(depth)], customdata=custom,
        colorscale="Viridis", zmin=0, zmax=zmax, colorbar=dict(title="sensitive<br>(% of W)"),
        hovertemplate=("%{y} · %{x}<br>sensitive weights: %{customdata[0]:,}"
                       " of %{customdata[1]:,} (%{z:.2f}%)<br>structured: %{customdata[3]}"
                       "<br>parameters spent: %{customdata[2]:,}<extra></extra>")))
    ys, xs = np.nonzero(structured)
    if ys.size:
        fig.add_trace(go.Scatter(
            x=[ops[x] for x in xs], y=[f"block {y}" for y in ys], mode="markers+text",
            text=[label] * ys.size, textfont=dict(color="white", size=10),
            marker=dict(symbol="square-open", size=34, color="#ff4b4b", line=dict(width=3)),
            name=f"structured ({label})", hoverinfo="skip"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or None, height=120 + 36 * depth, showlegend=bool(ys.size),
                      legend=dict(orientation="h", y=-0.12), margin=dict(t=40 if title else 10))
    return fig


def share_bars(shares: dict[str, Any]) -> go.Figure:
    """Share of all sensitive weights per depth and per operation (SPT paper's figures)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per depth", "per operation"),
                        column_widths=[0.55, 0.45])
    for col, key in ((1, "depth"), (2, "op")):
        part = shares[key]
        fig.add_trace(go.Bar(
            x=part["labels"], y=100 * np.asarray(part["share"]), showlegend=False,
            customdata=np.stack([part["count"], 100 * np.asarray(part["density"])], axis=-1),
            marker_color="#4c78a8" if key == "depth" else "#f58518",
            hovertemplate=("%{x}<br>%{y:.1f}% of the sensitive weights"
                           "<br>%{customdata[0]:,} weights, %{customdata[1]:.2f}% of its own"
                           "<extra></extra>")), row=1, col=col)
    fig.update_yaxes(title_text="share of sensitive weights (%)", row=1, col=1)
    fig.update_layout(height=340, margin=dict(t=40))
    return fig


def budget_curve(selected: np.ndarray, totals: np.ndarray, *, target: int | None = None,
                 used: int | None = None) -> go.Figure:
    """Budget spent against sensitive weights selected: the jumps are structured modules
    switching on (budgets inside a jump cannot be reached)."""
    fig = go.Figure(go.Scatter(
        x=selected, y=totals, mode="lines", line=dict(shape="hv"), name="budget",
        hovertemplate="%{x:,} sensitive weights → %{y:,} parameters<extra></extra>"))
    if target is not None:
        fig.add_hline(y=target, line=dict(dash="dot", color="#888"),
                      annotation_text=f"target {human_count(target)}")
    if used is not None:
        fig.add_hline(y=used, line=dict(color="#ff4b4b"),
                      annotation_text=f"used {human_count(used)}",
                      annotation_position="bottom right")
    fig.update_xaxes(title="sensitive weights selected", type="log", tickformat="~s")
    fig.update_yaxes(title="trainable parameters (head excluded)", type="log",
                     tickformat="~s")
    fig.update_layout(height=320, showlegend=False, margin=dict(t=10))
    return fig


def matrix_image(image: dict[str, Any], *, name: str) -> go.Figure:
    """One matrix's sensitivity (log10 Σg², mean over pooled cells) as an image."""
    z = image["log10"]
    rs, cs = image["row_step"], image["col_step"]
    rows = np.arange(z.shape[0]) * rs
    cols = np.arange(z.shape[1]) * cs
    pooled = rs > 1 or cs > 1
    where = ("rows %{y}–%{customdata[0]}, inputs %{x}–%{customdata[1]}" if pooled
             else "output row %{y}, input %{x}")
    custom = np.stack(np.broadcast_arrays(np.minimum(rows + rs, image["rows"])[:, None] - 1,
                                          np.minimum(cols + cs, image["cols"])[None, :] - 1),
                      axis=-1)
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, customdata=custom, colorscale="Inferno",
        colorbar=dict(title="log10 Σg²"),
        hovertemplate=where + "<br>log10 sensitivity %{z:.2f}<extra></extra>"))
    if image.get("threshold_log10") is not None:
        fig.add_trace(go.Contour(
            z=z, x=cols, y=rows, showscale=False, hoverinfo="skip", name="run's threshold",
            contours=dict(start=image["threshold_log10"], end=image["threshold_log10"],
                          size=1, coloring="none"), line=dict(color="cyan", width=1)))
    note = f" (mean over {rs}×{cs} cells)" if pooled else ""
    fig.update_yaxes(autorange="reversed", title="output row", scaleanchor="x",
                     constrain="domain")
    fig.update_xaxes(title="input column", constrain="domain")
    fig.update_layout(title=f"{name}: {image['rows']}×{image['cols']}{note}", height=520,
                      margin=dict(t=40))
    return fig


def budget_breakdown(breakdowns: Sequence[tuple[str, dict[str, int]]]) -> go.Figure:
    """Stacked bars: where each allocation spends its budget."""
    parts = (("unstructured", "sparse entries"), ("structured_matrices", "structured modules"),
             ("structured_vectors", "whole vectors"), ("cls_token", "CLS token"))
    fig = go.Figure()
    for key, label in parts:
        fig.add_trace(go.Bar(
            y=[name for name, _ in breakdowns], x=[b[key] for _, b in breakdowns], name=label,
            orientation="h", hovertemplate=f"{label}: %{{x:,}}<extra>%{{y}}</extra>"))
    fig.update_layout(barmode="stack", height=150 + 40 * len(breakdowns),
                      margin=dict(t=30, b=10), title=dict(text="trainable parameters",
                                                          font=dict(size=13)),
                      legend=dict(orientation="h", y=-0.2, yanchor="top"))
    return fig
