"""Errors and warnings raised by gradprobe.

The hierarchy::

    RuntimeError
     └── GradProbeError              an autograd mistake caught by a detector (carries ``.finding``)
          ├── TraceStateError         a trace used out of order (re-entered, entered twice)
          └── TraceTargetError        trace() given something it cannot trace (also a TypeError)
    UserWarning
     └── GradProbeWarning            a finding reported with ``on_finding="warn"``, or a usage warning

Every gradprobe error is a :class:`RuntimeError`, so code that already catches PyTorch's own autograd
errors keeps working when gradprobe raises first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradprobe.findings import Finding

__all__ = ["GradProbeError", "GradProbeWarning", "TraceStateError", "TraceTargetError"]


class GradProbeError(RuntimeError):
    """An autograd mistake found by gradprobe; ``.finding`` holds the details when there is one."""

    def __init__(self, message: str, finding: Finding | None = None) -> None:
        super().__init__(message)
        self.finding = finding


class TraceStateError(GradProbeError):
    """A :class:`~gradprobe.Trace` was used out of order, e.g. entered again after it finished."""


class TraceTargetError(GradProbeError, TypeError):
    """``trace()`` was given an object it cannot trace (not a module or a leaf tensor)."""


class GradProbeWarning(UserWarning):
    """A finding reported as a warning (``on_finding="warn"``), or a gradprobe usage warning."""
