"""The one number formatter of the Markdown and HTML reports (and the benchmark tables)."""
from __future__ import annotations


def fmt(x: float | None, digits: int = 2, pct: bool = False) -> str:
    """`x` with `digits` decimals, or as a whole percentage; "n/a" for a missing value."""
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.{digits}f}"
