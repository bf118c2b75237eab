"""What an intercepted backward / autograd.grad call asks for, read from its arguments."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from gradprobe.capture.sites import Site, caller_outside_libraries, expression_at, library_of, name_in_frame, site_of

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
    rejected: str | None = None  # PyTorch's error for arguments it refuses before the engine runs


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
    name = _name(roots, site, frame, names, method, kind, index)
    library = library_of(site.filename) if site is not None else None
    if library:  # NOTE [library call sites] in sites.py: the user's line, said to be inside the library
        moved = site_of(caller_outside_libraries(frame))
        site = moved._replace(library=library) if moved is not None else site
    return BackwardCall(
        index=index,
        kind=kind,
        name=name,
        roots=roots,
        inputs=_tensors(params.get("inputs")),
        retain_graph=retain_graph,
        create_graph=create_graph,
        site=site,
        func=func,
        method=method,
        is_grads_batched=bool(params.get("is_grads_batched", False)),
        frame=frame,
        rejected=_rejected(
            roots,
            params.get("grad_outputs" if kind == "grad" else "gradient" if method else "grad_tensors"),
            bool(params.get("is_grads_batched", False)),
        ),
    )


# NOTE [arguments PyTorch refuses first]
# Before the engine runs, `torch.autograd.backward` / `grad` build the root gradients
# (`_make_grads`): a root that requires grad, given no gradient, must have one element ("grad can be
# implicitly created only for scalar outputs"), and a given gradient must have the root's shape. Those
# errors come before any node runs, so no prediction about the graph (a freed node, a stale saved
# tensor) may pre-empt them: `rejected` says PyTorch will refuse the call, and the graph walk then
# predicts nothing.
def _rejected(roots: tuple[torch.Tensor, ...], grads: Any, batched: bool) -> str | None:
    if isinstance(grads, torch.Tensor):
        grads = (grads,)
    given: tuple[Any, ...] = tuple(grads) if isinstance(grads, (list, tuple)) else ()
    for i, root in enumerate(roots):
        grad = given[i] if i < len(given) else None
        if isinstance(grad, torch.Tensor):
            shape = grad.shape[1:] if batched else grad.shape
            if shape != root.shape:
                return "Mismatch in shape"
            if root.dtype.is_complex != grad.dtype.is_complex:
                return "Mismatch in dtype"
        elif root.requires_grad:
            if root.numel() != 1:
                return "grad can be implicitly created only for scalar outputs"
            if not root.dtype.is_floating_point:
                return "grad can be implicitly created only for real scalar outputs"
    return None


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
