"""GP601 / GP602 ``nonfinite``: the first NaN/Inf in a backward: which loss, which leaf, which module.

# NOTE [finding the first NaN without syncs]
# `NonFinite` (on by default) costs nothing extra: the ledger already keeps each part's norm on the
# device, and the breakdown reads them back once at the end; the first backward call with a
# non-finite part names the loss and the leaves (GP601).
# `NonFiniteModules` (detect="all" or detect=[..., "nonfinite_modules"]) adds module attribution: a
# global module forward hook (this thread's forwards only) registers plain tensor hooks on each module's inputs and outputs (not
# register_full_backward_hook, which breaks on in-place ops after a module). Each tensor hook only
# launches one reduction (the sum of the gradient) and keeps the 0-d flag on the device with a sequence number; all
# flags are read back at once when the trace ends. The first module whose input gradient is
# non-finite while its output gradient was finite produced the NaN/Inf (GP602).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.sites import frame_locals, user_frame
from gradprobe.capture.steps import steps_of
from gradprobe.capture.transforms import functorch_active
from gradprobe.detectors._common import ledger_facts
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable


    from gradprobe.api.trace import Trace
    from gradprobe.ledger.records import BackwardRecord

__all__ = ["NonFinite", "NonFiniteModules"]


class NonFinite:
    """The first backward call that produced a NaN/Inf gradient, and in which leaves."""

    default = True
    gradprobe_name = "nonfinite"

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        facts = ledger_facts(trace)
        names = {state.leaf.index: state.leaf.name for state in trace._ledger.leaves}
        bad_by_record: dict[int, list[str]] = {}
        for leaf, parts in facts.finite.items():
            # a leaf is named once per record, however many parts it has there (a reentrant checkpoint)
            for record_index in dict.fromkeys(r for r, finite in parts if not finite):
                bad_by_record.setdefault(record_index, []).append(names[leaf])
        folded = trace._run.first_nonfinite  # an older one, in a step no longer kept in full (NOTE [window])
        found = [(folded[0], [names[i] for i in folded[1]])] if folded is not None else []
        found += [(record, bad_by_record[record.index]) for record in trace.records if record.index in bad_by_record]
        for record, bad in found[:1]:
            if bad:
                shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                return [
                    Finding(
                        code="GP601",
                        kind="nonfinite",
                        severity="error",
                        message=f"the first NaN/Inf gradient came from `{record.name}`: its gradient of {shown} is not finite",
                        site=record.site,
                        fix="check the loss for log(0), division by zero or overflow (clamp / add an epsilon); "
                        "trace(detect=\"all\") names the module that produced it",
                        plugin="nonfinite",
                        data={"record": record.index, "leaves": bad},
                        step=record.step,
                    )
                ]
        return []


class NonFiniteModules:
    """Which module's backward first turned a finite gradient into NaN/Inf (device flags, read once).

    # NOTE [module hooks leave nothing behind]
    # The module forward hook is process-wide (`register_module_forward_hook`), so it ignores
    # forwards run on other threads than the trace's (their backwards are not this trace's to
    # watch). Tensor hooks on non-leaf inputs/outputs die with their graph; a leaf input (a tensor
    # reused every step) gets one hook per trace, whose handle is kept and removed at trace end, so
    # a leaf ends with no hook left. A hook that outlives the trace (on a graph the user keeps) holds
    # the trace only weakly and does nothing once the trace ended. Every handle this plugin makes is
    # handed to the trace (`trace.own`), which removes it in its `finally` path, whatever happens.
    """

    default = False  # a tensor hook and a reduction per module input/output
    gradprobe_name = "nonfinite_modules"

    def __init__(self) -> None:
        self._live = False
        self._error: Exception | None = None  # raised inside a tensor hook, re-raised at collection
        self._thread: int | None = None
        self._names: dict[int, str] = {}
        # (record, seq, [(module, side), ...] of the watched tensor, flag); the record itself, which
        # outlives the window (NOTE [window] in analysis/run.py)
        self._flags: list[tuple[BackwardRecord, int, list[tuple[str, str]], torch.Tensor]] = []
        self._watched: dict[int, tuple[Any, list[tuple[str, str]]]] = {}  # id(tensor) -> (weakref, roles)
        self._leaves: dict[int, tuple[Any, list[tuple[str, str]]]] = {}  # the same, for leaves (whole trace)
        self._seq = itertools.count()
        self._bad: tuple[BackwardRecord | None, list[tuple[str, str]]] | None = None  # the first non-finite flag

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        frame = user_frame(2)
        if frame is not None:
            for var, value in frame_locals(frame).items():
                if isinstance(value, torch.nn.Module):
                    for qual, module in value.named_modules():
                        self._names.setdefault(id(module), f"{var}.{qual}" if qual else var)
        self._live, self._thread = True, threading.get_ident()
        trace_ref = weakref.ref(trace)

        def on_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
            trace = trace_ref()
            if trace is None or not self._live or threading.get_ident() != self._thread:
                return  # NOTE [module hooks leave nothing behind]
            if trace._muted or not torch.is_grad_enabled():
                return
            if isinstance(module, _CONTAINERS):
                return  # its inputs and outputs are its children's
            name = self._names.get(id(module)) or type(module).__name__
            with torch._C.DisableTorchFunction():  # gradprobe's own calls skip the interceptor
                self._watch_all(trace, trace_ref, name, args, output)

        with torch._C.DisableTorchFunction():
            trace.own(torch.nn.modules.module.register_module_forward_hook(on_forward))
        steps_of(trace).on_end(self.gradprobe_name, self._on_step_end)

    def _on_step_end(self, trace: Trace, event: Any) -> None:
        """A long run: read the flags back once they pile up (one transfer), so they never grow without bound."""
        if len(self._flags) >= _DRAIN_AT:
            self._drain(trace)

    def _drain(self, trace: Trace) -> None:
        """Read the flags back; keep the first non-finite one (its record, while the ledger still has it)."""
        if not self._flags:
            return
        import math

        values = [math.isfinite(v) for v in torch.stack([f[3].double() for f in self._flags]).cpu().tolist()]
        flags, self._flags = self._flags, []
        if self._bad is not None:
            return
        ordered = sorted(zip(flags, values), key=lambda fv: (fv[0][0].index, fv[0][1]))
        for (record, _, roles, _), ok in ordered:
            if not ok:
                self._bad = (record, roles)
                return

    def _watch_all(self, trace: Trace, trace_ref: Any, name: str, args: Any, output: Any) -> None:
        for side, value in (("in", args), ("out", output)):
            for tensor in _tensors(value):
                if not tensor.requires_grad:
                    continue
                # one hook per tensor: a module's output is usually the next module's input
                watched = self._leaves if tensor.is_leaf else self._watched
                entry = watched.get(id(tensor))
                if entry is not None and entry[0]() is tensor:
                    if (name, side) not in entry[1]:
                        entry[1].append((name, side))
                    continue
                roles = [(name, side)]
                watched[id(tensor)] = (weakref.ref(tensor), roles)
                handle = tensor.register_hook(_Flagger(self, trace_ref, roles))
                if tensor.is_leaf:  # a non-leaf's hook goes with its graph
                    trace.own(handle)

    def flag(self, trace: Trace, roles: list[tuple[str, str]], grad: torch.Tensor) -> None:
        """Keep a device-side finiteness flag of ``grad`` (called from a tensor hook)."""
        # the cheapest reduction: NaN/Inf anywhere makes the sum non-finite (a finite gradient
        # whose sum overflows float would be a false alarm; no realistic gradient does)
        with torch.no_grad(), torch._C.DisableTorchFunction():
            record = trace._record_for_task()
            if record is None:  # an autograd.grad nested in a backward (NOTE [nested autograd.grad])
                return
            if record.index in trace._recorder._quiet_records:  # is_grads_batched: vmapped gradients
                return
            if self._bad is not None:
                return  # the first non-finite gradient is found: it is the one reported
            flag = grad.sum()
        self._flags.append((record, next(self._seq), roles, flag))

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: Any) -> None:
        self._watched.clear()  # the next forward makes new tensors; registered hooks keep their roles

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        self._live = False
        self._watched.clear()
        self._leaves.clear()  # the hooks themselves are the trace's to remove (trace.own)

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        if self._error is not None:
            error, self._error = self._error, None
            raise error  # the plugin host turns it into GP000
        self._drain(trace)
        if self._bad is None:
            return []
        rec, roles = self._bad
        self._bad = None
        # a tensor that is some module's input: that module (its consumer) turned a finite
        # gradient into a non-finite one; only an output: the gradient came in non-finite
        module, side = next(((m, s) for m, s in roles if s == "in"), roles[-1])
        loss = f"`{rec.name}`" if rec else "a backward"
        if side == "in":
            message = (
                f"in the backward of {loss}, module `{module}` turned a finite gradient into NaN/Inf "
                "(its output's gradient is finite, its input's is not)"
            )
            fix = f"look at `{module}`'s forward for values where its derivative blows up (log/sqrt/div near 0, overflow)"
        else:
            message = (
                f"in the backward of {loss}, the gradient reaching module `{module}`'s output is already "
                "NaN/Inf: the loss itself, or an op outside any module, produced it"
            )
            fix = "check the loss computation after the model's output (log(0), division by zero, overflow)"
        return [
            Finding(
                code="GP602",
                kind="nonfinite",
                severity="error",
                message=message,
                site=rec.site if rec else None,
                fix=fix,
                plugin="nonfinite_modules",
                data={"module": module, "side": side},
                step=rec.step if rec else None,
            )
        ]


class _Flagger:
    """The tensor hook of one watched tensor; holds the trace weakly (NOTE [module hooks leave nothing behind])."""

    __slots__ = ("plugin", "trace", "roles")

    def __init__(self, plugin: NonFiniteModules, trace: Any, roles: list[tuple[str, str]]) -> None:
        self.plugin, self.trace, self.roles = plugin, trace, roles

    def __call__(self, grad: torch.Tensor | None) -> None:
        trace = self.trace()
        if grad is None or trace is None or not self.plugin._live or trace._muted:
            return
        if functorch_active():  # a gradient inside a torch.func transform: no flag
            return
        try:
            self.plugin.flag(trace, self.roles, grad)
        except Exception as exc:  # never into the user's backward: reported as GP000 when findings are collected
            self.plugin._live = False
            self.plugin._error = exc


_DRAIN_AT = 1024  # flags kept before a step end reads them back (bounded memory over a long run)
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
