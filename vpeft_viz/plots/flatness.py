"""Figures of the Flatness page: landscapes, noise robustness, weight histograms with the
codebook, and the storage–accuracy frontier. Builders take plain records (lists/arrays from
:mod:`vpeft_viz.analysis.flatness`) and return ``go.Figure``."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
           "#9d755d", "#bab0ac", "#eeca3b")


def landscape_1d(records: dict[str, dict[str, Any]], *, metric: str = "loss") -> go.Figure:
    """The 1-D cuts of several runs overlaid (x: step in filter-normalised units)."""
    fig = go.Figure()
    for i, (name, r) in enumerate(records.items()):
        cut = r["landscape_1d"]
        fig.add_trace(go.Scatter(
            x=cut["alphas"], y=cut[metric], name=name, mode="lines",
            line=dict(color=PALETTE[i % len(PALETTE)], width=2),
            hovertemplate=f"{name}<br>step %{{x:.2f}}<br>{metric} %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title="step along a filter-normalised direction (1 = the weights' norm)")
    fig.update_yaxes(title="validation loss" if metric == "loss" else "validation accuracy")
    fig.update_layout(height=380, margin=dict(t=10), legend=dict(orientation="h", y=-0.25))
    return fig


def landscape_2d(records: dict[str, dict[str, Any]], *, surface: bool = False,
                 metric: str = "loss") -> go.Figure:
    """Each run's 2-D landscape, side by side (contours, or 3-D surfaces), shared colours."""
    names = list(records)
    zs = [np.asarray(records[n]["landscape_2d"][metric]) for n in names]
    zmin = min(float(z.min()) for z in zs)
    zmax = max(float(z.max()) for z in zs)
    if metric == "loss":  # the interesting range is near the minimum: clip the far rim
        zmax = min(zmax, zmin + 4 * max(1e-6, np.median([float(np.median(z)) for z in zs])
                                        - zmin) + 1e-6)
    cols = len(names)
    spec = {"type": "surface"} if surface else {}
    fig = make_subplots(rows=1, cols=cols, subplot_titles=names, specs=[[spec] * cols],
                        horizontal_spacing=0.04)
    for i, (name, z) in enumerate(zip(names, zs)):
        rec = records[name]["landscape_2d"]
        common = dict(x=rec["alphas"], y=rec["betas"], z=np.minimum(z, zmax),
                      colorscale="Viridis", cmin=zmin, cmax=zmax, showscale=i == cols - 1)
        if surface:
            fig.add_trace(go.Surface(**common, hovertemplate=(
                f"{name}<br>α %{{x:.2f}}, β %{{y:.2f}}<br>{metric} %{{z:.4f}}<extra></extra>")),
                row=1, col=i + 1)
        else:
            fig.add_trace(go.Contour(
                x=common["x"], y=common["y"], z=common["z"], colorscale="Viridis",
                zmin=zmin, zmax=zmax, showscale=i == cols - 1, ncontours=20,
                hovertemplate=(f"{name}<br>α %{{x:.2f}}, β %{{y:.2f}}<br>{metric} %{{z:.4f}}"
                               "<extra></extra>")), row=1, col=i + 1)
            fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", showlegend=False,
                                     marker=dict(symbol="x", color="white", size=9),
                                     hoverinfo="skip"), row=1, col=i + 1)
    fig.update_layout(height=420 if surface else 360, margin=dict(t=40))
    return fig


def noise_curves(records: dict[str, dict[str, Any]], *, metric: str = "acc") -> go.Figure:
    """Loss or accuracy against relative weight-noise level, mean ± std over draws."""
    fig = go.Figure()
    for i, (name, r) in enumerate(records.items()):
        n = r["noise"]
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=n["sigmas"], y=n[f"{metric}_mean"], name=name, mode="lines+markers",
            line=dict(color=color), error_y=dict(type="data", array=n[f"{metric}_std"],
                                                 visible=True, color=color),
            hovertemplate=f"{name}<br>σ %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title="relative noise σ (noise std = σ · rms of each weight tensor)")
    fig.update_yaxes(title="validation accuracy" if metric == "acc" else "validation loss")
    fig.update_layout(height=360, margin=dict(t=10), legend=dict(orientation="h", y=-0.25))
    return fig


def weight_histogram(edges: np.ndarray, counts: np.ndarray, codebook: np.ndarray, *,
                     name: str, bits: int) -> go.Figure:
    """One matrix's standardised latent weights with the codebook levels (and the cell
    boundaries) they are snapped to."""
    centres = (edges[1:] + edges[:-1]) / 2
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), name="latent weights",
                           marker_color="#4c78a8",
                           hovertemplate="z %{x:.2f}<br>%{y} weights<extra></extra>"))
    levels = np.unique(np.round(codebook, 6)) if len(codebook) <= 16 else np.zeros(0)
    for c in levels:
        fig.add_vline(x=float(c), line=dict(color="#e45756", width=2))
    if 0 < len(levels) <= 16:
        for t in (levels[1:] + levels[:-1]) / 2:
            fig.add_vline(x=float(t), line=dict(color="#bab0ac", width=1, dash="dot"))
    what = (f"{bits}-bit codes (red) and cell boundaries (dotted)" if len(levels)
            else ("256 levels (not drawn)" if bits == 8 else "fp32: no codebook"))
    fig.update_xaxes(title=f"(w − μ) / σ of {name} — {what}", range=[-4, 4])
    fig.update_yaxes(title="weights")
    fig.update_layout(height=320, margin=dict(t=10), showlegend=False)
    return fig


def frontier(rows: list[dict[str, Any]]) -> go.Figure:
    """Test accuracy against stored KB (log), one marker per run, coloured by method/bits."""
    fig = go.Figure()
    labels = sorted({r["label"] for r in rows})
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["label"] == label and r["kb"] is not None]
        if not mine:
            continue
        fig.add_trace(go.Scatter(
            x=[r["kb"] for r in mine], y=[r["test_acc"] for r in mine], name=label,
            mode="markers", marker=dict(size=11, color=PALETTE[i % len(PALETTE)]),
            customdata=[[r["task"], r["run_id"], r["bits"]] for r in mine],
            hovertemplate=("%{customdata[0]} · " + label + " (%{customdata[2]} bit)<br>"
                           "%{x:.1f} KB stored, test %{y:.3f}<br>%{customdata[1]}"
                           "<extra></extra>")))
    fig.update_xaxes(title="method weights as stored (KB, head excluded; log)", type="log")
    fig.update_yaxes(title="test accuracy")
    fig.update_layout(height=380, margin=dict(t=10), legend=dict(orientation="h", y=-0.25))
    return fig
