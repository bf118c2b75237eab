"""What ``trace(...)`` records: resolve its arguments to named leaf tensors."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from gradprobe.capture.checkpoint import checkpoint_leaves
from gradprobe.capture.graph import iter_nodes
from gradprobe.capture.sites import caller_outside_libraries, frame_locals, name_in_frame
from gradprobe.exceptions import GradProbeWarning, TraceTargetError

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["LeafNamer", "Target", "leaves_of_graph", "matching_names", "resolve_targets"]

Target = tuple[torch.Tensor, str, "str | None"]  # (leaf, name, owning module's qualified name)


def _describe(obj: Any) -> str:
    text = " ".join(repr(obj).split())  # one line: a dict of Parameters has a multi-line repr
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(obj).__name__} {text}"


def _mapping_error(obj: Mapping[Any, Any], frame: FrameType | None) -> TraceTargetError:
    """What to pass instead of a dict: its ``.values()`` when they are leaves, the module for a state_dict."""
    label = name_in_frame(frame, obj)
    values = list(obj.values())
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    what = f"`{label}`" if label else f"a {type(obj).__name__}"
    if tensors and len(tensors) == len(values) and all(t.requires_grad and t.is_leaf for t in tensors):
        fix = f"pass its values: `gradprobe.trace({label}.values())`" if label else "pass its values: `gradprobe.trace(d.values())`"
    elif tensors and not any(t.requires_grad for t in tensors):
        fix = (
            "its tensors do not require grad (a state_dict holds detached copies): pass the module itself, "
            "e.g. `gradprobe.trace(model)`"
        )
    else:
        fix = "pass nn.Module objects or leaf tensors that require grad, or nothing at all to trace every leaf"
    return TraceTargetError(f"gradprobe.trace() cannot trace {what} (a mapping of {len(values)} entries); {fix}")


def tensor_label(t: torch.Tensor, serial: int) -> str:
    shape = "×".join(str(s) for s in t.shape) or "scalar"
    return f"tensor#{serial}[{shape}]"


# NOTE [leaf names]
# One rule names every leaf, however it reached the trace (`trace(model)`, `trace(model.parameters())`,
# a list, `dict.values()`, several modules, a submodule, `trace()` of every leaf):
# - a parameter of a module is named by its path under the outermost module in scope that holds it:
#   `model.0.weight`, the `named_parameters()` name behind the variable that names that module. In
#   scope are the local variables of the frame that called `trace()` (for leaves found at backward
#   time, of the frame that called backward), its globals, and the modules held in attributes of a
#   `self` that is no module (`self.model.0.weight`); library frames (NOTE [library call sites] in
#   sites.py) are skipped for the user's frame above them. A module inside another one in scope
#   (`head = model.head`) is named through the outer one (`model.head.weight`), except the module a
#   wrapper in scope wraps (DistributedDataParallel, DataParallel, torch.compile): `model.0.weight`,
#   not `ddp.module.0.weight`, when both are variables. A parameter shared by two modules takes its
#   first name (the first module in scope, then `named_parameters()` order).
# - a module passed to `trace()` that no variable in scope holds is named by its class:
#   `Sequential.0.weight` (`Sequential#2.0.weight` for a second one).
# - a tensor that no module in scope holds is named by the variable that holds it (`w`), else
#   `tensor#N[shape]`.
# A bare `0.weight` never appears, and `Leaf.module` is always the name up to the last dot (`model.0`;
# None for a loose tensor). `t.name(tensor, "...")` overrides all of this.
_CO_OPTIMIZED = 0x0001
_WRAPPER_CHILDREN = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "OptimizedModule": "_orig_mod",
}


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module a DDP / DataParallel / torch.compile wrapper wraps (None for any other module)."""
    attr = _WRAPPER_CHILDREN.get(type(module).__name__)
    inner = module._modules.get(attr) if attr else None
    return inner if isinstance(inner, nn.Module) else None


def _scope(frame: FrameType | None) -> list[tuple[str, Any]]:
    """The modules and tensors the user can name in ``frame``: locals, ``self``'s modules, globals."""
    if frame is None:
        return []
    found: list[tuple[str, Any]] = []
    local = frame_locals(frame)
    for var, value in local.items():
        if var.startswith("_"):
            continue
        if _nameable(value):
            found.append((var, value))
        elif var == "self":
            found += [(f"self.{attr}", sub) for attr, sub in _module_attributes(value)]
    # a function's frame (never read its f_locals again: NOTE [f_locals snapshots]): globals are in scope too
    if frame.f_code.co_flags & _CO_OPTIMIZED or frame.f_locals is not frame.f_globals:
        found += [
            (var, value)
            for var, value in list(frame.f_globals.items())
            if var not in local and not var.startswith("_") and _nameable(value)
        ]
    return found


def _nameable(value: Any) -> bool:
    # by type(): isinstance() reads `__class__`, which a lazy proxy among the globals may raise from
    return issubclass(type(value), (nn.Module, torch.Tensor))


def _module_attributes(obj: Any) -> list[tuple[str, nn.Module]]:
    try:
        attrs = vars(obj)
    except TypeError:  # no __dict__ (slots, builtins)
        return []
    return [(a, v) for a, v in list(attrs.items()) if issubclass(type(v), nn.Module) and not a.startswith("_")]


def _walk(walk: Callable[[], Iterable[Any]]) -> list[Any]:
    """``list(walk())``, or nothing from a module in scope too broken to walk (it is not the user's target)."""
    try:
        return list(walk())
    except Exception:
        return []


def _outermost(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The modules no other one of ``modules`` holds, wrappers after what they wrap (NOTE [leaf names])."""
    if len(modules) < 2:
        return modules
    held: set[int] = set()
    named = {id(m) for _, m in modules}
    for _, module in modules:
        inner = _wrapped(module)
        unwrapped = inner if inner is not None and id(inner) in named else None
        for sub in _walk(module.modules):
            if sub is not module and sub is not unwrapped:
                held.add(id(sub))
    roots = [(n, m) for n, m in modules if id(m) not in held] or modules[:1]  # [:1]: modules holding each other
    roots.sort(key=lambda item: _wrapped(item[1]) is not None)  # stable: wrappers after what they wrap
    return roots


class LeafNamer:
    """Names leaves by one rule, however they were passed (NOTE [leaf names]).

    Args:
        frame: the user's frame (of the ``trace()`` call, or of a backward call for leaves found then).
        modules: the modules passed to ``trace()``; those no variable in scope holds are named by class.
    """

    def __init__(self, frame: FrameType | None, modules: Iterable[nn.Module] = ()) -> None:
        self._by_id: dict[int, tuple[str, str | None]] | None = None  # built on first need
        self._modules = list(modules)
        self._scope = _scope(caller_outside_libraries(frame) or frame)
        unique: dict[int, tuple[str, nn.Module]] = {}
        for var, value in self._scope:
            if issubclass(type(value), nn.Module):
                unique.setdefault(id(value), (var, value))
        self._in_scope = unique
        self._roots = _outermost(list(unique.values()))

    def _table(self) -> dict[int, tuple[str, str | None]]:
        if self._by_id is not None:
            return self._by_id
        by_id = self._by_id = {}
        for var, module in self._roots:
            self._add(var, module)
        unnamed = {
            id(m): m
            for m in self._modules
            if id(m) not in self._in_scope and any(id(p) not in by_id for p in _walk(m.parameters))
        }
        used: dict[str, int] = {}
        for label, module in _outermost([(type(m).__name__, m) for m in unnamed.values()]):
            used[label] = used.get(label, 0) + 1
            self._add(label if used[label] == 1 else f"{label}#{used[label]}", module)
        for var, value in self._scope:
            if issubclass(type(value), torch.Tensor):
                by_id.setdefault(id(value), (var, None))
        return by_id

    def _add(self, root: str, module: nn.Module) -> None:
        by_id = self._table()
        prefix = root + "."
        for qual, p in _walk(lambda: module.named_parameters(remove_duplicate=False)):
            if id(p) not in by_id:
                name = prefix + qual
                by_id[id(p)] = (name, name.rpartition(".")[0])

    def parameters_of(self, module: nn.Module) -> list[Target]:
        """``module``'s parameters that require grad, named, in ``named_parameters()`` order."""
        if len(self._roots) == 1 and self._roots[0][1] is module and self._by_id is None:
            prefix = self._roots[0][0] + "."  # the common case, trace(model): one walk, no table
            found: list[Target] = []
            for qual, p in module.named_parameters():
                if p.requires_grad:
                    name = prefix + qual
                    found.append((p, name, name.rpartition(".")[0]))
            return found
        table = self._table()
        return [(p, *table[id(p)]) for p in module.parameters() if p.requires_grad]

    def name(self, t: torch.Tensor) -> tuple[str, str | None] | None:
        """``(name, module)`` of ``t`` by the rule, or None for a tensor nothing in scope holds."""
        return self._table().get(id(t))

    def order(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` in module-definition order; tensors it cannot name keep their order, last."""
        rank = {key: i for i, key in enumerate(self._table())}
        return sorted(tensors, key=lambda t: rank.get(id(t), len(rank)))


def matching_names(names: Iterable[str], wanted: str) -> list[str]:
    """The names a user's ``wanted`` means: itself if it is one, else those it ends (at a dot).

    Leaves are named under the model's variable (``model.fc1.weight``, NOTE [leaf names]), and the
    ``named_parameters()`` name ``fc1.weight`` still finds that leaf; more than one match is ambiguous
    and left to the caller to report.
    """
    names = list(names)
    if wanted in names:
        return [wanted]
    tail = "." + wanted
    return [name for name in names if name.endswith(tail)]


def _flatten(objs: Iterable[Any], frame: FrameType | None = None) -> Iterator[Any]:
    for obj in objs:
        if isinstance(obj, (nn.Module, torch.Tensor)):
            yield obj
        elif isinstance(obj, (list, tuple, set, ValuesView)) or _is_generator(obj):
            yield from _flatten(obj, frame)
        elif isinstance(obj, Mapping):
            raise _mapping_error(obj, frame)
        else:
            raise TraceTargetError(
                f"gradprobe.trace() cannot trace {_describe(obj)}: pass nn.Module objects, leaf tensors "
                "that require grad (e.g. model.parameters()), or nothing at all to trace every leaf"
            )


def _is_generator(obj: Any) -> bool:
    return hasattr(obj, "__next__") and hasattr(obj, "__iter__")


def resolve_targets(objs: tuple[Any, ...], frame: FrameType | None, serial: Iterator[int]) -> list[Target]:
    """Resolve ``trace(*objs)`` into distinct named leaves; warn about modules with nothing to trace."""
    flat = list(_flatten(objs, frame))
    namer = LeafNamer(frame, [m for m in flat if isinstance(m, nn.Module)])  # NOTE [leaf names]
    targets: list[Target] = []
    seen: set[int] = set()
    for obj in flat:
        if isinstance(obj, nn.Module):
            found = namer.parameters_of(obj)
            if not found:
                warnings.warn(
                    f"gradprobe.trace(): module {type(obj).__name__} has no parameters that require grad "
                    f"({sum(1 for _ in obj.parameters())} frozen), so nothing of it is recorded; "
                    "trace the module whose parameters train, or unfreeze them with requires_grad_()",
                    GradProbeWarning,
                    stacklevel=4,
                )
            for target in found:
                if id(target[0]) not in seen:
                    seen.add(id(target[0]))
                    targets.append(target)
            continue
        _check_leaf(obj, frame)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        targets.append(_named(obj, namer, serial))
    return targets


def _named(t: torch.Tensor, namer: LeafNamer, serial: Iterator[int]) -> Target:
    named = namer.name(t)
    if named is None:
        return (t, tensor_label(t, next(serial)), None)
    return (t, named[0], named[1])


def _check_leaf(t: torch.Tensor, frame: FrameType | None) -> None:
    name = name_in_frame(frame, t)
    label = name or f"tensor of shape {tuple(t.shape)}"
    if not t.requires_grad:
        what = f"`{name}`" if name else f"a {t.dtype} tensor of shape {tuple(t.shape)}"
        if not (t.is_floating_point() or t.is_complex()):
            raise TraceTargetError(
                f"gradprobe.trace(): {what} holds integers ({t.dtype}), which never have gradients; "
                "trace the floating-point leaves that train (e.g. the model), or leave it out of trace()"
            )
        how = f"`{name}.requires_grad_()`" if name else "`.requires_grad_()` on it where it is made"
        raise TraceTargetError(
            f"gradprobe.trace(): {what} does not require grad, so no gradient ever reaches it; "
            f"call {how} before the forward pass, or leave it out of trace()"
        )
    if not t.is_leaf:
        op = type(t.grad_fn).__name__ if t.grad_fn is not None else "an op"
        raise TraceTargetError(
            f"gradprobe.trace(): `{label}` is not a leaf tensor (made by {op}), and autograd only "
            f"accumulates .grad into leaves; trace the leaf it was computed from (a parameter or input), "
            f"or call {f'`{name}.retain_grad()`' if name else '`.retain_grad()` on it'} and read its .grad yourself"
        )


def leaves_of_graph(roots: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Every leaf tensor that the graphs of ``roots`` accumulate into (roots that are leaves included)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    fns = []
    for root in roots:
        if root.grad_fn is None:
            if root.requires_grad and id(root) not in seen:
                seen.add(id(root))
                found.append(root)
        else:
            fns.append(root.grad_fn)
    for node in iter_nodes(fns):
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor) and id(variable) not in seen:
            seen.add(id(variable))
            found.append(variable)
        for hidden in checkpoint_leaves(node) or ():  # NOTE [reentrant checkpoint leaves]
            if id(hidden) not in seen:
                seen.add(id(hidden))
                found.append(hidden)
    return found
