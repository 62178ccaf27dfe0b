"""Pure plotly figure builders: results in → ``go.Figure`` out (no streamlit, no torch).

Shared here: one style per compared group (a method in one setting), so a group keeps its
colour and marker on every figure; the human-readable number formats come from
``analysis.cost`` and are re-exported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from plotly.colors import qualitative

from ..analysis.cost import human_bytes, human_count

__all__ = ["GroupStyle", "group_label", "group_styles", "human_bytes", "human_count"]

_PALETTE = qualitative.D3 + qualitative.Set2
# Within one method, settings are told apart by marker, line dash and bar pattern.
_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "cross", "x", "star", "pentagon")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_PATTERNS = ("", "/", ".", "x", "\\", "+", "-", "|")


@dataclass(frozen=True)
class GroupStyle:
    """How one group is drawn on every figure."""

    colour: str
    symbol: str
    dash: str
    pattern: str


def group_label(method: str, setting: str | float | None) -> str:
    """'lora' or 'lora (epochs=3)': a method and, when settings differ, its setting."""
    return f"{method} ({setting})" if isinstance(setting, str) and setting else method


def group_styles(groups: Iterable[tuple[str, str | float | None]]) -> dict[str, GroupStyle]:
    """``group_label`` → style for (method, setting) pairs, in the order given: a colour per
    method, a marker / dash / bar pattern per setting of that method. Build it once from
    every loaded run so that filtering or picking groups never changes a group's look."""
    methods: list[str] = []
    settings: dict[str, list[str]] = {}
    styles: dict[str, GroupStyle] = {}
    for method, setting in groups:
        label = group_label(method, setting)
        if label in styles:
            continue
        if method not in methods:
            methods.append(method)
        i = len(settings.setdefault(method, []))
        settings[method].append(label)
        styles[label] = GroupStyle(colour=_PALETTE[methods.index(method) % len(_PALETTE)],
                                   symbol=_SYMBOLS[i % len(_SYMBOLS)],
                                   dash=_DASHES[i % len(_DASHES)],
                                   pattern=_PATTERNS[i % len(_PATTERNS)])
    return styles
