"""Shared helpers for the detector tests."""

from __future__ import annotations

from gradprobe import Finding, Trace


def problems(t: Trace) -> list[Finding]:
    """Findings that are warnings or errors (info findings are facts, not mistakes)."""
    return [f for f in t.findings if f.severity != "info"]


def codes(t: Trace) -> list[str]:
    return [f.code for f in problems(t)]
