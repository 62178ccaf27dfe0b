"""Figures of the Compare page: Pareto scatter, training curves, per-class bars, confusion.

Every builder takes plain tables/arrays (from :mod:`vpeft_viz.analysis.compare`) and returns a
``go.Figure``; accuracies come in as fractions and are drawn in percent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis.compare import pareto_front
from . import human_bytes, human_count, method_colour

ACC_LABELS = {"test_acc": "test accuracy (%)", "val_acc": "validation accuracy (%)"}
CURVE_LABELS = {"val_acc": "validation accuracy (%)", "train_acc": "training accuracy (%)",
                "train_loss": "training loss", "val_loss": "validation loss"}
_COST_FORMAT = {"trainable_params": human_count, "flops_per_image": human_count,
                "peak_memory_bytes": human_bytes, "weight_bytes": human_bytes}


def group_label(method: str, setting: str | float | None) -> str:
    """'lora' or 'lora (rank=4)': a method and, when it was run in several, its setting."""
    return f"{method} ({setting})" if isinstance(setting, str) and setting else method


def _methods(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["method"]))


def pareto_scatter(agg: pd.DataFrame, *, cost: str, cost_label: str, acc: str = "test_acc",
                   log_x: bool = False, methods: Sequence[str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Accuracy against a cost, one point per (method, setting) with its seed spread as an
    error bar; the Pareto frontier (highest accuracy for its cost) is ringed and joined.

    ``agg`` holds rows of one task from :func:`~vpeft_viz.analysis.compare.aggregate`.
    """
    df = agg.dropna(subset=[acc, cost]).reset_index(drop=True)
    order = list(methods) if methods is not None else _methods(df)
    fmt = _COST_FORMAT.get(cost, lambda v: f"{v:.3g}")
    front = pareto_front(df[acc], df[cost])
    fig = go.Figure()
    if front.any():
        f = df[front].sort_values([cost, acc])
        fig.add_trace(go.Scatter(
            x=f[cost], y=100 * f[acc], mode="lines", line=dict(shape="hv", color="#555",
                                                                  dash="dot", width=1.5),
            name="Pareto frontier", hoverinfo="skip"))
    df["on_front"] = front
    for method, g in df.groupby("method", sort=False):  # one trace per method: fewer traces
        std = g.get(f"{acc}_std", pd.Series(np.nan, index=g.index)).astype(float)
        hover = [
            f"<b>{group_label(method, r['setting'])}</b><br>"
            f"{ACC_LABELS.get(acc, acc)}: {100 * r[acc]:.2f}"
            + ("" if pd.isna(sd) else f" ± {100 * sd:.2f}")
            + f" ({int(r['n_seeds'])} seed{'s' if r['n_seeds'] != 1 else ''})<br>"
            f"{cost_label}: {fmt(r[cost])}<br>PPT: {100 * r['ppt']:.2f}<br>"
            + ("on the Pareto frontier" if r["on_front"] else "dominated")
            for (_, r), sd in zip(g.iterrows(), std)]
        on = g["on_front"].to_numpy()
        fig.add_trace(go.Scatter(
            x=g[cost], y=100 * g[acc], mode="markers", name=method,
            marker=dict(size=np.where(on, 14, 10), color=method_colour(method, order),
                        line=dict(width=np.where(on, 2.5, 0.5),
                                  color=["black" if o else "white" for o in on])),
            error_y=dict(type="data", array=(100 * std).fillna(0), visible=bool(std.notna().any()),
                         thickness=1),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>"))
    fig.update_layout(
        title=title, xaxis_title=cost_label + (" (log scale)" if log_x else ""),
        yaxis_title=ACC_LABELS.get(acc, acc),
        margin=dict(l=10, r=10, t=40 if title else 10, b=10), height=420)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def training_curves(curves: pd.DataFrame, *, metric: str,
                    methods: Sequence[str] | None = None) -> go.Figure:
    """Per-epoch ``metric`` of each (method, setting), mean over seeds with a ±1 std band."""
    fig = go.Figure()
    pct = metric.endswith("_acc")
    order = list(methods) if methods is not None else _methods(curves)
    for (method, setting), g in curves.groupby(["method", "setting"], sort=False, dropna=False):
        stats = g.groupby("epoch")[metric].agg(["mean", "std", "count"]).reset_index()
        scale = 100.0 if pct else 1.0
        x, m, s = stats["epoch"], scale * stats["mean"], scale * stats["std"].fillna(0)
        colour = method_colour(method, order)
        label = group_label(method, setting)
        if (stats["count"] > 1).any():
            fig.add_trace(go.Scatter(
                x=pd.concat([x, x[::-1]]), y=pd.concat([m + s, (m - s)[::-1]]),
                fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0),
                legendgroup=label, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=x, y=m, mode="lines+markers", name=label, legendgroup=label,
            line=dict(color=colour), customdata=np.stack([s, stats["count"]], axis=-1),
            hovertemplate=(f"<b>{label}</b><br>epoch %{{x}}<br>{CURVE_LABELS.get(metric, metric)}"
                           ": %{y:.3f} ± %{customdata[0]:.3f} (%{customdata[1]} seeds)"
                           "<extra></extra>")))
    epochs = curves["epoch"].max() if len(curves) else 1
    fig.update_layout(xaxis_title="epoch", yaxis_title=CURVE_LABELS.get(metric, metric),
                      margin=dict(l=10, r=10, t=30, b=10), height=380)
    fig.update_xaxes(dtick=max(1, math.ceil(epochs / 10)))
    return fig


def per_class_bars(per_class: Mapping[str, Sequence[float]], class_names: Sequence[str],
                   methods: Sequence[str] | None = None) -> go.Figure:
    """Grouped bars of test accuracy per class, one bar colour per compared group."""
    fig = go.Figure()
    order = list(methods) if methods is not None else [k.split(" (")[0] for k in per_class]
    for label, acc in per_class.items():
        fig.add_trace(go.Bar(
            x=list(class_names), y=100 * np.asarray(acc, dtype=float), name=label,
            marker_color=method_colour(label.split(" (")[0], order),
            hovertemplate=f"<b>{label}</b><br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    fig.update_layout(barmode="group", xaxis_title="class", yaxis_title="test accuracy (%)",
                      margin=dict(l=10, r=10, t=30, b=10), height=380,
                      xaxis_type="category")
    return fig


def confusion_heatmap(confusion: np.ndarray, class_names: Sequence[str], *,
                      normalize: bool = True, title: str | None = None) -> go.Figure:
    """Test confusion matrix (rows: true class, columns: predicted), row-normalised to the
    share of each true class unless ``normalize`` is false."""
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    z = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    names = [str(c) for c in class_names]
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, colorscale="Blues", zmin=0, zmax=1 if normalize else None,
        customdata=counts,
        hovertemplate=("true %{y} → predicted %{x}<br>"
                       + ("share %{z:.1%} · " if normalize else "")
                       + "%{customdata:.0f} images<extra></extra>")))
    fig.update_layout(title=title, xaxis_title="predicted class", yaxis_title="true class",
                      xaxis_type="category", yaxis_type="category",
                      yaxis_autorange="reversed", margin=dict(l=10, r=10, t=40 if title else 10,
                                                               b=10), height=460)
    return fig
