"""GP302 ``inplace_saved``: a backward through a tensor that was written in place after autograd saved it.

# NOTE [in-place writes, found where PyTorch would raise]
# No saved-tensor hooks: entering `saved_tensors_hooks` would replace a user's own pair
# (save_on_cpu, activation compression, allow_mutation_on_saved_tensors) and switch off PyTorch's
# version check. Instead the graph walk every traced backward does anyway (gradprobe.capture.graph.walk,
# shared with freed_graph) reads each saved slot of the nodes the engine will run, which is
# PyTorch's own check: a slot written in place since it was saved raises "modified by an inplace
# operation ... is at version N; expected version M". Such a "stale" node means the backward will
# raise, so GP302 is emitted in `gradprobe_before_backward`, before the engine starts (under
# on_finding="raise" that is a GradProbeError at the user's backward line; otherwise PyTorch's own
# error follows unchanged). Slots behind a user's unpack hook are the hook's business and skipped.
# To name the line that wrote, every in-place write the interceptor reports is remembered by the
# storage it writes to: (version before the write, site, func), a few per storage, a bounded number
# of storages. At the stale slot the saved tensor's storage and the versions in PyTorch's message
# (M expected, N now) pick the first write with M <= version-before < N. Nothing is said at the
# write itself: many writes to saved tensors are harmless (the graph is never backwarded, or only
# after the tensor is saved again), and PyTorch's own immediate errors at the write pass untouched.
# A write through `.data` moves no version counter; without saved-tensor hooks it cannot be seen
# (the former GP303 is retired), and PyTorch silently uses the new values as it always did.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, Callable

import torch

from gradprobe.capture.graph import Stale, sequence_nr, walk
from gradprobe.capture.steps import steps_of
from gradprobe.detectors._common import call_text, node_owner, op_name, tensors_in_frame
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.capture.sites import Site
    from gradprobe.api.trace import Trace

__all__ = ["InplaceSaved"]

_OPTIMIZER_OPS = frozenset({"add_", "addcdiv_", "addcmul_", "lerp_", "mul_", "sub_", "copy_", "div_", "sqrt_"})
_VERSIONS = re.compile(r"is at version (\d+); expected version (\d+)")
_AUGMENTED_LINE = re.compile(r"^([A-Za-z_][\w.]*)\s*(\*\*|//|<<|>>|[-+*/@%&|^])=(?!=)\s*(.+)$")
_MAX_STORAGES = 4096  # storages remembered (oldest forgotten first)
_PER_STORAGE = 8  # writes remembered per storage (oldest forgotten first)
_AUGMENTED = {
    "__iadd__": "+", "__isub__": "-", "__imul__": "*", "__itruediv__": "/", "__ifloordiv__": "//",
    "__imod__": "%", "__ipow__": "**", "__iand__": "&", "__ior__": "|", "__ixor__": "^",
    "__ilshift__": "<<", "__irshift__": ">>", "__imatmul__": "@",
}


class InplaceSaved:
    """Predicts PyTorch's "modified by an inplace operation" at the backward, naming the line that wrote."""

    default = True  # one read per saved slot in the walk freed_graph does anyway, and a dict entry per write
    gradprobe_name = "inplace_saved"

    def __init__(self) -> None:
        # storage address -> [(version before the write, site, func, optimizer step?, training step)]
        self._writes: dict[int, list[tuple[int, Site | None, Callable[..., Any], bool, int]]] = {}

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        steps_of(trace).on_end(self.gradprobe_name, self._forget_old)

    def _forget_old(self, trace: Trace, event: Any) -> None:
        """A long run: writes older than the last two steps explain no graph a step still holds."""
        step = trace.current_step
        if step % 16 or not self._writes:
            return
        self._writes = {
            key: kept for key, known in self._writes.items() if (kept := [w for w in known if w[4] >= step - 2])
        }

    @hookimpl
    def gradprobe_inplace_write(
        self, trace: Trace, tensors: Iterable[torch.Tensor], func: Callable[..., Any], site: Site | None
    ) -> None:
        writes = self._writes
        step = trace.current_step
        for tensor in tensors:
            try:
                key = tensor.untyped_storage().data_ptr()
                entry = (tensor._version, site, func, tensor.is_leaf and tensor.requires_grad, step)
            except Exception:  # sparse, nested, meta...: nothing autograd would check
                continue
            if not key:
                continue
            known = writes.get(key)
            if known is None:
                if len(writes) >= _MAX_STORAGES:
                    del writes[next(iter(writes))]
                writes[key] = [entry]
            else:
                known.append(entry)
                if len(known) > _PER_STORAGE:
                    del known[0]

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if not any(r.grad_fn is not None for r in call.roots):
            return
        found = walk(call)
        if found.first == "stale":  # NOTE [which failing node runs first] in capture/graph.py
            trace.emit(self._finding(trace, call, max(found.stale, key=lambda st: sequence_nr(st.node))))

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        self._writes.clear()

    # -- the finding -------------------------------------------------------------------------

    def _finding(self, trace: Trace, call: BackwardCall, stale: Stale) -> Finding:
        match = _VERSIONS.search(stale.message)
        now, expected = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
        tensor = _saved_tensor(stale, now)
        write = self._write_for(tensor, expected, now)
        frame = call.frame
        locals_ = tensors_in_frame(frame)
        name = _tensor_name(trace, tensor, locals_)
        shape = f" {list(tensor.shape)}" if tensor is not None else ""
        what = f"`{name}`{shape}" if name else f"a tensor{shape}"
        node_name, created = node_owner(frame, stale.node, locals_)
        related: list[RelatedSite] = []
        if write is not None:
            _, site, func, optimizer, _ = write
            fname = _func_name(func)
            if optimizer and fname == "step":  # NOTE [writes inside an optimizer step] in capture/steps.py
                fname = getattr(func, "__qualname__", fname)  # "Adam.step"
            source = site.source if site is not None else ""
            by = f"`{source}` ({fname}) at {site}" if source else f"`{fname}`" + (f" at {site}" if site else "")
            if site is not None:
                related.append(RelatedSite(site.filename, site.lineno, f"`{fname}` wrote to it in place"))
            fix = _fix(func, name, optimizer, source)
        else:
            fname, optimizer = None, False
            by = "a write gradprobe did not see (before the trace, on another thread, or in compiled code)"
            fix = "find that write and make it out of place, or `.clone()` the tensor before it"
        if created is not None:
            related.append(RelatedSite(created.filename, created.lineno, f"created `{node_name}` ({op_name(stale.node)})"))
        versions = f" (version {expected} -> {now})" if match else ""
        message = (
            f"{call_text(call.name, call.kind)} will raise \"one of the variables needed for gradient computation has been "
            f"modified by an inplace operation\": {what}, saved for backward by {op_name(stale.node)}, was written "
            f"in place by {by}{versions}"
        )
        return Finding(
            code="GP302",
            kind="inplace_saved",
            severity="error",
            message=message,
            site=call.site,
            related=tuple(related),
            fix=fix,
            plugin="inplace_saved",
            data={"func": fname, "node": type(stale.node).__name__, "version": now, "expected": expected,
                  "optimizer": optimizer},
        )

    def _write_for(self, tensor: torch.Tensor | None, expected: int, now: int) -> Any:
        """The first remembered write that moved ``tensor`` past the version autograd saved it at."""
        if tensor is None:
            return None
        try:
            writes = self._writes.get(tensor.untyped_storage().data_ptr())
        except Exception:
            return None
        if not writes:
            return None
        return next((w for w in writes if expected <= w[0] < now), writes[-1])




def _saved_tensor(stale: Stale, now: int) -> torch.Tensor | None:
    """The saved tensor PyTorch's message is about (the raw slot's data; no unpack hook runs)."""
    found = None
    for item in stale.items:
        try:
            data = item.data
        except Exception:
            continue
        if isinstance(data, torch.Tensor):
            if data._version == now:
                return data
            found = found if found is not None else data
    return found


def _tensor_name(trace: Trace, tensor: torch.Tensor | None, locals_: dict[str, torch.Tensor]) -> str | None:
    """A tracked leaf's name (also through a view, `weight.t()`), else a local that is the tensor or aliases it."""
    if tensor is None:
        return None
    for candidate in (tensor, tensor._base):
        state = trace._by_id.get(id(candidate))
        if candidate is not None and state is not None and state.leaf.tensor is candidate:
            return state.leaf.name
    try:
        key = tensor.untyped_storage().data_ptr()
        for name, t in locals_.items():
            if t is tensor or (t.shape == tensor.shape and t.untyped_storage().data_ptr() == key):
                return name
        for state in trace._ledger.leaves:
            leaf = state.leaf.tensor
            if leaf is not None and leaf.untyped_storage().data_ptr() == key:
                return state.leaf.name
    except Exception:
        return None
    return None


def _func_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or str(func)


def _fix(func: Callable[..., Any], known: str | None, optimizer: bool, source: str = "") -> str:
    """The right change for this kind of write, as valid Python (``known`` is the written tensor's name,
    ``source`` the writing line: `z += 1` reaches the interceptor as `add_`)."""
    name = _func_name(func)
    x = known or "x"
    clone = f"or `{x} = {x}.clone()` before the write"
    if optimizer:
        return (
            "run every backward through this graph before `optimizer.step()` (or add the losses and call backward "
            "once), or run the forward again after the step"
        )
    augmented = _AUGMENTED_LINE.match(source)
    if augmented is not None and name not in ("__setitem__", "copy_"):
        target, op, value = augmented.group(1), augmented.group(2), augmented.group(3).split("#")[0].strip()
        clone = f"or `{target} = {target}.clone()` before the write"
        return (
            f"write `{target} = {target} {op} {value}` instead of `{target} {op}= {value}` (a new tensor; the saved "
            f"one stays intact), {clone}"
        )
    if name in _AUGMENTED:
        op = _AUGMENTED[name]
        return f"write `{x} = {x} {op} ...` instead of `{x} {op}= ...` (a new tensor; the saved one stays intact), {clone}"
    if name == "__setitem__":
        return (
            f"clone before the indexed assignment: `{x} = {x}.clone()`, then `{x}[...] = ...` "
            "(or build the result out of place, e.g. with `torch.where`)"
        )
    if name == "copy_":
        return f"`{x} = src.clone()` instead of `{x}.copy_(src)`"
    if name == "zero_":
        return f"`{x} = torch.zeros_like({x})` instead of `{x}.zero_()`"
    if name == "fill_":
        return f"`{x} = torch.full_like({x}, value)` instead of `{x}.fill_(value)`"
    if name.endswith("_") and not name.startswith("_"):
        base = name[:-1]
        if hasattr(torch.Tensor, base):
            also = f" (or `torch.{base}({x})`, `nn.ReLU(inplace=False)`)" if base == "relu" else ""
            return f"`{x} = {x}.{base}(...)` instead of `{x}.{name}(...)`{also}, {clone}"
        return f"`.clone()` the tensor before the write: `{x} = {x}.clone()`"
    if _has_inplace_flag(func):
        also = f", {clone}" if known else ""
        return f"pass `inplace=False` to `{name}` (e.g. `nn.ReLU(inplace=False)` for `nn.ReLU(inplace=True)`){also}"
    if not name.startswith("_"):
        return f"let `{name}` return a new tensor instead of passing a saved tensor as `out=`, {clone}"
    return f"`.clone()` the tensor before the write: `{x} = {x}.clone()`"


def _has_inplace_flag(func: Callable[..., Any]) -> bool:
    try:
        return "inplace" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
