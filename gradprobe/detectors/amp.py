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
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gradprobe.capture.sites import frame_locals
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


class AmpPlugin:
    """Detects GradScaler-scaled backward calls; reports unscaled parts; flags clipping before unscale_."""

    gradprobe_name = "amp"

    def __init__(self) -> None:
        self.scales: dict[int, torch.Tensor] = {}  # record index -> scale (device tensor)
        self._pending: torch.Tensor | None = None
        self._scaled: dict[int, weakref.ReferenceType[torch.Tensor]] = {}  # id(.grad) -> .grad still scaled
        self._clip_sites: set[tuple[str, int]] = set()

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
