"""Figures of the VeLoRA page: training memory and accuracy against G next to LoRA, what a
step keeps for backward, and the compressed-vs-exact weight gradients per layer over
training.

Builders take plain tables and arrays from :mod:`vpeft_viz.analysis.velora`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import human_bytes

VELORA, LORA, INPUTS, OTHER = "#4c78a8", "#e45756", "#f58518", "#bab0ac"
MIB = 2**20


def _g_labels(sweep: pd.DataFrame) -> list[str]:
    return [f"G={g} ({s} wide)" for g, s in zip(sweep["groups"], sweep["sub_token"])]


def _finite(values: Sequence[float]) -> bool:
    return any(v is not None and not (isinstance(v, float) and math.isnan(v))
               for v in values)


def memory_vs_g(sweep: pd.DataFrame, ref: pd.DataFrame) -> go.Figure:
    """Per VeLoRA run (one per G): bytes kept for backward by one training step, split into
    the down-projections' inputs and the rest, with LoRA's on the same model and batch as a
    line; the CUDA allocator peak of the step when measured; test accuracy, with LoRA's
    runs of the task (mean ± std) as a band."""
    has_peak = _finite(sweep["peak_velora"].tolist())
    titles = ["kept for backward, one step (MiB)"]
    titles += ["allocator peak of the step (MiB, CUDA)"] if has_peak else []
    titles += ["test accuracy"]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles,
                        horizontal_spacing=0.09)
    x = _g_labels(sweep)
    ids = sweep["run_id"]
    fig.add_trace(go.Bar(x=x, y=sweep["z_bytes"] / MIB, name="down-projection inputs "
                         "(VeLoRA: one fp16 number per sub-token)", marker_color=INPUTS,
                         customdata=ids, hovertemplate="%{x}<br>%{y:.2f} MiB<br>%{customdata}"
                         "<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=(sweep["saved_velora"] - sweep["z_bytes"]) / MIB,
                         name="everything else kept (as LoRA)", marker_color=OTHER,
                         customdata=ids, hovertemplate="%{x}<br>%{y:.2f} MiB<br>%{customdata}"
                         "<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=sweep["saved_lora"] / MIB, mode="lines+markers",
                             name="LoRA, same model and batch", line=dict(color=LORA,
                                                                          dash="dash"),
                             hovertemplate="%{x}: LoRA keeps %{y:.2f} MiB<extra></extra>"),
                  row=1, col=1)
    col = 2
    if has_peak:
        for name, key, colour in (("VeLoRA peak", "peak_velora", VELORA),
                                  ("LoRA peak", "peak_lora", LORA)):
            fig.add_trace(go.Scatter(x=x, y=sweep[key] / MIB, mode="lines+markers", name=name,
                                     line=dict(color=colour), hovertemplate=(
                                         "%{x}<br>%{y:.1f} MiB<extra></extra>")), row=1, col=2)
        col = 3
    fig.add_trace(go.Scatter(x=x, y=sweep["test_acc"], mode="lines+markers", name="VeLoRA",
                             line=dict(color=VELORA), customdata=ids,
                             hovertemplate="%{x}<br>test %{y:.3f}<br>%{customdata}"
                             "<extra></extra>"), row=1, col=col)
    for _, r in ref.iterrows():
        label = f"LoRA ({int(r['runs'])} run{'s' if r['runs'] != 1 else ''})"
        fig.add_hline(y=float(r["test_acc"]), line=dict(color=LORA, dash="dash"), row=1,
                      col=col, annotation_text=label, annotation_font_size=10)
        std = float(r["test_acc_std"])
        if r["runs"] > 1 and math.isfinite(std) and std > 0:
            fig.add_hrect(y0=r["test_acc"] - std, y1=r["test_acc"] + std, fillcolor=LORA,
                          opacity=0.12, line_width=0, row=1, col=col)
    fig.update_layout(barmode="stack", height=400, margin=dict(t=40),
                      legend=dict(orientation="h", y=-0.3))
    return fig


def saved_breakdown(df: pd.DataFrame) -> go.Figure:
    """LoRA and VeLoRA (rows): the down-projections' inputs and everything else kept for
    backward by one training step."""
    fig = go.Figure()
    for key, name, colour in (("inputs", "down-projection inputs", INPUTS),
                              ("other", "everything else", OTHER)):
        fig.add_trace(go.Bar(y=df["method"], x=df[key] / MIB, orientation="h", name=name,
                             marker_color=colour, customdata=[human_bytes(b) for b in df[key]],
                             hovertemplate="%{y}: %{customdata}<extra>" + name + "</extra>"))
    for _, r in df.iterrows():
        fig.add_annotation(y=r["method"], x=r["total"] / MIB, text=human_bytes(r["total"]),
                           showarrow=False, xanchor="left", xshift=6)
    fig.update_xaxes(title="kept for backward, one training step (MiB; parameters excluded)")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(barmode="stack", height=230, margin=dict(t=10, r=80),
                      legend=dict(orientation="h", y=-0.45))
    return fig


def cosine_heatmap(matrix: np.ndarray, steps: Sequence[float], *, what: str = "cosine",
                   zmin: float = 0.0, zmax: float = 1.0) -> go.Figure:
    """Layers (rows) × points over training (columns) of the compressed-vs-exact weight
    gradient comparison."""
    cols = [f"step {s:.0f}" for s in steps]
    fig = go.Figure(go.Heatmap(
        z=matrix, x=cols, y=[f"layer {i}" for i in range(matrix.shape[0])], zmin=zmin,
        zmax=zmax, colorscale="Viridis", colorbar=dict(title=what),
        hovertemplate="%{y} · %{x}<br>" + what + " %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title="training step (mean of the batches measured there)")
    fig.update_layout(height=120 + 34 * matrix.shape[0], margin=dict(t=10))
    return fig


def cosine_lines(df: pd.DataFrame, sub_token: int) -> go.Figure:
    """Per layer over training: cosine similarity of the compressed to the exact weight
    gradient, and the share of the sub-tokens' energy along ``v`` (dotted: what a random
    unit vector captures of isotropic sub-tokens, 1/sub-token width)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "cosine(compressed, exact weight gradient)", "sub-tokens' energy along v"),
        horizontal_spacing=0.08)
    layers = sorted(df["layer"].unique())
    colours = [f"hsl({int(240 - 240 * i / max(len(layers) - 1, 1))},60%,45%)"
               for i in range(len(layers))]
    for layer, colour in zip(layers, colours):
        d = df[df["layer"] == layer]
        for c, key in enumerate(("cos", "energy"), start=1):
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines+markers",
                                     name=f"layer {layer}", legendgroup=str(layer),
                                     showlegend=c == 1, line=dict(color=colour),
                                     hovertemplate=f"layer {layer}<br>step %{{x:.0f}}<br>"
                                     f"{key} %{{y:.3f}}<extra></extra>"), row=1, col=c)
    fig.add_hline(y=1 / sub_token, line=dict(dash="dot", color="#888"), row=1, col=2,
                  annotation_text=f"random direction: 1/{sub_token}", annotation_font_size=10)
    fig.update_xaxes(title="training step")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(height=360, margin=dict(t=40), legend=dict(orientation="h", y=-0.3))
    return fig
