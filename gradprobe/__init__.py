"""gradprobe: see which loss moved which weight, and catch autograd mistakes before PyTorch does.

# NOTE [lazy facade]
# The pytest plugin (`gradprobe.integrations.pytest_plugin`) is imported on every pytest run of every project
# that has gradprobe installed, and importing it imports this package first. So this facade
# imports nothing heavy: each public name is loaded from its module (and torch with it) on first
# use, PEP 562 style. `import gradprobe` alone costs microseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from gradprobe.analysis.breakdown import CarriedIn, LeafBreakdown, Part
    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.records import BackwardRecord, Leaf
    from gradprobe.capture.plugin_catalog import refresh_plugins
    from gradprobe.findings import Site
    from gradprobe.analysis.split import LeafSplit, ModuleSplit, Split
    from gradprobe.api.trace import Trace, trace
    from gradprobe.exceptions import GradProbeError, GradProbeWarning, TraceStateError, TraceTargetError
    from gradprobe.findings import Finding, RelatedSite
    from gradprobe.hookspecs import hookimpl

__version__ = "0.1.0"

_EXPORTS = {
    "BackwardCall": "gradprobe.capture.calls",
    "BackwardRecord": "gradprobe.ledger.records",
    "CarriedIn": "gradprobe.analysis.breakdown",
    "Finding": "gradprobe.findings",
    "GradProbeError": "gradprobe.exceptions",
    "GradProbeWarning": "gradprobe.exceptions",
    "Leaf": "gradprobe.ledger.records",
    "LeafBreakdown": "gradprobe.analysis.breakdown",
    "LeafSplit": "gradprobe.analysis.split",
    "ModuleSplit": "gradprobe.analysis.split",
    "Part": "gradprobe.analysis.breakdown",
    "RelatedSite": "gradprobe.findings",
    "Site": "gradprobe.findings",
    "Split": "gradprobe.analysis.split",
    "Trace": "gradprobe.api.trace",
    "TraceStateError": "gradprobe.exceptions",
    "TraceTargetError": "gradprobe.exceptions",
    "hookimpl": "gradprobe.hookspecs",
    "refresh_plugins": "gradprobe.capture.plugin_catalog",
    "trace": "gradprobe.api.trace",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


del TYPE_CHECKING  # keep the facade's namespace to the public names
