"""What ``trace(...)`` records: resolve its arguments to named leaf tensors."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradprobe.capture.checkpoint import checkpoint_leaves
from gradprobe.capture.graph import iter_nodes
from gradprobe.capture.sites import frame_locals, name_in_frame
from gradprobe.exceptions import GradProbeWarning, TraceTargetError

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["LeafNamer", "Target", "leaves_of_graph", "resolve_targets"]

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


class LeafNamer:
    """Names tensors the way the user does: module-qualified parameter names, else local variables."""

    def __init__(self, frame: FrameType | None) -> None:
        self._by_id: dict[int, tuple[str, str | None]] = {}
        if frame is None:
            return
        for var, value in frame_locals(frame).items():
            if var.startswith("_"):
                continue
            if isinstance(value, nn.Module):
                for qual, p in value.named_parameters(remove_duplicate=False):
                    self._by_id.setdefault(id(p), (f"{var}.{qual}", _module_of(f"{var}.{qual}")))
            elif isinstance(value, torch.Tensor):
                self._by_id.setdefault(id(value), (var, None))

    def name(self, t: torch.Tensor) -> tuple[str, str | None] | None:
        return self._by_id.get(id(t))

    def order(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` in module-definition order; tensors it cannot name keep their order, last."""
        rank = {key: i for i, key in enumerate(self._by_id)}
        return sorted(tensors, key=lambda t: rank.get(id(t), len(rank)))


def _module_of(qualname: str) -> str | None:
    head, _, _ = qualname.rpartition(".")
    return head or None


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
    namer: LeafNamer | None = None  # built on the first tensor target: modules name their own parameters
    modules = [m for m in flat if isinstance(m, nn.Module)]
    prefix_modules = len(modules) > 1
    targets: list[Target] = []
    seen: set[int] = set()
    for obj in flat:
        if isinstance(obj, nn.Module):
            found = [(q, p) for q, p in obj.named_parameters() if p.requires_grad]
            if not found:
                warnings.warn(
                    f"gradprobe.trace(): module {type(obj).__name__} has no parameters that require grad "
                    f"({sum(1 for _ in obj.parameters())} frozen), so nothing of it is recorded; "
                    "trace the module whose parameters train, or unfreeze them with requires_grad_()",
                    GradProbeWarning,
                    stacklevel=4,
                )
            prefix = ""
            if prefix_modules:
                label = name_in_frame(frame, obj) or type(obj).__name__
                prefix = label + "."
            for qual, p in found:
                if id(p) not in seen:
                    seen.add(id(p))
                    targets.append((p, prefix + qual, _module_of(prefix + qual)))
            continue
        _check_leaf(obj, frame)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        namer = namer or LeafNamer(frame)
        named = namer.name(obj)
        if named:
            targets.append((obj, named[0], named[1]))
        else:
            targets.append((obj, tensor_label(obj, next(serial)), None))
    return targets


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
