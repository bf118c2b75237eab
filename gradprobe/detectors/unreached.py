"""GP501 / GP502 / GP503 / GP504 ``unreached``: losses cut from the graph, parameters no loss reaches.

# NOTE [which op cut the loss]
# A loss that does not require grad makes PyTorch raise "element 0 of tensors does not require grad
# and does not have a grad_fn", and people paper over it with `loss.requires_grad = True`, which
# makes the backward run and reach nothing. Once cut, the graph cannot say where, so the caller's
# source is read instead: the assignments of the loss and of the names they use (a few levels up),
# looking for `.item()`, `.detach()`, `.data`, a NumPy round trip or an enclosing `torch.no_grad()`.
"""

from __future__ import annotations

import ast
import linecache
import re
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.graph import walk
from gradprobe.capture.sites import Site, name_in_frame
from gradprobe.detectors._common import call_text
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import FrameType

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.api.trace import Trace

__all__ = ["Unreached"]

_CUTS = [
    (re.compile(r"\.item\(\)"), "`.item()` turns it into a Python number"),
    (re.compile(r"\.detach\(\)"), "`.detach()` cuts it from the graph"),
    (re.compile(r"\.data\b"), "`.data` cuts it from the graph"),
    (re.compile(r"\.numpy\(\)|np\.|numpy\.|torch\.from_numpy|torch\.tensor\(|torch\.as_tensor\("),
     "a NumPy / Python round trip (`.numpy()`, `torch.tensor(...)`) builds a new tensor with no graph"),
    (re.compile(r"\.tolist\(\)|float\(|int\("), "a conversion to a Python number cuts it from the graph"),
]


def _bound_names(target: ast.AST) -> list[str]:
    """Names an assignment target binds (``a``, ``a, b``), not attributes or items it sets."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _bound_names(elt)]
    return []


def _cut_cause(frame: FrameType | None, name: str | None) -> tuple[str, Site] | None:
    if frame is None or name is None:
        return None
    filename = frame.f_code.co_filename
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return None
    assigns: dict[str, list[ast.AST]] = {}
    no_grad_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in _bound_names(target):
                    if node.lineno <= frame.f_lineno:
                        assigns.setdefault(n, []).append(node)
        elif isinstance(node, ast.With):
            if any("no_grad" in ast.unparse(item.context_expr) or "inference_mode" in ast.unparse(item.context_expr)
                   for item in node.items):
                no_grad_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    todo, seen = [name], set()
    for _ in range(4):
        following = []
        for var in todo:
            if var in seen or var not in assigns:
                continue
            seen.add(var)
            node = max(assigns[var], key=lambda n: n.lineno)
            site = Site(filename, node.lineno)
            if node.lineno in no_grad_lines:
                return "it was computed under `torch.no_grad()` / `inference_mode()`", site
            source = ast.unparse(node.value) if getattr(node, "value", None) is not None else ""
            for pattern, cause in _CUTS:
                if pattern.search(source):
                    return cause, site
            following += [n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)] if node.value else []
        todo = following
    return None


_ACCUMULATE_GRAD = type(torch.empty(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])


def _forced(frame: FrameType | None, name: str | None) -> Site | None:
    """Where ``name.requires_grad = True`` (or ``name.requires_grad_()``) is set before the frame's line.

    Looked for in the frame's own function, the last such line before the one running (else the first).
    """
    if frame is None or name is None:
        return None
    pattern = re.compile(rf"\b{re.escape(name)}\.requires_grad(\s*=\s*True|_\()")
    start = frame.f_code.co_firstlineno if frame.f_code.co_name != "<module>" else 1
    hits = [
        lineno
        for lineno, line in enumerate(linecache.getlines(frame.f_code.co_filename), 1)
        if lineno >= start and pattern.search(line)
    ]
    if not hits:
        return None
    before = [n for n in hits if n <= frame.f_lineno]
    return Site(frame.f_code.co_filename, max(before) if before else hits[0])


class Unreached:
    """Losses that reach no parameter, and parameters no backward reaches."""

    default = True
    gradprobe_name = "unreached"

    def __init__(self) -> None:
        self._failed: set[int] = set()  # records whose backward raised
        self._inside_done = False  # GP505 said (once per trace)

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: Any, error: BaseException | None) -> None:
        if error is not None:
            self._failed.add(record.index)

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if call.rejected is not None:  # PyTorch refuses the arguments first (NOTE in capture/calls.py)
            return
        for root in call.roots:
            if root.grad_fn is not None:
                if call.kind == "backward" and call.inputs is None and not trace.every_leaf:
                    self._cut_inside(trace, call)
                continue
            if root.requires_grad and trace._tracked(root):
                continue  # a backward on a traced leaf itself
            frame = call.frame
            name = trace.given_name(root) or name_in_frame(frame, root)
            label = f"`{name}`" if name else call.name
            cause = _cut_cause(frame, name)
            related = [RelatedSite(cause[1].filename, cause[1].lineno, cause[0])] if cause else []
            because = f": {cause[0]} at {cause[1]}" if cause else ""
            if not root.requires_grad:
                trace.emit(Finding(
                    code="GP501",
                    kind="unreached",
                    severity="error",
                    message=(
                        f"{label} does not require grad, so its backward will raise \"element 0 of tensors does not "
                        f"require grad and does not have a grad_fn\"{because}"
                    ),
                    site=call.site,
                    related=tuple(related),
                    fix="compute the loss from tensors that keep their graph (no .item(), .detach(), .data, "
                    "NumPy, or torch.no_grad() on the way); setting `requires_grad = True` on it does not help",
                    plugin="unreached",
                ))
            else:
                forced = _forced(frame, name)
                if forced is not None:
                    related.append(RelatedSite(forced.filename, forced.lineno, "sets requires_grad on the cut loss"))
                trace.emit(Finding(
                    code="GP502",
                    kind="unreached",
                    severity="warning",
                    message=(
                        f"{label} is a leaf (no grad_fn): its backward reaches no parameter{because}; "
                        "`requires_grad = True` on a cut-off loss only hides PyTorch's error"
                    ),
                    site=call.site,
                    related=tuple(related),
                    fix="remove `requires_grad = True` and compute the loss without cutting the graph",
                    plugin="unreached",
                ))

    def _cut_inside(self, trace: Trace, call: BackwardCall) -> None:
        """GP505: the loss has a graph, but it starts at a leaf cut from the model (NOTE [a leaf cut inside]).

        # NOTE [a leaf cut inside]
        # `pred = model(x).detach(); pred.requires_grad = True; loss = F.mse_loss(pred, y)` makes a
        # loss with a grad_fn whose backward reaches `pred` and no parameter. The shared walk of the
        # call is scanned for AccumulateGrad nodes, stopping at the first traced leaf (the common
        # case, a few nodes in). Only when none is traced, no nn.Parameter is reached either (a
        # backward of another model's loss is not this mistake), and the user's source shows where a
        # reached leaf was cut (`.detach()`, `.data`, `.item()`, NumPy, `no_grad`) is it reported.
        """
        if self._inside_done:
            return
        leaves = []
        for node in walk(call).nodes:
            if type(node) is _ACCUMULATE_GRAD:
                var = node.variable
                if trace._tracked(var) or isinstance(var, torch.nn.Parameter):
                    return
                leaves.append(var)
        frame = call.frame
        for var in leaves:
            name = name_in_frame(frame, var)
            cause = _cut_cause(frame, name)
            if cause is None:
                continue
            self._inside_done = True
            related = [RelatedSite(cause[1].filename, cause[1].lineno, cause[0])]
            forced = _forced(frame, name)
            if forced is not None and forced != cause[1]:
                related.append(RelatedSite(forced.filename, forced.lineno, f"sets requires_grad on the cut `{name}`"))
            trace.emit(Finding(
                code="GP505",
                kind="unreached",
                severity="error",
                message=(
                    f"{_call_label(call)} reaches no traced parameter: its graph starts at `{name}`, a "
                    f"leaf cut from the model ({cause[0]} at {cause[1]}); the model gets no gradient from this loss"
                ),
                site=call.site,
                related=tuple(related),
                fix=f"compute the loss from the model's output itself: drop the cut at {cause[1]} (and the "
                f"`requires_grad` set on `{name}`)",
                plugin="unreached",
                data={"leaf": name},
            ))
            return

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        records = [r for r in trace.records if r.accumulates and r.index not in self._failed]
        if not records or trace.every_leaf:
            return []
        leaves = trace._ledger.leaves
        findings = []
        missed = [state.leaf.name for state in leaves if not state.parts and _wants_grad(state)]
        if all(r.inputs is not None for r in records):  # every backward chose its inputs= on purpose
            chosen = {name for r in records for name in r.inputs or ()}
            missed = [name for name in missed if name in chosen]
        if missed:
            shown = ", ".join(f"`{n}`" for n in missed[:6]) + (f" and {len(missed) - 6} more" if len(missed) > 6 else "")
            findings.append(Finding(
                code="GP503",
                kind="unreached",
                severity="warning",
                message=f"{len(missed)} traced parameter(s) got no gradient from any backward: {shown}",
                site=records[0].site,
                fix="check that these parameters are used in the forward of a loss (and not behind .detach() or "
                "torch.no_grad()); freeze them with requires_grad_(False) if they should not train",
                plugin="unreached",
                data={"leaves": missed},
            ))
        if len(trace.records) > 1:
            params = [state for state in leaves if state.parts and state.leaf.module is not None]
            reached = {state.leaf.index: {p.record for p in state.parts} for state in params}
            for record in trace.records:
                if record.index in self._failed or not any(record.index in r for r in reached.values()):
                    continue  # a failed backward, or one that reached no parameter (reported above)
                not_here = [
                    state.leaf.name for state in params if record.index not in reached[state.leaf.index]
                ]
                if not_here:
                    shown = ", ".join(f"`{n}`" for n in not_here[:6]) + ("…" if len(not_here) > 6 else "")
                    findings.append(Finding(
                        code="GP504",
                        kind="unreached",
                        severity="info",
                        message=f"`{record.name}` reaches none of {len(not_here)} parameter(s) other losses reach: {shown}",
                        site=record.site,
                        plugin="unreached",
                        data={"record": record.index, "leaves": not_here},
                    ))
        return findings




def _call_label(call: BackwardCall) -> str:
    """``loss.backward()`` as written, or "this backward" when the loss has no name (``f(x).backward()``)."""
    if call.name.startswith(f"{call.kind}#"):
        return "this backward"
    return call_text(call.name, call.kind)


def _wants_grad(state: Any) -> bool:
    tensor = state.leaf.tensor
    return tensor is None or tensor.requires_grad
