"""Which plugins a trace gets: the built-in ones, the installed ones (entry points), the chosen detectors.

Place in the flow: capture. :class:`~gradprobe.capture.host.PluginHost` asks this module for a
trace's candidate plugins and instantiates and calls them; everything here is read once per process.

# NOTE [discovering installed plugins]
# Entry points of the "gradprobe" group are read and loaded once per process (reading package
# metadata costs milliseconds, a trace may be entered every training step). A plugin installed
# while the process runs (a notebook, a test) is seen after `gradprobe.refresh_plugins()`. An entry
# point that fails to load is remembered as such and reported as a GP000 finding by every trace,
# never raised: a broken third-party package must not stop anyone's training.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["BUILTIN_PLUGINS", "Detect", "refresh_plugins"]

# Built-in plugins, registered under these names (what `disable=[...]` takes), in this order.
BUILTIN_PLUGINS: dict[str, str] = {
    "freed_graph": "gradprobe.detectors.freed_graph:FreedGraph",
    "nonleaf_grad": "gradprobe.detectors.nonleaf_grad:NonLeafGrad",
    "inplace_saved": "gradprobe.detectors.inplace:InplaceSaved",
    "stale_grad": "gradprobe.detectors.stale_grad:StaleGrad",
    "unreached": "gradprobe.detectors.unreached:Unreached",
    "nonfinite": "gradprobe.detectors.nonfinite:NonFinite",
    "nonfinite_modules": "gradprobe.detectors.nonfinite:NonFiniteModules",
    "decompose": "gradprobe.analysis.decompose_plugin:Decomposer",
    "report.calls": "gradprobe.report.sections:CallsSection",
    "report.breakdown": "gradprobe.report.sections:BreakdownSection",
    "report.run": "gradprobe.report.run:RunSection",
    "report.decomposition": "gradprobe.report.decomposition:DecompositionSection",
    "report.findings": "gradprobe.report.sections:FindingsSection",
    "amp": "gradprobe.detectors.amp:AmpPlugin",
    "ddp": "gradprobe.detectors.ddp:DdpPlugin",
    "optimizer": "gradprobe.detectors.optimizer:OptimizerMismatch",
    "frozen_update": "gradprobe.detectors.frozen_update:FrozenUpdate",
    "kept_graph": "gradprobe.detectors.kept_graph:KeptGraph",
    "retained_graph": "gradprobe.detectors.retained_graph:RetainedGraph",
    "report.graph_tree": "gradprobe.report.graph_tree:GraphTreeSection",
}

Detect = Union[str, "Iterable[str]"]

_entry_point_cache: list[tuple[str, Any, str | None]] | None = None


def refresh_plugins() -> list[str]:
    """Forget the installed plugins found so far and look for them again; return their names.

    gradprobe reads the ``gradprobe`` entry-point group once per process. Call this after
    installing (or removing) a plugin package in a running process, e.g. in a notebook::

        %pip install gradprobe-budget
        gradprobe.refresh_plugins()  # ['budget']
    """
    global _entry_point_cache
    _entry_point_cache = None
    importlib.invalidate_caches()
    return [name for name, _, _ in _entry_point_plugins()]


def _entry_point_plugins() -> list[tuple[str, Any, str | None]]:
    """``(name, plugin or None, why it failed to load or None)`` per installed plugin, read once."""
    global _entry_point_cache
    if _entry_point_cache is None:
        found: list[tuple[str, Any, str | None]] = []
        for ep in importlib.metadata.entry_points(group="gradprobe"):
            try:
                found.append((ep.name, ep.load(), None))
            except Exception as exc:  # a broken installed package must not break anyone's training
                found.append((ep.name, None, f"could not be loaded from {ep.value!r}: {type(exc).__name__}: {exc}"))
        _entry_point_cache = found
    return _entry_point_cache


_LOADED: dict[str, Any] = {}  # import spec -> the class or module it names (built-ins; once per process)


def _load(spec: str) -> Any:
    found = _LOADED.get(spec)
    if found is None:
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        found = _LOADED[spec] = getattr(module, attr) if attr else module
    return found


def _is_detector(spec: str) -> bool:
    return spec.startswith("gradprobe.detectors.")


_DEFAULT_DETECTORS: set[str] | None = None


def _chosen_detectors(detect: Detect) -> set[str]:
    """Names of the built-in detectors ``trace(detect=...)`` selects."""
    global _DEFAULT_DETECTORS
    if detect == "default" and _DEFAULT_DETECTORS is not None:
        return set(_DEFAULT_DETECTORS)
    chosen = _choose_detectors(detect)
    if detect == "default":
        _DEFAULT_DETECTORS = set(chosen)
    return chosen


def _choose_detectors(detect: Detect) -> set[str]:
    detectors = {name: spec for name, spec in BUILTIN_PLUGINS.items() if _is_detector(spec)}
    if detect == "all":
        return set(detectors)
    if detect == "default":
        return {name for name, spec in detectors.items() if getattr(_load(spec), "default", True)}
    if isinstance(detect, str):
        raise ValueError(f"trace(detect=...) must be 'default', 'all' or detector names, got {detect!r}")
    chosen = set(detect)
    unknown = chosen - set(detectors)
    if unknown:
        raise ValueError(f"trace(detect=...) names no detector called {sorted(unknown)}; the detectors are {sorted(detectors)}")
    return chosen


def _plugin_name(plugin: Any) -> str:
    name = getattr(plugin, "gradprobe_name", None) or getattr(plugin, "__name__", None)
    return str(name or type(plugin).__name__)
