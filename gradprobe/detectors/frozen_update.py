"""GP803 ``frozen_update``: a frozen parameter (``requires_grad=False``) that an optimizer step still changes.

# NOTE [frozen but still moving]
# Freezing a layer with `requires_grad_(False)` stops new gradients, not the optimizer: PyTorch's
# optimizers skip a parameter only when its `.grad` is None. A frozen parameter whose `.grad` is
# still set (left from before freezing, or zeros from `zero_grad(set_to_none=False)`) keeps moving
# with weight decay, momentum and Adam's running averages. Before each step the detector notes the
# frozen parameters the optimizer holds whose `.grad` is set, with their `_version`; after the step,
# those whose `_version` changed were written by the step. Said once per trace, at the step line,
# with the parameters' names. Cost: one pass over the optimizer's parameters per step (a Python
# attribute read per parameter, 0.1-0.3 µs per parameter tensor per step), hence off by default.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.sites import frame_locals
from gradprobe.capture.steps import steps_of
from gradprobe.detectors.optimizer import held_params, optimizer_label
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace
    from gradprobe.capture.steps import StepEvent

__all__ = ["FrozenUpdate"]


def _param_names(trace: Trace, event: StepEvent, wanted: set[int]) -> dict[int, str]:
    """Names of the parameters ``wanted`` (ids): traced leaves, else the modules in the user's frame."""
    names = {}
    for state in trace._ledger.leaves:
        tensor = state.leaf.tensor
        if tensor is not None and id(tensor) in wanted:
            names[id(tensor)] = state.leaf.name
    frame = event.frame
    if frame is not None and len(names) < len(wanted):
        for var, value in frame_locals(frame).items():
            if isinstance(value, torch.nn.Module):
                for pname, p in value.named_parameters():
                    if id(p) in wanted and id(p) not in names:
                        names[id(p)] = f"{var}.{pname}"
    return names


class FrozenUpdate:
    """Frozen parameters whose `.grad` is still set, so the optimizer keeps changing them."""

    default = False
    gradprobe_name = "frozen_update"

    def __init__(self) -> None:
        self._watched: list[tuple[Any, int]] = []  # (weakref to a frozen parameter with .grad, its _version)
        self._done = False

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        steps = steps_of(trace)
        steps.before_step(self.gradprobe_name, self._before)
        steps.after_step(self.gradprobe_name, self._after)

    def _before(self, trace: Trace, event: StepEvent) -> None:
        if self._done:
            return
        self._watched = [
            (weakref.ref(p), p._version)
            for p in held_params(event.optimizer)
            if not p.requires_grad and p.grad is not None
        ]

    def _after(self, trace: Trace, event: StepEvent) -> None:
        watched, self._watched = self._watched, []
        if self._done or not watched:
            return
        moved = [p for ref, version in watched if (p := ref()) is not None and p._version != version]
        if not moved:
            return
        self._done = True
        names = _param_names(trace, event, {id(p) for p in moved})
        shown = [names.get(id(p), f"a {tuple(p.shape)} parameter") for p in moved]
        text = ", ".join(f"`{n}`" for n in shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")
        label, built = optimizer_label(event)
        related = [RelatedSite(built.filename, built.lineno, "built the optimizer")] if built is not None else []
        trace.emit(Finding(
            code="GP803",
            kind="frozen_update",
            severity="warning",
            message=(
                f"{label} changed {len(moved)} frozen parameter(s) (requires_grad=False): {text}; their "
                "`.grad` is still set (from before freezing, or zeros from zero_grad(set_to_none=False)), so weight "
                "decay and momentum keep moving them"
            ),
            site=event.site,
            related=tuple(related),
            fix=(
                "set `p.grad = None` for each parameter you freeze (or call `optimizer.zero_grad(set_to_none=True)`), "
                "or build the optimizer only from the parameters that train"
            ),
            plugin="frozen_update",
            data={"leaves": shown},
        ))
