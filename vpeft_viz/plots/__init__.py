"""Pure plotly figure builders: results in → ``go.Figure`` out (no streamlit, no torch).

Shared here: human-readable number formats used by figures and tables alike, and one
colour per method so a method keeps its colour on every figure.
"""

from __future__ import annotations

import math

from plotly.colors import qualitative


def human_count(n: float | None) -> str:
    """1234 → '1.23k', 2_500_000 → '2.50M'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def human_bytes(n: float | None) -> str:
    """Bytes in binary units: 1536 → '1.5 KiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f} B"


_PALETTE = qualitative.D3 + qualitative.Set2


def method_colour(method: str, methods: list[str]) -> str:
    """A stable colour for ``method`` within the ordered list of methods shown."""
    return _PALETTE[methods.index(method) % len(_PALETTE)] if method in methods else "#888"
