"""A trace's report as plain text and as HTML (rich's recorded console), for files and notebooks."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gradprobe.api.trace import Trace

__all__ = ["mimebundle", "render"]


def render(trace: Trace, width: int = 120) -> Console:
    """Render ``trace``'s report into a recording console (read it back with ``export_text``/``export_html``)."""
    console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    console.print(trace)
    return console


def mimebundle(trace: Trace, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """What Jupyter displays for a trace: the rich report as HTML, plus a plain-text twin."""
    console = render(trace)
    # export_text(clear=False) first: export_html clears the record buffer by default
    data = {"text/plain": console.export_text(clear=False), "text/html": console.export_html(inline_styles=True)}
    if include:
        data = {k: v for k, v in data.items() if k in include}
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    return data
