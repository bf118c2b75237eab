"""AMP: backward calls scaled by ``torch.amp.GradScaler``, and clipping gradients that are still scaled.

# NOTE [seeing the GradScaler]
# `scaler.scale(loss)` returns `loss * scaler._scale`: the root's grad_fn is a MulBackward0 whose
# saved `other` shares storage with the scaler's `_scale` tensor. Before each backward the plugin
# looks for enabled GradScaler objects among the user frame's variables and matches them to the
# roots that way (no host read-back: `_saved_other` is read before the backward frees it). Every
# leaf the call reaches then holds a scaled `.grad` until `scaler.unscale_(opt)` (or `scaler.step`)
# runs `torch._amp_foreach_non_finite_check_and_unscale_` on it, which the interceptor reports as
# an in-place write. A write to a still-scaled `.grad` from a line calling `clip_grad*` is the
# classic mistake: the clip threshold is compared with gradients `scale` times too large (GP712).
# The report section lists each scaled call with its scale and the unscaled ‖part‖ (part / scale);
# the breakdown table above it shows the raw, scaled numbers the engine produced.

# NOTE [still-scaled reads]
# Reading a gradient between `scaler.scale(loss).backward()` and `scaler.unscale_(opt)` (logging
# `p.grad.norm()`, a histogram, a custom clip) sees values `scale` times too large (GP713). Reads of
# a leaf's `.grad` values are invisible to the trace core (it watches writes, not reads), so while
# some `.grad` is still scaled, and only then, the plugin puts a small TorchFunctionMode of its own
# on the stack (owned by the trace): it looks at the first argument of each torch call for a
# still-scaled `.grad` and passes every call on unchanged. It comes off when the last scaled
# `.grad` is unscaled (or at the next optimizer step, or the trace's end), so a correct AMP loop pays
# for it only between the backward and `unscale_`, where usually nothing runs. Calls made from inside
# torch (the scaler's own unscale, `clip_grad_norm_`, which GP712 covers) are not the user's reads.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gradprobe.capture.sites import TORCH_DIR, _is_internal, frame_locals, site_of
from gradprobe.capture.steps import steps_of
from gradprobe.exceptions import GradProbeError
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl
from gradprobe._format import number

if TYPE_CHECKING:
    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord
    from gradprobe.capture.sites import Site
    from gradprobe.api.trace import Trace

__all__ = ["AmpPlugin"]

_UNSCALE = "_amp_foreach_non_finite_check_and_unscale_"


def _scalers_in(frame: Any) -> list[Any]:
    found = []
    scopes = (frame_locals(frame), frame.f_globals) if frame is not None else ()
    for scope in scopes:
        for value in list(scope.values()):
            if isinstance(value, torch.amp.GradScaler) and value.is_enabled() and value._scale is not None:
                found.append(value)
    return found


def _scale_of(root: torch.Tensor, scalers: list[Any]) -> torch.Tensor | None:
    node = root.grad_fn
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    try:
        other = node._saved_other
    except RuntimeError:  # already freed; PyTorch will say so
        return None
    for scaler in scalers:
        if isinstance(other, torch.Tensor) and other.data_ptr() == scaler._scale.data_ptr():
            return scaler._scale.detach().clone()
    return None


_NOT_READS = frozenset({"__get__", "__set__", "__delete__"})


class _ScaledReads(TorchFunctionMode):
    """Sees torch calls on a still-scaled ``.grad`` while one exists (NOTE [still-scaled reads])."""

    def __init__(self, plugin: AmpPlugin, trace: Trace) -> None:
        super().__init__()
        self.plugin = plugin
        self.trace = weakref.ref(trace)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if args:
            first = args[0]
            plugin = self.plugin
            if isinstance(first, torch.Tensor):
                hit = plugin._still_scaled(first)
            elif isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
                hit = any(isinstance(t, torch.Tensor) and plugin._still_scaled(t) for t in first)
            else:
                hit = False
            if hit and getattr(func, "__name__", "") not in _NOT_READS:
                trace = self.trace()
                if trace is not None and trace.active:
                    with torch._C.DisableTorchFunction():
                        try:
                            plugin._read(trace, func)
                        except GradProbeError:
                            raise
                        except Exception as exc:  # gradprobe's bug: never into the user's torch call
                            plugin._scaled.clear()
                            plugin._stop_reads()
                            trace._plugins.internal_error("amp", "a still-scaled .grad read", exc)
        return func(*args, **kwargs)


def _reading_frame() -> Any:
    """The user's frame of a read, or None when torch's own code made the call (the scaler, a clip)."""
    frame = sys._getframe(2)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        filename = frame.f_code.co_filename
        if filename.startswith(TORCH_DIR) and not filename.startswith(_TORCH_PLUMBING):
            return None  # torch's own code reads it (the scaler, clip_grad_norm_, an optimizer)
        frame = frame.f_back
    return frame


_TORCH_PLUMBING = tuple(
    TORCH_DIR + name for name in ("overrides.py", "_tensor.py", "functional.py", "_ops.py", "utils" + os.sep + "_device.py")
)


class AmpPlugin:
    """Detects GradScaler-scaled backward calls; reports unscaled parts; flags clipping before unscale_."""

    gradprobe_name = "amp"

    def __init__(self) -> None:
        self.scales: dict[int, torch.Tensor] = {}  # record index -> scale (device tensor)
        self._pending: torch.Tensor | None = None
        self._scaled: dict[int, weakref.ReferenceType[torch.Tensor]] = {}  # id(.grad) -> .grad still scaled
        self._clip_sites: set[tuple[str, int]] = set()
        self._reads: Any = None  # the owned _ScaledReads handle while some .grad is still scaled
        self._read_sites: set[tuple[str, int]] = set()

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        steps_of(trace).after_step(self.gradprobe_name, self._on_step)

    def _on_step(self, trace: Trace, event: Any) -> None:
        self._scaled.clear()  # scaler.step unscaled what the optimizer holds; the rest is not a step's business
        self._stop_reads()

    def _stop_reads(self) -> None:
        handle, self._reads = self._reads, None
        if handle is not None:
            handle.remove()

    def _read(self, trace: Trace, func: Any) -> None:
        """GP713: the user read a still-scaled ``.grad`` (once per line)."""
        frame = _reading_frame()
        site = site_of(frame)
        if site is None or (site.filename, site.lineno) in self._read_sites or (site.filename, site.lineno) in self._clip_sites:
            return
        if "clip_grad" in site.source:
            return  # a clip: GP712 says it at the write
        self._read_sites.add((site.filename, site.lineno))
        scale = next(iter(self.scales.values()), None) if self.scales else None
        factor = f" (scale {number(float(self.scales[max(self.scales)]))})" if scale is not None else ""
        name = getattr(func, "__name__", "a torch function")
        trace.emit(
            Finding(
                code="GP713",
                kind="scaled_grad_read",
                severity="warning",
                message=(
                    f"`.grad` is read ({name}) while still scaled by GradScaler{factor}: norms and values read here "
                    "are `scale` times the true gradient"
                ),
                site=site,
                fix="call scaler.unscale_(optimizer) before reading or logging gradients (scaler.step(optimizer) "
                "will not unscale them twice), or divide by scaler.get_scale()",
                plugin="amp",
                data={"func": name},
            )
        )

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        self._pending = None
        if call.kind != "backward":
            return
        scalers = _scalers_in(call.frame)
        if not scalers:
            return
        for root in call.roots:
            scale = _scale_of(root, scalers)
            if scale is not None:
                self._pending = scale
                return

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        scale, self._pending = self._pending, None
        if scale is None or error is not None:
            return
        self.scales[record.index] = scale
        for state in trace._ledger.leaves:
            tensor = state.leaf.tensor
            if tensor is not None and tensor.grad is not None and state.parts and state.parts[-1].record == record.index:
                self._scaled[id(tensor.grad)] = weakref.ref(tensor.grad)
        if self._scaled and self._reads is None:
            self._reads = trace.own_context(_ScaledReads(self, trace))

    def _still_scaled(self, t: torch.Tensor) -> bool:
        ref = self._scaled.get(id(t))
        return ref is not None and ref() is t

    @hookimpl
    def gradprobe_inplace_write(self, trace: Trace, tensors: list[torch.Tensor], func: Any, site: Site | None) -> None:
        if not self._scaled:
            return
        if getattr(func, "__name__", "") == _UNSCALE:
            for t in tensors:
                self._scaled.pop(id(t), None)
            if not self._scaled:
                self._stop_reads()
            return
        if site is None or "clip_grad" not in site.source or (site.filename, site.lineno) in self._clip_sites:
            return
        scaled = [t for t in tensors if self._still_scaled(t)]
        if not scaled:
            return
        self._clip_sites.add((site.filename, site.lineno))
        names = [s.leaf.name for s in trace._ledger.leaves if s.leaf.tensor is not None and s.leaf.tensor.grad is not None and self._still_scaled(s.leaf.tensor.grad)]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        trace.emit(
            Finding(
                code="GP712",
                kind="clip_scaled_grad",
                severity="warning",
                message=(
                    f"gradients are clipped while still scaled by GradScaler ({shown}): the clip threshold "
                    "is compared with gradients `scale` times too large, so it clips almost everything"
                ),
                site=site,
                fix="call scaler.unscale_(optimizer) before clipping, then scaler.step(optimizer)",
                plugin="amp",
                data={"leaves": names},
            )
        )

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any] | None:
        if not self.scales:
            return None
        scales = {i: float(s) for i, s in self.scales.items()}  # one read-back per scaled call, at report time
        title = Text("AMP · GradScaler-scaled backward calls · unscaled ‖part‖ = ‖part‖ / scale", style="italic")
        note = Text("the breakdown table shows the raw (scaled) parts the engine produced", style="dim")
        table = Table(box=box.SIMPLE_HEAD)
        records = [r for r in trace.records if r.index in scales]
        table.add_column("leaf", style="bold")
        for r in records:
            table.add_column(f"{r.name}\nscale {number(scales[r.index])}", justify="right")
        for row in trace.breakdown():
            cells = []
            for r in records:
                part = row.part(r.index)
                cells.append("·" if part is None else number(part.norm / scales[r.index]))
            table.add_row(row.leaf.name, *cells)
        return [Group(title, table, note)]
