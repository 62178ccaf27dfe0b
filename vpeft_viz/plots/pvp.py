"""Figures of the PVP page: accuracy against shots for pre-trained and random-initialised
prompts, the gain per k, and how far the prompts move from where they started (cosine
similarity per layer).

Builders take the tables of :mod:`vpeft_viz.analysis.pvp` and return a ``go.Figure`` whose
hover shows the numbers (accuracies in %).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

INIT_STYLE = {"pretrained": ("#1f77b4", "solid", "circle", "pre-trained prompts (PVP)"),
              "random": ("#ff7f0e", "dash", "square", "random prompts (VPT-deep init)")}


def _style(init: str) -> tuple[str, str, str, str]:
    return INIT_STYLE.get(init, ("#7f7f7f", "dot", "diamond", init))


def shots_figure(curves: pd.DataFrame, *, acc: str = "test_acc",
                 chance: float | None = None,
                 vpt_deep: pd.DataFrame | None = None) -> go.Figure:
    """Accuracy against training images per class (log₂ axis), one line per init with
    ±1 std error bars over seeds; runs on the whole training split (PVP's, and VPT-deep's
    given as ``vpt_deep``) as dotted lines."""
    fig = go.Figure()
    what = "test" if acc == "test_acc" else "validation"
    few = curves[curves["shots"].notna()]
    full = curves[curves["shots"].isna()]
    ks = sorted({int(k) for k in few["shots"]}) or [1, 2, 4, 8, 16]
    for init, rows in few.groupby("init", sort=False):
        colour, dash, symbol, name = _style(init)
        rows = rows.sort_values("shots")
        fig.add_trace(go.Scatter(
            x=rows["shots"], y=100 * rows[acc], name=name, mode="lines+markers",
            line=dict(color=colour, dash=dash), marker=dict(symbol=symbol, size=9),
            error_y=dict(type="data", array=100 * rows[f"{acc}_std"].fillna(0), visible=True),
            customdata=np.stack([rows["n_seeds"], 100 * rows[f"{acc}_std"],
                                 rows["train_size"]], -1),
            hovertemplate=(f"{name}<br>%{{x}} per class (%{{customdata[2]:.0f}} images)<br>"
                           f"{what} %{{y:.1f}}% ± %{{customdata[1]:.1f}} over "
                           "%{customdata[0]} seed(s)<extra></extra>")))
    for row in full.itertuples():
        colour, _, _, name = _style(row.init)
        y = 100 * getattr(row, acc)
        fig.add_trace(go.Scatter(
            x=[ks[0], ks[-1]], y=[y, y], mode="lines", showlegend=True,
            name=f"{name}, whole training split ({row.epochs} epochs)",
            line=dict(color=colour, dash="dot", width=1.5),
            hovertemplate=(f"{name}, whole training split: {what} {y:.1f}% "
                           f"({row.n_seeds} seed(s))<extra></extra>")))
    for row in (vpt_deep.itertuples() if vpt_deep is not None else ()):
        y = 100 * getattr(row, acc)
        fig.add_trace(go.Scatter(
            x=[ks[0], ks[-1]], y=[y, y], mode="lines",
            name=f"VPT-deep (random prompts), whole training split ({row.epochs} epochs)",
            line=dict(color="#7f7f7f", dash="dot", width=1.5),
            hovertemplate=(f"VPT-deep, whole training split: {what} {y:.1f}% "
                           f"({row.n_seeds} seed(s))<extra></extra>")))
    if chance:
        fig.add_hline(y=100 * chance, line=dict(color="#999999", dash="dot", width=1),
                      annotation_text="chance", annotation_position="bottom right")
    fig.update_xaxes(type="log", tickvals=ks, ticktext=[str(k) for k in ks],
                     title="training images per class (k)")
    fig.update_yaxes(title=f"{what} accuracy (%)")
    fig.update_layout(height=420, margin=dict(t=30, b=10, l=10, r=10),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def gain_figure(gain: pd.DataFrame) -> go.Figure:
    """Pre-trained minus random test accuracy per k (points), ± std over paired seeds."""
    fig = go.Figure(go.Bar(
        x=[str(int(k)) for k in gain["shots"]], y=100 * gain["gain"],
        error_y=dict(type="data", array=100 * gain["gain_std"].fillna(0), visible=True),
        marker_color=["#2ca02c" if g >= 0 else "#d62728" for g in gain["gain"]],
        customdata=np.stack([gain["n_pairs"], 100 * gain["gain_std"]], -1),
        hovertemplate=("k = %{x}: %{y:+.1f} points ± %{customdata[1]:.1f} over "
                       "%{customdata[0]} paired seed(s)<extra></extra>")))
    fig.add_hline(y=0, line=dict(color="#555555", width=1))
    fig.update_xaxes(title="training images per class (k)", type="category")
    fig.update_yaxes(title="pre-trained − random (points)")
    fig.update_layout(height=300, margin=dict(t=20, b=10, l=10, r=10))
    return fig


def layer_similarity_figure(per_layer: pd.DataFrame) -> go.Figure:
    """Cosine of tuned vs initial prompts per layer (mean, min–max band over the prompts)
    and the layer's relative change ‖tuned − initial‖ / ‖initial‖ (right axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = per_layer["layer"]
    fig.add_trace(go.Scatter(x=x, y=per_layer["cosine_max"], mode="lines", line=dict(width=0),
                             showlegend=False, hoverinfo="skip"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=per_layer["cosine_min"], mode="lines", line=dict(width=0),
                             fill="tonexty", fillcolor="rgba(31,119,180,0.2)",
                             name="min–max over the layer's prompts", hoverinfo="skip"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(
        x=x, y=per_layer["cosine"], mode="lines+markers", name="cosine (mean over prompts)",
        line=dict(color="#1f77b4"),
        customdata=np.stack([per_layer["cosine_min"], per_layer["cosine_max"]], -1),
        hovertemplate=("layer %{x}: cosine %{y:.3f} (min %{customdata[0]:.3f}, max "
                       "%{customdata[1]:.3f})<extra></extra>")), secondary_y=False)
    fig.add_trace(go.Bar(x=x, y=per_layer["change"], name="relative change", opacity=0.35,
                         marker_color="#9467bd",
                         hovertemplate="layer %{x}: ‖Δ‖/‖initial‖ = %{y:.3f}<extra></extra>"),
                  secondary_y=True)
    fig.update_xaxes(title="layer", dtick=1)
    fig.update_yaxes(title="cosine(tuned, initial)", secondary_y=False)
    fig.update_yaxes(title="‖tuned − initial‖ / ‖initial‖", secondary_y=True, showgrid=False)
    fig.update_layout(height=360, margin=dict(t=20, b=10, l=10, r=10),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def cosine_heatmap(cosine: np.ndarray) -> go.Figure:
    """Layers × prompts: cosine similarity of each tuned prompt with its initial value."""
    fig = go.Figure(go.Heatmap(
        z=cosine, x=[f"p{j}" for j in range(cosine.shape[1])], y=list(range(cosine.shape[0])),
        colorscale="RdBu", zmid=0, zmin=-1, zmax=1, colorbar=dict(title="cosine"),
        hovertemplate="layer %{y}, prompt %{x}: cosine %{z:.3f}<extra></extra>"))
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1)
    fig.update_xaxes(title="prompt token")
    fig.update_layout(height=120 + 28 * cosine.shape[0], margin=dict(t=20, b=10, l=10, r=10))
    return fig


def similarity_by_shots_figure(df: pd.DataFrame) -> go.Figure:
    """Mean cosine (tuned vs initial) per layer, one line per (init, k): with more images per
    class the prompts travel further from where they started."""
    fig = go.Figure()
    ks = sorted({k for k in df["shots"] if not (isinstance(k, float) and math.isnan(k))})
    for (init, shots), rows in df.groupby(["init", "shots"], dropna=False, sort=False):
        colour, dash, symbol, name = _style(init)
        full = isinstance(shots, float) and math.isnan(shots)
        k = "all" if full else str(int(shots))
        shade = 1.0 if full or not ks else 0.35 + 0.65 * (ks.index(shots) + 1) / len(ks)
        rows = rows.sort_values("layer")
        fig.add_trace(go.Scatter(
            x=rows["layer"], y=rows["cosine"], mode="lines+markers", opacity=shade,
            name=f"{init}, k = {k}", line=dict(color=colour, dash=dash),
            marker=dict(symbol=symbol), customdata=rows["runs"],
            hovertemplate=(f"{init}, k = {k}, layer %{{x}}: cosine %{{y:.3f}} "
                           "(mean of %{customdata} run(s))<extra></extra>")))
    fig.update_xaxes(title="layer", dtick=1)
    fig.update_yaxes(title="cosine(tuned, initial)")
    fig.update_layout(height=380, margin=dict(t=20, b=10, l=10, r=10))
    return fig
