"""What an intercepted backward / autograd.grad call asks for, read from its arguments."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from gradprobe.capture.sites import Site, expression_at, name_in_frame

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["BACKWARD_FUNCTIONS", "BackwardCall", "describe_call"]

BACKWARD_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    torch.Tensor.backward,
    torch.autograd.backward,
    torch.autograd.grad,
)
_SIGNATURES = {func: inspect.signature(func) for func in BACKWARD_FUNCTIONS}


@dataclass(frozen=True, eq=False)
class BackwardCall:
    """A backward call about to run, as plugins see it in ``gradprobe_before_backward``.

    It holds live tensors (and the user's frame, so plugins need not walk the stack again) and is
    never stored by the trace; :class:`~gradprobe.BackwardRecord` is what stays.
    """

    index: int
    kind: Literal["backward", "grad"]
    name: str
    roots: tuple[torch.Tensor, ...]
    inputs: tuple[torch.Tensor, ...] | None
    retain_graph: bool
    create_graph: bool
    site: Site | None
    func: Callable[..., Any]
    method: bool  # called as ``tensor.backward()``
    is_grads_batched: bool = False
    frame: FrameType | None = field(default=None, repr=False)  # the user's frame that made the call


def _tensors(value: Any) -> tuple[torch.Tensor, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,)
    try:
        return tuple(v for v in value if isinstance(v, torch.Tensor))
    except TypeError:  # a GradientEdge or another non-iterable
        return ()


def describe_call(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    index: int,
    site: Site | None,
    frame: FrameType | None,
    names: Callable[[torch.Tensor], str | None],
) -> BackwardCall:
    """Bind ``func``'s arguments and name the call the way the user would."""
    bound = _SIGNATURES[func].bind(*args, **kwargs)
    params = bound.arguments
    method = func is torch.Tensor.backward
    if method:
        roots = (params["self"],)
    elif func is torch.autograd.grad:
        roots = _tensors(params["outputs"]) or ()
    else:
        roots = _tensors(params["tensors"]) or ()
    kind: Literal["backward", "grad"] = "grad" if func is torch.autograd.grad else "backward"
    create_graph = bool(params.get("create_graph", False))
    retain = params.get("retain_graph")
    retain_graph = create_graph if retain is None else bool(retain)
    return BackwardCall(
        index=index,
        kind=kind,
        name=_name(roots, site, frame, names, method, kind, index),
        roots=roots,
        inputs=_tensors(params.get("inputs")),
        retain_graph=retain_graph,
        create_graph=create_graph,
        site=site,
        func=func,
        method=method,
        is_grads_batched=bool(params.get("is_grads_batched", False)),
        frame=frame,
    )


def _root_name(root: torch.Tensor, frame: FrameType | None, names: Callable[[torch.Tensor], str | None]) -> str | None:
    return names(root) or name_in_frame(frame, root)


def _name(
    roots: tuple[torch.Tensor, ...],
    site: Site | None,
    frame: FrameType | None,
    names: Callable[[torch.Tensor], str | None],
    method: bool,
    kind: str,
    index: int,
) -> str:
    if len(roots) == 1:
        given = names(roots[0])
        if given:
            return given
        expr = expression_at(site, "method" if method else "function")
        if expr and not expr.startswith("["):
            return expr
        found = name_in_frame(frame, roots[0])
        if found:
            return found
    elif roots:
        parts = [_root_name(r, frame, names) or "?" for r in roots]
        if any(p != "?" for p in parts):
            return "[" + ", ".join(parts) + "]"
    return f"{kind}#{index}"
