"""Figures of a single run while it trains."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def curves_figure(metrics: list[dict[str, Any]]) -> go.Figure:
    """Loss and accuracy per epoch, train and validation, side by side."""
    epochs = [m["epoch"] for m in metrics]
    # Axis titles, not subplot titles: a title over the right plot sits under plotly's toolbar.
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    for split, colour in (("train", "#1f77b4"), ("val", "#ff7f0e")):
        for col, metric in ((1, "loss"), (2, "acc")):
            fig.add_trace(go.Scatter(
                x=epochs, y=[m.get(f"{split}_{metric}") for m in metrics], mode="lines+markers",
                name=split, legendgroup=split, showlegend=col == 1, line={"color": colour}),
                row=1, col=col)
    fig.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 12 else None)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", row=1, col=2)
    fig.update_layout(height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": -0.3})
    return fig


def step_loss_figure(points: list[list[float]]) -> go.Figure:
    """Training loss per optimisation step (``[[step, loss], ...]``): what the first epoch
    shows before its first per-epoch point."""
    fig = go.Figure(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                               mode="lines+markers", name="train loss",
                               line={"color": "#1f77b4"}, marker={"size": 4}))
    fig.update_layout(height=220, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      title={"text": "Training loss per step (first epoch)", "font": {"size": 13}},
                      xaxis_title="step", yaxis_title="loss")
    return fig
