"""Figures of the E²VPT page: masks per round with the importance scores on hover,
accuracy against pruning, parameters against accuracy, attention mass on the prompts.

Builders take plain arrays and tables from :mod:`vpeft_viz.analysis.e2vpt`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import group_styles

KEPT, PRUNED = "#4c78a8", "#e4e4e4"


def _score_hover(scores: np.ndarray | None, magnitude: np.ndarray | None,
                 ranks: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    nan = np.full(shape, np.nan)
    return np.stack([nan if scores is None else np.broadcast_to(scores, shape),
                     nan if magnitude is None else np.broadcast_to(magnitude, shape),
                     nan if ranks is None else np.broadcast_to(ranks, shape)], axis=-1)


def tokens_by_round(pieces_kept: np.ndarray, round_labels: Sequence[str],
                    scores: np.ndarray | None, magnitude: np.ndarray | None,
                    ranks: np.ndarray | None, *, selected: int | None = None) -> go.Figure:
    """Rounds (rows) × visual prompt tokens (columns): how many of the 16 pieces each token
    keeps in each round (0: the token is pruned). Hover: the token's importance score (mean
    signed mask gradient), its mean magnitude and its pruning rank."""
    rounds, tokens = pieces_kept.shape
    custom = _score_hover(scores, magnitude, ranks, (rounds, tokens))
    labels = [f"{lab} ✓" if selected is not None and i == selected + 1 else lab
              for i, lab in enumerate(round_labels)]
    fig = go.Figure(go.Heatmap(
        z=pieces_kept, x=[f"p{t}" for t in range(tokens)], y=labels, customdata=custom,
        colorscale=[[0, PRUNED], [1e-9, "#c6dbef"], [1, KEPT]], zmin=0, zmax=16,
        colorbar=dict(title="pieces<br>kept"), xgap=2, ygap=2,
        hovertemplate=("%{y} · token %{x}<br>pieces kept %{z}<br>score %{customdata[0]:.3g} "
                       "(|grad| %{customdata[1]:.3g})<br>pruning rank %{customdata[2]}"
                       "<extra></extra>")))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title="visual prompt token (the same mask in every block)")
    fig.update_layout(height=120 + 34 * rounds, margin=dict(t=10))
    return fig


def piece_mask(kept: np.ndarray, scores: np.ndarray | None, magnitude: np.ndarray | None,
               ranks: np.ndarray | None, *, title: str = "") -> go.Figure:
    """Tokens (rows) × pieces (columns) kept or pruned; piece j covers dims j, j+16, …
    Hover: the piece's importance score, magnitude and rank within its token."""
    tokens, pieces = kept.shape
    custom = _score_hover(scores, magnitude, ranks, (tokens, pieces))
    fig = go.Figure(go.Heatmap(
        z=kept.astype(float), x=[f"j{j}" for j in range(pieces)],
        y=[f"token {t}" for t in range(tokens)], customdata=custom,
        colorscale=[[0, PRUNED], [1, KEPT]], zmin=0, zmax=1, showscale=False, xgap=1, ygap=1,
        hovertemplate=("%{y} · piece %{x} (dims j, j+16, …)<br>%{z:.0f} = kept<br>"
                       "score %{customdata[0]:.3g} (|grad| %{customdata[1]:.3g})<br>"
                       "rank in token %{customdata[2]}<extra></extra>")))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or None, height=120 + 24 * tokens,
                      margin=dict(t=40 if title else 10))
    return fig


def accuracy_vs_pruning(df: pd.DataFrame) -> go.Figure:
    """Validation accuracy of every round against the pruned fraction of the visual prompts;
    the selected round's test accuracy as a star."""
    fig = go.Figure(go.Scatter(
        x=df["pruned_fraction"], y=df["val_acc"], mode="markers+text",
        text=[f"r{r}" for r in df["round"]], textposition="top center", name="validation",
        marker=dict(size=10, color=["#ff7f0e" if s else KEPT for s in df["selected"]]),
        customdata=df["label"],
        hovertemplate=("round %{text}: %{customdata}<br>pruned %{x:.0%} of the visual "
                       "prompts<br>val %{y:.3f}<extra></extra>")))
    test = df[df["test_acc"].notna()]
    if len(test):
        fig.add_trace(go.Scatter(
            x=test["pruned_fraction"], y=test["test_acc"], mode="markers", name="test (selected)",
            marker=dict(symbol="star", size=16, color="#ff7f0e"),
            hovertemplate="selected round · test %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title="pruned fraction of the visual prompt entries", tickformat=".0%",
                     rangemode="tozero")
    fig.update_yaxes(title="accuracy")
    fig.update_layout(height=380, margin=dict(t=10), legend=dict(orientation="h", y=-0.2))
    return fig


def params_vs_accuracy(points: pd.DataFrame, *, highlight: tuple[float, float] | None = None
                       ) -> go.Figure:
    """Mean test accuracy against trainable parameters (head excluded, log scale), one
    marker per method and setting; ``highlight`` marks the run being inspected."""
    methods = list(dict.fromkeys(points["method"]))
    styles = group_styles((m, None) for m in methods)  # the Compare page's colour per method
    fig = go.Figure()
    for m in methods:
        sub = points[points["method"] == m]
        fig.add_trace(go.Scatter(
            x=sub["params"], y=sub["test_acc"], mode="markers", name=m,
            error_y=dict(type="data", array=sub["test_acc_std"].fillna(0), visible=True),
            marker=dict(size=11, color=styles[m].colour),
            customdata=np.stack([sub["setting"].astype(str), sub["seeds"]], axis=-1),
            hovertemplate=(m + " · %{customdata[0]}<br>%{x:,.0f} parameters<br>test "
                           "%{y:.3f} (%{customdata[1]} seeds)<extra></extra>")))
    if highlight is not None:
        fig.add_trace(go.Scatter(
            x=[highlight[0]], y=[highlight[1]], mode="markers", name="this run",
            marker=dict(symbol="circle-open", size=20, color="#ff7f0e", line=dict(width=2)),
            hovertemplate="this run<br>%{x:,.0f} parameters<br>test %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title="trainable parameters (head excluded)", type="log")
    fig.update_yaxes(title="test accuracy")
    fig.update_layout(height=400, margin=dict(t=10), legend=dict(orientation="h", y=-0.2))
    return fig


def attention_mass(kv: np.ndarray, visual: np.ndarray, *, title: str = "") -> go.Figure:
    """Two block × head heatmaps: the attention mass image tokens put on the key-value
    prompts and on the visual prompts."""
    blocks, heads = kv.shape
    fig = make_subplots(rows=1, cols=2, subplot_titles=("on key-value prompts",
                                                        "on visual prompts"),
                        horizontal_spacing=0.12)
    zmax = float(max(kv.max(initial=0), visual.max(initial=0), 1e-6))
    for col, (z, name) in enumerate(((kv, "key-value"), (visual, "visual")), start=1):
        fig.add_trace(go.Heatmap(
            z=z, x=[f"h{h}" for h in range(heads)], y=[f"block {b}" for b in range(blocks)],
            zmin=0, zmax=zmax, colorscale="Viridis", showscale=col == 2,
            colorbar=dict(title="mass", tickformat=".0%"),
            hovertemplate=(f"%{{y}} · head %{{x}}<br>{name} prompts: %{{z:.1%}} of the "
                           "attention<extra></extra>")), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or None, height=140 + 30 * blocks,
                      margin=dict(t=60 if title else 40))
    return fig


def attention_split(parts: dict[str, np.ndarray]) -> go.Figure:
    """Per block (mean over heads and images): where the attention of image tokens goes —
    key-value prompts, visual prompts, CLS, patches (stacked to 100%)."""
    names = {"kv": "key-value prompts", "visual": "visual prompts", "cls": "CLS",
             "patches": "patches"}
    colours = {"kv": "#d62728", "visual": "#ff7f0e", "cls": "#7f7f7f", "patches": KEPT}
    blocks = next(iter(parts.values())).shape[0]
    fig = go.Figure()
    for k, label in names.items():
        fig.add_trace(go.Bar(x=[f"block {b}" for b in range(blocks)], y=parts[k], name=label,
                             marker_color=colours[k],
                             hovertemplate=f"%{{x}}<br>{label}: %{{y:.1%}}<extra></extra>"))
    fig.update_layout(barmode="stack", height=340, margin=dict(t=10),
                      yaxis=dict(tickformat=".0%", title="share of attention"),
                      legend=dict(orientation="h", y=-0.2))
    return fig
