"""Number and cell formatting shared by the report tables."""

from __future__ import annotations

import math

from rich.text import Text

__all__ = ["check_cell", "json_float", "nonfinite", "number", "share"]


def nonfinite(x: float) -> str:
    return "NaN!" if math.isnan(x) else ("Inf!" if x > 0 else "-Inf!")


def number(x: float | None) -> str:
    """Three significant digits; exact zero as ``0``."""
    if x is None:
        return "—"
    if not math.isfinite(x):
        return nonfinite(x)
    if x == 0:
        return "0"
    return f"{x:.3g}"


def json_float(x: float | None) -> float | str | None:
    """``x`` for strict JSON: a non-finite float as its string (``"nan"``, ``"inf"``)."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def share(x: float | None) -> str:
    if x is None:
        return ""
    if not math.isfinite(x):
        return "?"
    return f"{x * 100:.0f}%"


def check_cell(check: bool | None) -> Text:
    if check is None:
        return Text("")
    return Text("✓", style="green") if check else Text("✗", style="bold red")
