"""gradprobe: see which loss moved which weight, and catch autograd mistakes before PyTorch does."""

from __future__ import annotations

from gradprobe._breakdown import CarriedIn, LeafBreakdown, Part
from gradprobe._calls import BackwardCall
from gradprobe._ledger import BackwardRecord, Leaf
from gradprobe._sites import Site
from gradprobe._split import LeafSplit, ModuleSplit, Split
from gradprobe._trace import Trace, trace
from gradprobe.exceptions import GradProbeError, GradProbeWarning, TraceStateError, TraceTargetError
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "BackwardCall",
    "BackwardRecord",
    "CarriedIn",
    "Finding",
    "GradProbeError",
    "GradProbeWarning",
    "Leaf",
    "LeafBreakdown",
    "LeafSplit",
    "ModuleSplit",
    "Part",
    "RelatedSite",
    "Site",
    "Split",
    "Trace",
    "TraceStateError",
    "TraceTargetError",
    "__version__",
    "hookimpl",
    "trace",
]
