"""Figures of the Compare page: Pareto scatter, training curves, per-class bars, confusion.

Every builder takes plain tables/arrays (from :mod:`vpeft_viz.analysis.compare`) and returns a
``go.Figure``; accuracies come in as fractions and are drawn in percent. Groups (a method in
one setting) are drawn with the styles of :func:`~vpeft_viz.plots.group_styles`, passed in so
a group looks the same on every figure; accuracy figures draw the chance level when given.
Legends sit under the plot, clear of plotly's toolbar (top right).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis.compare import pareto_front
from . import GroupStyle, group_label, group_styles, human_bytes, human_count

__all__ = ["ACC_LABELS", "CURVE_LABELS", "confusion_heatmap", "group_label", "pareto_scatter",
           "per_class_bars", "training_curves"]

ACC_LABELS = {"test_acc": "test accuracy (%)", "val_acc": "validation accuracy (%)"}
CURVE_LABELS = {"val_acc": "validation accuracy (%)", "train_acc": "training accuracy (%)",
                "train_loss": "training loss", "val_loss": "validation loss"}
_COST_FORMAT = {"trainable_params": human_count, "flops_per_image": human_count,
                "peak_memory_bytes": human_bytes, "weight_bytes": human_bytes}
_BYTES = {"peak_memory_bytes", "weight_bytes"}
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0)
# Cells of a confusion matrix get their count written in them up to this many classes.
MAX_LABELLED_CLASSES = 30


def _byte_unit(largest: float) -> tuple[float, str]:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= div:
            return float(div), unit
    return 1.0, "bytes"


def _styles(pairs, styles: Mapping[str, GroupStyle] | None) -> Mapping[str, GroupStyle]:
    return styles if styles is not None else group_styles(pairs)


def _chance_line(fig: go.Figure, chance: float | None, pixels: float | None = None) -> None:
    """A dotted line at chance (the accuracy of always answering the test split's most common
    class; 1 / number of classes on a balanced split) and, when given, a dashed one at the
    "pixels, no backbone" reference (a logistic regression on raw pixels)."""
    if chance is not None and 0 < chance < 1:
        fig.add_hline(y=100 * chance, line=dict(color="#888", dash="dot", width=1),
                      annotation_text=f"chance {100 * chance:.1f}%",
                      annotation_position="bottom right", annotation_font_color="#666")
    if pixels is not None and 0 <= pixels <= 1:
        fig.add_hline(y=100 * pixels, line=dict(color="#b45309", dash="dash", width=1),
                      annotation_text=f"pixels, no backbone {100 * pixels:.1f}%",
                      annotation_position="top right", annotation_font_color="#b45309")


def pareto_scatter(agg: pd.DataFrame, *, cost: str, cost_label: str, acc: str = "test_acc",
                   log_x: bool = False, styles: Mapping[str, GroupStyle] | None = None,
                   chance: float | None = None, pixels: float | None = None,
                   title: str | None = None) -> go.Figure:
    """Accuracy against a cost, one labelled point per (method, setting) with its seed
    spread as an error bar; the Pareto frontier (highest accuracy for its cost) is ringed
    and joined.

    ``agg`` holds rows of one task from :func:`~vpeft_viz.analysis.compare.aggregate`.
    """
    df = agg.dropna(subset=[acc, cost]).reset_index(drop=True)
    styles = _styles(zip(df["method"], df["setting"]), styles)
    scale, unit = _byte_unit(df[cost].max()) if cost in _BYTES and len(df) else (1, "")
    if unit:  # drawn in the table's binary unit (KiB/MiB/GiB), not SI ticks of raw bytes
        cost_label = f"{cost_label} ({unit})"
    fmt = _COST_FORMAT.get(cost, lambda v: f"{v:.3g}")
    front = pareto_front(df[acc], df[cost])
    fig = go.Figure()
    if front.any():
        f = df[front].sort_values([cost, acc])
        fig.add_trace(go.Scatter(
            x=f[cost] / scale, y=100 * f[acc], mode="lines", line=dict(shape="hv", color="#555",
                                                                  dash="dot", width=1.5),
            name="Pareto frontier", hoverinfo="skip"))
    for i, r in df.iterrows():
        label = group_label(r["method"], r["setting"])
        style = styles.get(label) or GroupStyle("#888", "circle", "solid", "")
        sd = r.get(f"{acc}_std", math.nan)
        sd = math.nan if sd is None else float(sd)
        hover = (f"<b>{label}</b><br>{ACC_LABELS.get(acc, acc)}: {100 * r[acc]:.1f}"
                 + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")
                 + f" ({int(r['n_seeds'])} seed{'s' if r['n_seeds'] != 1 else ''})<br>"
                 f"{cost_label}: {fmt(r[cost])}<br>PPT: {100 * r['ppt']:.1f}<br>"
                 + ("on the Pareto frontier" if front[i] else "dominated"))
        fig.add_trace(go.Scatter(
            x=[r[cost] / scale], y=[100 * r[acc]], mode="markers+text", name=label,
            text=[label], textposition="top center", textfont=dict(size=11),
            marker=dict(size=14 if front[i] else 11, color=style.colour, symbol=style.symbol,
                        line=dict(width=2.5 if front[i] else 0.5,
                                  color="black" if front[i] else "white")),
            error_y=dict(type="data", array=[0 if math.isnan(sd) else 100 * sd],
                         visible=not math.isnan(sd), thickness=1),
            hovertext=[hover], hovertemplate="%{hovertext}<extra></extra>"))
    _chance_line(fig, chance, pixels)
    fig.update_layout(
        title=title, xaxis_title=cost_label + (" (log scale)" if log_x else ""),
        yaxis_title=ACC_LABELS.get(acc, acc), legend=LEGEND_BELOW,
        margin=dict(l=10, r=10, t=40 if title else 30, b=10), height=460)
    if not unit:
        fig.update_xaxes(tickformat=".2s")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def training_curves(curves: pd.DataFrame, *, metric: str,
                    styles: Mapping[str, GroupStyle] | None = None,
                    chance: float | None = None, pixels: float | None = None) -> go.Figure:
    """Per-epoch ``metric`` of each (method, setting), mean over seeds with a ±1 std band."""
    fig = go.Figure()
    pct = metric.endswith("_acc")
    styles = _styles(zip(curves["method"], curves["setting"]), styles)
    for (method, setting), g in curves.groupby(["method", "setting"], sort=False, dropna=False):
        stats = g.groupby("epoch")[metric].agg(["mean", "std", "count"]).reset_index()
        scale = 100.0 if pct else 1.0
        x, m, s = stats["epoch"], scale * stats["mean"], scale * stats["std"].fillna(0)
        label = group_label(method, setting)
        style = styles.get(label) or GroupStyle("#888", "circle", "solid", "")
        if (stats["count"] > 1).any():
            fig.add_trace(go.Scatter(
                x=pd.concat([x, x[::-1]]), y=pd.concat([m + s, (m - s)[::-1]]),
                fill="toself", fillcolor=style.colour, opacity=0.15, line=dict(width=0),
                legendgroup=label, showlegend=False, hoverinfo="skip"))
        digits = 1 if pct else 3
        fig.add_trace(go.Scatter(
            x=x, y=m, mode="lines+markers", name=label, legendgroup=label,
            line=dict(color=style.colour, dash=style.dash),
            marker=dict(symbol=style.symbol, size=7),
            customdata=np.stack([s, stats["count"]], axis=-1),
            hovertemplate=(f"<b>{label}</b><br>epoch %{{x}}<br>{CURVE_LABELS.get(metric, metric)}"
                           f": %{{y:.{digits}f}} ± %{{customdata[0]:.{digits}f}} "
                           "(%{customdata[1]} seeds)<extra></extra>")))
    if pct:
        _chance_line(fig, chance, pixels)
    epochs = curves["epoch"].max() if len(curves) else 1
    fig.update_layout(xaxis_title="epoch", yaxis_title=CURVE_LABELS.get(metric, metric),
                      legend=LEGEND_BELOW, margin=dict(l=10, r=10, t=30, b=10), height=420)
    fig.update_xaxes(dtick=max(1, math.ceil(epochs / 10)))
    return fig


def per_class_bars(per_class: Mapping[str, Sequence[float]], class_names: Sequence[str],
                   styles: Mapping[str, GroupStyle] | None = None,
                   chance: float | None = None) -> go.Figure:
    """Grouped bars of test accuracy per class, one bar style per compared group (keys of
    ``per_class`` are group labels)."""
    fig = go.Figure()
    styles = styles if styles is not None else group_styles((k, None) for k in per_class)
    for label, acc in per_class.items():
        style = styles.get(label) or GroupStyle("#888", "circle", "solid", "")
        fig.add_trace(go.Bar(
            x=list(class_names), y=100 * np.asarray(acc, dtype=float), name=label,
            marker=dict(color=style.colour, pattern_shape=style.pattern),
            hovertemplate=f"<b>{label}</b><br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    _chance_line(fig, chance)
    fig.update_layout(barmode="group", xaxis_title="class", yaxis_title="test accuracy (%)",
                      legend=LEGEND_BELOW, margin=dict(l=10, r=10, t=30, b=10), height=420,
                      xaxis_type="category")
    return fig


def confusion_heatmap(confusion: np.ndarray, class_names: Sequence[str], *,
                      normalize: bool = True, title: str | None = None,
                      clickable: bool = False) -> go.Figure:
    """Test confusion matrix (rows: true class, columns: predicted), coloured by the share
    of each true class (row-normalised unless ``normalize`` is false), each cell showing its
    image count (up to :data:`MAX_LABELLED_CLASSES` classes).

    ``clickable``: an invisible marker sits on every cell (trace 1, ``customdata`` =
    ``[true, predicted, count]``), so a click selects the cell (plotly heatmaps themselves
    send no selection events) and the hover comes from it."""
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    z = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    names = [str(c) for c in class_names]
    labelled = len(names) <= MAX_LABELLED_CLASSES
    hover = ("true %{y} → predicted %{x}<br>"
             + ("share %{customdata[3]:.1%} · " if normalize and clickable else
                "share %{z:.1%} · " if normalize else "")
             + ("%{customdata[2]:.0f} images" if clickable else "%{customdata:.0f} images")
             + ("<br>click: show these images" if clickable else "") + "<extra></extra>")
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, colorscale="Blues", zmin=0, zmax=1 if normalize else None,
        customdata=counts, text=counts.astype(int) if labelled else None,
        texttemplate="%{text}" if labelled else None,
        hoverinfo="skip" if clickable else None,
        hovertemplate=None if clickable else hover))
    if clickable:
        t, q = np.meshgrid(np.arange(len(names)), np.arange(len(names)), indexing="ij")
        fig.add_trace(go.Scatter(
            x=[names[j] for j in q.ravel()], y=[names[i] for i in t.ravel()], mode="markers",
            marker=dict(symbol="square", size=max(6, min(40, 360 // max(len(names), 1))),
                        color="rgba(0,0,0,0)"),
            # plain lists: the page's own scripts (and tests) read them back from the chart
            customdata=np.stack([t.ravel(), q.ravel(), counts.ravel(), z.ravel()], -1).tolist(),
            hovertemplate=hover, showlegend=False, name="cells"))
    fig.update_layout(title=title, xaxis_title="predicted class", yaxis_title="true class",
                      xaxis_type="category", yaxis_type="category",
                      yaxis_autorange="reversed", margin=dict(l=10, r=10, t=40 if title else 10,
                                                               b=10), height=460)
    return fig
