"""GP601 / GP602 ``nonfinite``: the first NaN/Inf in a backward: which loss, which leaf, which module.

# NOTE [finding the first NaN without syncs]
# `NonFinite` (on by default) costs nothing extra: the ledger already keeps each part's norm on the
# device, and the breakdown reads them back once at the end; the first backward call with a
# non-finite part names the loss and the leaves (GP601).
# `NonFiniteModules` (detect="all" or detect=[..., "nonfinite_modules"]) adds module attribution: a
# global module forward hook registers plain tensor hooks on each module's inputs and outputs (not
# register_full_backward_hook, which breaks on in-place ops after a module). Each tensor hook only
# launches `isfinite(grad).all()` and keeps the 0-d flag on the device with a sequence number; all
# flags are read back at once when the trace ends. The first module whose input gradient is
# non-finite while its output gradient was finite produced the NaN/Inf (GP602).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch

from gradprobe._sites import user_frame
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.utils.hooks import RemovableHandle

    from gradprobe._trace import Trace

__all__ = ["NonFinite", "NonFiniteModules"]


class NonFinite:
    """The first backward call that produced a NaN/Inf gradient, and in which leaves."""

    default = True
    gradprobe_name = "nonfinite"

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        rows = trace.breakdown()
        for record in trace.records:
            bad = [row.leaf.name for row in rows if (p := row.part(record.index)) is not None and not p.finite]
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
                    )
                ]
        return []


class NonFiniteModules:
    """Which module's backward first turned a finite gradient into NaN/Inf (device flags, read once)."""

    default = False  # a tensor hook and a reduction per module input/output
    gradprobe_name = "nonfinite_modules"

    def __init__(self) -> None:
        self._handle: RemovableHandle | None = None
        self._names: dict[int, str] = {}
        # (record, seq, module, side, id of the watched tensor, flag)
        self._flags: list[tuple[int, int, str, str, int, torch.Tensor]] = []
        self._seq = itertools.count()

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        frame = user_frame(2)
        if frame is not None:
            for var, value in list(frame.f_locals.items()):
                if isinstance(value, torch.nn.Module):
                    for qual, module in value.named_modules():
                        self._names.setdefault(id(module), f"{var}.{qual}" if qual else var)

        def on_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
            if trace._muted or not torch.is_grad_enabled():
                return
            name = self._names.get(id(module)) or type(module).__name__
            for side, value in (("in", args), ("out", output)):
                for tensor in _tensors(value):
                    if tensor.requires_grad:
                        tensor.register_hook(self._watch(trace, name, side, id(tensor)))

        self._handle = torch.nn.modules.module.register_module_forward_hook(on_forward)

    def _watch(self, trace: Trace, module: str, side: str, key: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if trace._muted:
                return
            with torch.no_grad():
                flag = torch.isfinite(grad).all()
            self._flags.append((trace._record_for_task().index, next(self._seq), module, side, key, flag))

        return hook

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        if not self._flags:
            return []
        values = torch.stack([f[5].to("cpu") for f in self._flags]).tolist()
        flags, self._flags = self._flags, []
        ordered = sorted(zip(flags, values), key=lambda fv: (fv[0][0], fv[0][1]))
        for (record, _, module, side, key, _), ok in ordered:
            if ok:
                continue
            # the same tensor is one module's output and the next one's input: the consumer produced it
            consumer = next((f[2] for f, _ in ordered if f[0] == record and f[4] == key and f[3] == "in"), None)
            if side == "out" and consumer is not None:
                module, side = consumer, "in"
            rec = trace.records[record] if record < len(trace.records) else None
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
                )
            ]
        return []


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
