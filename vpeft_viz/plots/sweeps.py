"""Figures of the Sweeps page: runs per status, parallel coordinates, validation vs test.

Tables come from :mod:`vpeft_viz.analysis.sweeps`; accuracies come in as fractions and are
drawn in percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from ..analysis.sweeps import STATUS_ORDER, finished
from . import group_label, group_styles

STATUS_COLOURS = {"done": "#2ca02c", "running": "#1f77b4", "queued": "#c7c7c7",
                  "failed": "#d62728", "cancelled": "#ff7f0e", "missing": "#7f7f7f"}
ACCURACY_AXES = {"val_acc": "validation acc. (%)", "test_acc": "test acc. (%)"}
MISSING = "—"  # a setting that does not apply to a run's method


def status_bars(table: pd.DataFrame) -> go.Figure:
    """Runs per method, stacked by status (``analysis.sweeps.method_status``)."""
    fig = go.Figure()
    for status in STATUS_ORDER:
        if status in table.columns and table[status].sum():
            fig.add_bar(y=list(table.index), x=table[status], name=status, orientation="h",
                        marker_color=STATUS_COLOURS[status],
                        hovertemplate="%{y}: %{x} " + status + "<extra></extra>")
    fig.update_layout(barmode="stack", height=120 + 28 * len(table), xaxis_title="runs",
                      margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h"),
                      yaxis=dict(autorange="reversed"))
    return fig


def _sort_key(value: Any) -> tuple[int, float, str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (2, 0.0, str(value))
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _category_axis(label: str, values: Sequence[Any]) -> dict[str, Any]:
    """A parcoords axis of discrete grid values (numbers in numeric order, "—" where the
    setting does not apply), one tick per value."""
    distinct = sorted({_sort_key(v): v for v in values}.items())
    index = {k: i for i, (k, _) in enumerate(distinct)}
    text = [MISSING if k[0] == 0 else f"{v:g}" if k[0] == 1 else str(v) for k, v in distinct]
    return dict(label=label, values=[index[_sort_key(v)] for v in values],
                tickvals=list(range(len(distinct))), ticktext=text,
                range=[-0.25, max(len(distinct) - 1, 0) + 0.25])


def parallel_coordinates(runs: pd.DataFrame, axes: Sequence[str],
                         colour: str = "val_acc") -> go.Figure:
    """Finished runs as lines through their grid values (``axes``) to their validation and
    test accuracy, coloured by ``colour``."""
    done = finished(runs)
    dims = [_category_axis(a.split(".", 1)[-1], list(done[a])) for a in axes]
    for key, label in ACCURACY_AXES.items():
        dims.append(dict(label=label, values=100 * done[key].to_numpy(float)))
    fig = go.Figure(go.Parcoords(
        dimensions=dims,
        line=dict(color=100 * done[colour].to_numpy(float), colorscale="Viridis",
                  showscale=True, colorbar=dict(title=ACCURACY_AXES[colour], thickness=12,
                                                x=1.04)),
    ))
    fig.update_layout(height=420, margin=dict(l=60, r=110, t=50, b=30))
    return fig


def selection_scatter(means: pd.DataFrame, best: pd.DataFrame) -> go.Figure:
    """Every setting's mean validation accuracy (x) against its mean test accuracy (y), one
    colour per method; the setting chosen on validation is ringed."""
    scored = means[means["val_acc"].notna()]
    styles = group_styles((m, None) for m in scored["method"])
    chosen = {(r.task, r.backbone, r.method, r.setting) for r in best.itertuples()}
    fig = go.Figure()
    for method, group in scored.groupby("method", sort=False):
        style = styles[group_label(method, None)]
        picked = [(r.task, r.backbone, r.method, r.setting) in chosen
                  for r in group.itertuples()]
        fig.add_scatter(
            x=100 * group["val_acc"], y=100 * group["test_acc"], mode="markers", name=method,
            marker=dict(color=style.colour, size=[13 if p else 8 for p in picked],
                        line=dict(width=[2.5 if p else 0 for p in picked], color="black")),
            customdata=list(zip(group["task"], group["setting"].replace("", "(one setting)"),
                                group["seeds_done"])),
            hovertemplate=("%{customdata[0]} · %{customdata[1]}<br>val %{x:.1f}% · "
                           "test %{y:.1f}%<br>%{customdata[2]} seed(s)<extra>" + method
                           + "</extra>"))
    fig.update_layout(xaxis_title="mean validation accuracy (%)",
                      yaxis_title="mean test accuracy (%)", height=380,
                      margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h"))
    return fig
