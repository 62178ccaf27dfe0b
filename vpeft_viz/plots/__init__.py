"""Pure plotly figure builders: results in → ``go.Figure`` out (no streamlit, no torch).

Shared here: one colour per method, so a method keeps its colour on every figure; the
human-readable number formats come from ``analysis.cost`` and are re-exported.
"""

from __future__ import annotations

from plotly.colors import qualitative

from ..analysis.cost import human_bytes, human_count

__all__ = ["human_bytes", "human_count", "method_colour"]

_PALETTE = qualitative.D3 + qualitative.Set2


def method_colour(method: str, methods: list[str]) -> str:
    """A stable colour for ``method`` within the ordered list of methods shown."""
    return _PALETTE[methods.index(method) % len(_PALETTE)] if method in methods else "#888"
