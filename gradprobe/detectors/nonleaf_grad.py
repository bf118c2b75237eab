"""GP201 / GP202 / GP203 ``nonleaf_grad``: ``.grad`` of a tensor that is not a leaf is None.

# NOTE [non-leaf .grad]
# The interceptor reports every `.grad` read on a non-leaf (gradprobe_grad_read). A non-leaf that
# does not retain grad always reads None (GP201). One that retains grad but still reads None after a
# backward ran had `retain_grad()` called too late, or no backward reached it (GP203; PyTorch says
# nothing). Ahead of time, at each backward, the caller's source is scanned (once per code object)
# for `NAME.grad`; a live local NAME that is a non-leaf without retain_grad is reported before the
# backward runs (GP202), and its later read is not reported again.
"""

from __future__ import annotations

import ast
import keyword
import linecache
import weakref
from typing import TYPE_CHECKING, Any

from gradprobe.capture.sites import Site, frame_locals, name_in_frame, user_frame
from gradprobe.detectors._common import TensorSet, assignment_site, op_name
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from types import CodeType, FrameType

    import torch

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.api.trace import Trace

__all__ = ["NonLeafGrad"]

_READS: weakref.WeakKeyDictionary[Any, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def _grad_reads(code: CodeType) -> dict[str, list[int]]:
    """``NAME.grad`` loads on the lines of ``code`` itself (not nested functions): name -> line numbers."""
    cached = _READS.get(code)
    if cached is not None:
        return cached
    own_lines = {line for _, _, line in code.co_lines() if line is not None}
    found: dict[str, list[int]] = {}
    source = "".join(linecache.getlines(code.co_filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "grad"
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name)
                and node.lineno in own_lines
            ):
                found.setdefault(node.value.id, []).append(node.lineno)
    _READS[code] = found
    return found


class NonLeafGrad:
    """Reading ``.grad`` of a non-leaf tensor that does not retain its gradient."""

    default = True
    gradprobe_name = "nonleaf_grad"

    def __init__(self) -> None:
        self._warned = TensorSet()  # tensors already reported ahead of time

    @hookimpl
    def gradprobe_grad_read(self, trace: Trace, tensor: torch.Tensor, site: Site | None) -> None:
        if trace._muted:
            return
        frame = user_frame(2)
        name = name_in_frame(frame, tensor) or "this tensor"
        if tensor.retains_grad:
            if tensor.grad is None and trace.records:
                trace.emit(self._late_retain(name, tensor, site))
            return
        if tensor in self._warned:
            return
        trace.emit(self._finding("GP201", trace, frame, name, tensor, site, ahead=False))

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        frame = call.frame
        if frame is None:
            return
        reads = _grad_reads(frame.f_code)
        if not reads:
            return
        for name, lines in reads.items():
            tensor = frame.f_locals.get(name)
            if (
                tensor is None
                or not hasattr(tensor, "grad_fn")
                or tensor.grad_fn is None
                or tensor.retains_grad
                or tensor in self._warned
            ):
                continue
            later = [line for line in lines if line > frame.f_lineno] or lines
            read_site = Site(frame.f_code.co_filename, later[0])
            self._warned.add(tensor)
            trace.emit(self._finding("GP202", trace, frame, name, tensor, call.site, ahead=True, read=read_site))

    def _finding(
        self,
        code: str,
        trace: Trace,
        frame: FrameType | None,
        name: str,
        tensor: torch.Tensor,
        site: Site | None,
        *,
        ahead: bool,
        read: Site | None = None,
    ) -> Finding:
        node = tensor.grad_fn
        made = assignment_site(frame, name) if name != "this tensor" else None
        how = f"made by {op_name(node)}" + (f" at {made}" if made else "")
        leaf = _source_leaf(trace, frame, node)
        related = []
        if made is not None:
            related.append(RelatedSite(made.filename, made.lineno, f"made `{name}` ({op_name(node)})"))
        if read is not None:
            related.append(RelatedSite(read.filename, read.lineno, f"reads `{name}.grad`"))
        fix = f"call `{name}.retain_grad()` before the backward" + (f" (right after line {made.lineno})" if made else "")
        expr = python_expr(leaf) if leaf and type(node).__name__ in _SAME_GRADIENT else None
        if expr and not _names_a_variable(frame, expr):  # `Sequential[0].bias`: a class, no variable
            expr = None
        if expr:  # a cast or a view: the leaf's gradient holds the same numbers (NOTE [leaf alternative])
            fix += f", or read the leaf's gradient, `{expr}.grad`"
        if ahead:
            message = (
                f"`{name}.grad` is read at {read} but `{name}` is not a leaf ({how}) and does not retain its "
                "gradient: after this backward it will still be None"
            )
        else:
            message = (
                f"`{name}.grad` read on a non-leaf tensor ({how}) that does not retain its gradient: it is None"
            )
        return Finding(
            code=code,
            kind="nonleaf_grad",
            severity="warning",
            message=message,
            site=site,
            related=tuple(related),
            fix=fix,
            plugin="nonleaf_grad",
            data={"tensor": name, "op": type(node).__name__},
        )

    def _late_retain(self, name: str, tensor: torch.Tensor, site: Site | None) -> Finding:
        return Finding(
            code="GP203",
            kind="nonleaf_grad",
            severity="warning",
            message=(
                f"`{name}.grad` is None although `{name}` retains its gradient: `retain_grad()` was called after "
                "the backward that should have filled it (PyTorch says nothing), or no backward reached it"
            ),
            site=site,
            fix=f"call `{name}.retain_grad()` before the backward, right after `{name}` is computed",
            plugin="nonleaf_grad",
            data={"tensor": name},
        )


# NOTE [leaf alternative]
# For a non-leaf made from a parameter in one op, reading the parameter's .grad instead is only the
# same quantity when that op passes gradients through unchanged: a cast (``w.half()``) or a view
# (``w.view(-1)``, ``w.t()``), where the leaf's gradient is the non-leaf's, in the leaf's dtype and
# shape. After ``y = w * 2`` it is twice as large: then only retain_grad() is suggested. The leaf is
# named as Python (``model[0].bias``, not the report's ``model.0.bias``), or not suggested at all.
_SAME_GRADIENT = frozenset(
    {
        "ToCopyBackward0",
        "CloneBackward0",
        "AliasBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    }
)


def python_expr(name: str) -> str | None:
    """A report name as Python: ``model.0.bias`` -> ``model[0].bias``; None when it is not one."""
    parts = name.split(".")
    if not parts or not parts[0].isidentifier() or keyword.iskeyword(parts[0]):
        return None
    out = parts[0]
    for part in parts[1:]:
        if part.isdigit():
            out += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            out += f".{part}"
        else:
            return None
    return out


def _names_a_variable(frame: FrameType | None, expr: str) -> bool:
    """Whether ``expr`` starts with a variable (not a class) of ``frame`` or of a frame that called it.

    A leaf no variable holds is named by its module's class (``Sequential.0.bias``, NOTE [leaf
    names]), which is no Python to suggest.
    """
    root = expr.split(".", 1)[0].split("[", 1)[0]
    while frame is not None:
        for scope in (frame_locals(frame), frame.f_globals):
            if root in scope:
                return not isinstance(scope[root], type)
        frame = frame.f_back
    return False


def _source_leaf(trace: Trace, frame: FrameType | None, node: Any) -> str | None:
    """The leaf a non-leaf was made from in one op (a cast or a view of a parameter), by name."""
    if node is None:
        return None
    for nxt, _ in node.next_functions:
        var = getattr(nxt, "variable", None)
        if var is not None:
            state = trace._by_id.get(id(var))
            if state is not None and state.leaf.tensor is var:
                return state.leaf.name
            return name_in_frame(frame, var)
    return None
