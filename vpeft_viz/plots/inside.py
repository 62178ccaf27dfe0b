"""Figures of the Inside page: attributions side by side, per-layer CKA against the frozen
backbone, CLS features in 2-D before and after tuning, linear separability per layer.

Builders take plain arrays from :mod:`vpeft_viz.analysis.inside` and return a ``go.Figure``.
Runs keep one colour on every figure (``colours``: run label → colour); maps of one kind
share one colour scale across runs, so a brighter patch is a larger attribution whichever
run it belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

FROZEN = "frozen backbone"
FROZEN_COLOUR = "#7f7f7f"
DIVERGING = "RdBu_r"  # negative blue, positive red, zero white
MAP_ROWS = (("ig", "Integrated Gradients (input pixels)", DIVERGING),
            ("layer", "Layer Integrated Gradients (patch tokens)", DIVERGING),
            ("rollout", "attention rollout of CLS (patches)", "Viridis"))
_CLASS_COLOURS = qualitative.D3 + qualitative.Set3 + qualitative.Dark24


def run_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per run label, in order (the frozen backbone is grey)."""
    palette = qualitative.D3 + qualitative.Set2
    return {lab: FROZEN_COLOUR if lab == FROZEN else palette[i % len(palette)]
            for i, lab in enumerate(labels)}


def _limit(maps: Sequence[np.ndarray], symmetric: bool) -> tuple[float, float]:
    values = np.concatenate([np.abs(m).ravel() if symmetric else np.asarray(m).ravel()
                             for m in maps]) if maps else np.zeros(1)
    top = float(np.nanmax(values)) if values.size else 0.0
    top = top if top > 0 else 1.0
    return (-top, top) if symmetric else (0.0, top)


def attribution_grid(image: np.ndarray, results: Mapping[str, Mapping[str, np.ndarray]],
                     titles: Mapping[str, str]) -> go.Figure:
    """Columns: runs; rows: the image, then each map kind of :data:`MAP_ROWS`, one colour
    scale per row shared by every run (its bar on the right). ``image``: (H, W, 3) in [0, 1];
    ``results``: run label → maps (``ig`` H × W, ``layer`` and ``rollout`` on the patch grid)."""
    labels = list(results)
    cols = max(1, len(labels))
    rows = 1 + len(MAP_ROWS)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.02, vertical_spacing=0.03,
                        column_titles=[titles.get(lab, lab) for lab in labels],
                        row_titles=["image", "IG", "layer IG", "rollout"])
    h, w = image.shape[:2]
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    for c in range(1, len(labels) + 1):
        fig.add_trace(go.Image(z=pixels, hoverinfo="skip"), row=1, col=c)
    for r, (kind, name, scale) in enumerate(MAP_ROWS, start=2):
        maps = [np.asarray(results[lab][kind], dtype=float) for lab in labels]
        lo, hi = _limit(maps, symmetric=scale == DIVERGING)
        axis = "coloraxis" if r == 2 else f"coloraxis{r - 1}"
        for c, (lab, m) in enumerate(zip(labels, maps), start=1):
            gh, gw = m.shape
            fig.add_trace(go.Heatmap(
                z=m, x0=w / gw / 2 - 0.5, dx=w / gw, y0=h / gh / 2 - 0.5, dy=h / gh,
                coloraxis=axis,
                hovertemplate=f"<b>{lab}</b><br>{name}<br>row %{{y:.0f}}, column %{{x:.0f}}"
                              "<br>%{z:.4g}<extra></extra>"), row=r, col=c)
        fig.layout[axis] = dict(colorscale=scale, cmin=lo, cmax=hi, colorbar=dict(
            title=dict(text=name.split(" (")[0], side="right"), len=0.8 / rows,
            y=1 - (r - 0.5) / rows, thickness=12))
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, w - 0.5])
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False,
                     range=[h - 0.5, -0.5])
    for i in range(1, rows * cols + 1):
        fig.layout[f"yaxis{'' if i == 1 else i}"].scaleanchor = f"x{'' if i == 1 else i}"
    fig.update_layout(height=140 + 170 * rows, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def cka_curves(layers: Sequence[str], curves: Mapping[str, Sequence[float]],
               colours: Mapping[str, str] | None = None, *, what: str = "tokens") -> go.Figure:
    """CKA with the frozen backbone per layer, one line per run (1 = unchanged); the y-axis
    starts a little under the lowest value, so small departures from 1 show."""
    colours = colours or run_colours(list(curves))
    fig = go.Figure()
    for lab, values in curves.items():
        fig.add_trace(go.Scatter(
            x=list(layers), y=list(values), mode="lines+markers", name=lab,
            line=dict(color=colours.get(lab)),
            hovertemplate=f"<b>{lab}</b><br>%{{x}}: CKA %{{y:.4f}}<extra></extra>"))
    fig.add_hline(y=1, line=dict(color="#999", dash="dot", width=1))
    fig.update_layout(
        xaxis_title="layer", yaxis_title=f"linear CKA with the frozen backbone ({what})",
        yaxis_range=[_floor(curves), 1.005],
        legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0),
        margin=dict(l=10, r=10, t=30, b=10), height=420)
    fig.update_xaxes(type="category")
    return fig


def _floor(curves: Mapping[str, Sequence[float]]) -> float:
    """The y-axis' lower end: a little under the lowest CKA (methods often stay near 1)."""
    values = [v for vs in curves.values() for v in vs if v is not None and np.isfinite(v)]
    low = min(values, default=0.0)
    return max(0.0, low - 0.1 * (1 - low) - 0.005)


def embeddings(panels: Mapping[str, np.ndarray], labels: np.ndarray,
               class_names: Sequence[str], *, method: str = "PCA",
               cols: int = 4) -> go.Figure:
    """One 2-D scatter per panel (frozen backbone first, then each run), points coloured by
    true class with one legend for all."""
    names = list(panels)
    cols = max(1, min(cols, len(names)))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names,
                        horizontal_spacing=0.03, vertical_spacing=0.08)
    labels = np.asarray(labels)
    for k, name in enumerate(names):
        xy = np.asarray(panels[name])
        r, c = k // cols + 1, k % cols + 1
        for cls in np.unique(labels):
            sel = labels == cls
            cname = str(class_names[int(cls)]) if int(cls) < len(class_names) else str(cls)
            fig.add_trace(go.Scattergl(
                x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=cname, legendgroup=cname,
                showlegend=k == 0, marker=dict(size=5, opacity=0.8,
                                               color=_CLASS_COLOURS[int(cls)
                                                                    % len(_CLASS_COLOURS)]),
                hovertemplate=f"<b>{name}</b><br>class {cname}<extra></extra>"), row=r, col=c)
    fig.update_xaxes(showticklabels=False, title_text=None)
    fig.update_yaxes(showticklabels=False, title_text=None)
    fig.update_layout(height=60 + 300 * rows, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(title=f"true class ({method})"))
    return fig


def separability_curves(layers: Sequence[str], curves: Mapping[str, Sequence[float]],
                        colours: Mapping[str, str] | None = None,
                        chance: float | None = None) -> go.Figure:
    """Test accuracy of a linear probe per layer, one line per run (frozen dashed)."""
    colours = colours or run_colours(list(curves))
    fig = go.Figure()
    for lab, values in curves.items():
        fig.add_trace(go.Scatter(
            x=list(layers), y=[100 * v for v in values], mode="lines+markers", name=lab,
            line=dict(color=colours.get(lab), dash="dash" if lab == FROZEN else "solid"),
            hovertemplate=f"<b>{lab}</b><br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    if chance is not None and 0 < chance < 1:
        fig.add_hline(y=100 * chance, line=dict(color="#888", dash="dot", width=1),
                      annotation_text=f"chance {100 * chance:.1f}%",
                      annotation_position="bottom right")
    fig.update_layout(xaxis_title="layer", yaxis_title="linear-probe test accuracy (%)",
                      legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left",
                                  x=0),
                      margin=dict(l=10, r=10, t=30, b=10), height=420)
    fig.update_xaxes(type="category")
    return fig
