"""The plugin manager a trace talks to.

# NOTE [one dispatch table per trace, one pluggy registration per plugin set]
# Each Trace gets its own plugin instances: plugins given as classes are instantiated for that trace
# (per-trace state lives on the instance, never on a class or module), and a plugin that fails is
# switched off for that trace only. Which plugins a trace gets is `plugin_catalog.py`. Registering them with a fresh pluggy.PluginManager at every trace
# cost ~1 ms (pluggy inspects and validates every attribute of every plugin), and a trace may be
# entered every training step or every test. So pluggy registers and validates a plugin set once per
# process: the first trace with a given set (the same names and the same classes, modules or import
# specs, in the same order) registers it with pluggy and keeps a *recipe* -- per hook, which
# plugin's which attribute pluggy would call, in pluggy's order (tryfirst/trylast honoured). Later
# traces with that set only instantiate the classes and look the attributes up. A set holding a
# plugin *instance* (`trace(plugins=[obj])`) is not cached: its attributes could change between
# traces, so it goes through pluggy each time. Entry points are discovered once per process.

# NOTE [isolating plugins]
# pluggy calls all implementations in one go and lets the first exception escape. gradprobe must
# never break a training step because a plugin is buggy, so hooks are called one implementation at
# a time. GradProbeError is the one exception let through: it is how `on_finding="raise"` stops the
# user's code at a mistake.

# NOTE [internal errors] is in capture/failures.py.
"""

from __future__ import annotations

import inspect
import traceback
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from gradprobe import hookspecs
from gradprobe.capture.failures import internal_error_finding, strict_internal
from gradprobe.capture.plugin_catalog import (
    BUILTIN_PLUGINS,
    Detect,
    _chosen_detectors,
    _entry_point_plugins,
    _is_detector,
    _load,
    _plugin_name,
)
from gradprobe.exceptions import GradProbeError
from gradprobe.findings import Finding

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.api.trace import Trace

__all__ = ["PluginHost"]

class _Manager(pluggy.PluginManager):
    """pluggy's manager, minus a look at every dunder of every plugin at each registration.

    A trace registers its plugins afresh; pluggy inspects each name in ``dir(plugin)``, and the ~30
    names every object inherits made that ~0.3 ms per plugin per trace. Hook implementations are
    public methods (``gradprobe_*``, or any public name given ``specname=``).
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if name.startswith("_"):
            return None
        if isinstance(plugin, ModuleType):
            return super().parse_hookimpl_opts(plugin, name)
        # A class's methods do not change between its instances: look each name up once per process.
        known = _CLASS_IMPLS.setdefault(type(plugin), {})
        if name not in known:
            known[name] = super().parse_hookimpl_opts(plugin, name)
        opts = known[name]
        return dict(opts) if opts is not None else None


# plugin class -> {attribute name: its hookimpl options, or None}
_CLASS_IMPLS: dict[type, dict[str, Any]] = {}


class _Impl:
    """One hook implementation of one plugin instance, as the host calls it."""

    __slots__ = ("plugin_name", "function", "argnames")

    def __init__(self, plugin_name: str, function: Any, argnames: tuple[str, ...]) -> None:
        self.plugin_name = plugin_name
        self.function = function
        self.argnames = argnames


# A plugin set's recipe: per hook name, ``(candidate position, attribute name, argnames)`` in call order.
_Recipe = dict[str, list[tuple[int, str, tuple[str, ...]]]]
# (name, class / module / import spec) per candidate -> its recipe (NOTE [one dispatch table per trace ...])
_RECIPES: dict[tuple[tuple[str, Any], ...], _Recipe] = {}


def _cacheable(plugin: Any) -> bool:
    return isinstance(plugin, (str, ModuleType)) or inspect.isclass(plugin)


class PluginHost:
    """Registers the built-in, entry-point and explicit plugins of one trace and calls them safely."""

    def __init__(
        self, trace: Trace, plugins: Iterable[Any] = (), disable: Iterable[str] = (), detect: Detect = "default"
    ) -> None:
        self._trace_ref = weakref.ref(trace)  # NOTE [no cycles] in recorder.py
        self.failures: list[Finding] = []
        self.builtin: set[str] = set()  # names registered from BUILTIN_PLUGINS
        self._internal: set[str] = set()  # names already reported as internal errors
        self._plugins: dict[str, Any] = {}  # name -> instance, in call order
        self._impls: dict[str, list[_Impl]] = {}  # hook name -> implementations, in call order
        chosen = _chosen_detectors(detect)
        # (name, plugin, installed?) in call order: built-ins, then installed plugins, then trace(plugins=...)
        candidates: list[tuple[str, Any, bool]] = [
            (name, spec, False)
            for name, spec in BUILTIN_PLUGINS.items()
            if name in chosen or not _is_detector(spec)
        ]
        broken: dict[str, str] = {}
        for name, plugin, error in _entry_point_plugins():
            if error is None:
                candidates.append((name, plugin, True))
            else:
                broken[name] = error
        candidates += [(_plugin_name(p), p, False) for p in plugins]
        disabled = {disable} if isinstance(disable, str) else set(disable)
        known = set(BUILTIN_PLUGINS) | {name for name, _, _ in candidates} | set(broken)
        unknown = disabled - known
        if unknown:
            raise ValueError(
                f"trace(disable=...) names no plugin called {sorted(unknown)}; "
                f"the plugins of this trace are {sorted(known)}"
            )
        for name, error in broken.items():
            if name not in disabled:
                self._report(name, f"installed gradprobe plugin {name!r} {error}; it is left out", "load")
        candidates = [c for c in candidates if c[0] not in disabled]
        seen: set[str] = set()
        for name, _, _ in candidates:
            if name in seen:
                raise ValueError(f"two gradprobe plugins are both named {name!r}; give one a gradprobe_name")
            seen.add(name)
        for name, plugin, _ in candidates:
            if plugin == BUILTIN_PLUGINS.get(name):
                self.builtin.add(name)
        key = tuple((name, plugin) for name, plugin, _ in candidates)
        cacheable = all(_cacheable(p) for _, p, _ in candidates)
        recipe = _RECIPES.get(key) if cacheable else None
        if recipe is not None:
            instances = [self._instantiate(name, plugin) for name, plugin, _ in candidates]
        else:
            instances, recipe, complete = self._register_with_pluggy(candidates)
            if complete and cacheable:  # a set that failed is tried afresh
                _RECIPES[key] = recipe
        self._build(candidates, instances, recipe)

    def _instantiate(self, name: str, plugin: Any) -> Any:
        """The plugin object for this trace (a class is instantiated: its state is this trace's
        alone), or None when loading or instantiating it failed (reported)."""
        try:
            if isinstance(plugin, str):
                plugin = _load(plugin)
            if inspect.isclass(plugin):
                plugin = plugin()
        except Exception as exc:
            self._fail(name, "__init__", exc)
            return None
        return plugin

    def _build(self, candidates: list[tuple[str, Any, bool]], instances: list[Any], recipe: _Recipe) -> None:
        """The dispatch table: the recipe's attributes looked up on this trace's instances (None: failed)."""
        for (name, _, _), instance in zip(candidates, instances):
            if instance is not None:
                self._plugins[name] = instance
        for hook_name, entries in recipe.items():
            impls = [
                _Impl(candidates[i][0], getattr(instances[i], attr), argnames)
                for i, attr, argnames in entries
                if instances[i] is not None
            ]
            if impls:
                self._impls[hook_name] = impls

    def _register_with_pluggy(self, candidates: list[tuple[str, Any, bool]]) -> tuple[list[Any], _Recipe, bool]:
        """Register and validate the plugins with pluggy and read its call order off as a recipe.

        Returns the instances (None where a plugin failed), the recipe, and whether every plugin was
        registered (only then is the recipe worth caching).
        """
        complete = True
        pm = _Manager("gradprobe")
        pm.add_hookspecs(hookspecs)
        position = {name: i for i, (name, _, _) in enumerate(candidates)}
        instances: list[Any] = [None] * len(candidates)
        attributes: dict[tuple[str, str], str] = {}  # (plugin name, hook name) -> attribute name
        # pluggy calls the last registered first: register in reverse so hooks run in candidate order.
        for name, plugin, installed in reversed(candidates):
            instance = self._instantiate(name, plugin)
            if instance is not None and self._validate_and_register(pm, name, instance, installed, attributes):
                instances[position[name]] = instance
            else:
                complete = False
        recipe: _Recipe = {}
        for hook_name in _hook_list():
            entries = [
                (position[impl.plugin_name], attributes[(impl.plugin_name, hook_name)], tuple(impl.argnames))
                for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls())
            ]
            if entries:
                recipe[hook_name] = entries
        return instances, recipe, complete

    def _validate_and_register(
        self, pm: pluggy.PluginManager, name: str, plugin: Any, installed: bool, attributes: dict[tuple[str, str], str]
    ) -> bool:
        unknown = []
        found = {}
        for attr in dir(plugin):  # what pluggy's register itself looks at
            opts = pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            if not hasattr(hookspecs, attr):
                unknown.append(attr)
            found[(name, opts.get("specname") or attr)] = attr
        try:
            if unknown:
                raise pluggy.PluginValidationError(
                    plugin,
                    f"gradprobe plugin {name!r} implements {unknown}, which are not gradprobe hooks; "
                    f"check the spelling against gradprobe.hookspecs ({_hook_names()})",
                )
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            if not installed:
                raise  # the user's own plugin: a mistake to fix now, before any training runs
            self._report(name, f"installed gradprobe plugin {name!r} is invalid: {exc}; it is left out", "load")
            return False
        attributes.update(found)
        return True

    @property
    def _trace(self) -> Trace:
        trace = self._trace_ref()
        assert trace is not None, "the trace of this plugin host was garbage collected"
        return trace

    @property
    def names(self) -> list[str]:
        """Registered plugin names, in the order pluggy lists them (last registered first)."""
        return list(reversed(self._plugins))

    def get_plugin(self, name: str) -> Any:
        """The plugin registered as ``name`` in this trace, or None (not registered, or switched off)."""
        return self._plugins.get(name)

    def implemented(self, hook_name: str) -> bool:
        """Whether any registered plugin implements ``hook_name`` (to skip costly event preparation)."""
        return bool(self._impls.get(hook_name))

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of ``hook_name``; return their non-None results in order."""
        results: list[Any] = []
        impls = self._impls.get(hook_name)
        if not impls:
            return results
        every = len(kwargs)
        for impl in tuple(impls):  # a plugin switched off mid-call leaves the list
            if impl.plugin_name not in self._plugins:
                continue
            try:
                if len(impl.argnames) == every:  # takes every argument of the hook (its names are the spec's)
                    result = impl.function(**kwargs)
                else:
                    result = impl.function(**{name: kwargs[name] for name in impl.argnames})
            except GradProbeError:
                raise
            except Exception as exc:  # a buggy plugin must not break the training step
                self._fail(impl.plugin_name, hook_name, exc)
                continue
            if result is not None:
                results.append(result)
        return results

    def _fail(self, name: str, hook_name: str, exc: Exception) -> None:
        self._plugins.pop(name, None)
        for hook, impls in list(self._impls.items()):
            self._impls[hook] = [impl for impl in impls if impl.plugin_name != name]
        if name in self.builtin:
            self.internal_error(name, hook_name, exc)
            return
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename}:{frame.lineno}" if frame else ""
        self._report(
            name,
            f"gradprobe plugin {name!r} raised {type(exc).__name__}: {exc}{where} in {hook_name}; "
            "it is switched off for the rest of this trace",
            hook_name,
        )

    def internal_error(self, name: str, hook_name: str, exc: Exception) -> None:
        """Report a bug in gradprobe's own ``name`` (a GP001 notice, once per name; NOTE [internal errors]).

        Raises:
            Exception: ``exc`` itself, under ``GRADPROBE_STRICT_INTERNAL=1``.
        """
        if strict_internal():
            raise exc
        if name in self._internal:
            return
        self._internal.add(name)
        finding = internal_error_finding(name, hook_name, exc, _is_detector(BUILTIN_PLUGINS.get(name, "")))
        self.failures.append(finding)
        trace = self._trace
        trace._add_finding(finding, policy="record" if trace.on_finding == "record" else "warn")

    def _report(self, name: str, message: str, hook_name: str) -> None:
        finding = Finding(
            code="GP000",
            kind="plugin_error",
            severity="warning",
            message=message,
            fix=f"fix the plugin, or leave it out with trace(..., disable=[{name!r}])",
            plugin=name,
            data={"hook": hook_name},
        )
        self.failures.append(finding)
        self._trace._add_finding(finding, policy="record")


def _hook_list() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("gradprobe_"))


def _hook_names() -> str:
    return ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("gradprobe_")))
