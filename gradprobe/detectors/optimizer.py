"""GP801 / GP802 ``optimizer``: the optimizer and the model disagree about which parameters train.

# NOTE [optimizer and model disagree]
# `optimizer = SGD(model.parameters())` built before the model was replaced (`model = Net()` again,
# `model.fc = nn.Linear(...)`, a `copy.deepcopy` trained instead of the original) trains nothing the
# backward reaches: the loss goes down a little (BatchNorm statistics move) and the model never learns.
# At the first step of each optimizer (its first step after a traced backward reached a parameter),
# the detector compares the parameters the optimizer holds with the traced leaves a backward gave a
# gradient: when it holds none of them and none of its own parameters has a `.grad`, its step updates
# nothing (GP801, error, at the step line, naming the line that built the optimizer when the
# optimizer is a local of that frame). At the end, traced module parameters that got a gradient
# before the last optimizer step but that no optimizer that stepped holds are listed (GP802,
# warning); not said when no optimizer stepped during the trace (a test, a gradient check), for
# gradients that came after the last step (a trace that ends before the step that would use them),
# or when GP801 already said it. Cost: one look at the
# optimizer's parameters and the ledger's leaves at each optimizer's first step, and once at the end;
# O(1) per step after that (NOTE [steps before the core knows them]).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from gradprobe.capture.sites import name_in_frame
from gradprobe.detectors._common import assignment_site
from gradprobe.capture.steps import steps_of
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.api.trace import Trace
    from gradprobe.capture.steps import StepEvent
    from gradprobe.findings import Site

__all__ = ["OptimizerMismatch", "held_params", "optimizer_label"]

_TRIES = 3  # steps an optimizer is looked at before any traced leaf got a gradient


def held_params(optimizer: Any) -> list[Any]:
    """The parameters of every group of ``optimizer``."""
    return [p for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())]


def optimizer_label(event: StepEvent) -> tuple[str, Site | None]:
    """The step as the user wrote it (```opt.step()```) and the line that built the optimizer, when a local."""
    frame = event.frame
    name = name_in_frame(frame, event.optimizer) if frame is not None else None
    if name is None:
        return f"the {type(event.optimizer).__name__} optimizer's step()", None
    return f"`{name}.step()`", assignment_site(frame, name)


def _reached(trace: Trace) -> dict[int, str]:
    """id -> name of the live traced leaves some accumulating backward gave a gradient."""
    records = trace._ledger.records
    found = {}
    for state in trace._ledger.leaves:
        tensor = state.leaf.tensor
        if tensor is not None and any(records[p.record].accumulates for p in state.parts):
            found[id(tensor)] = state.leaf.name
    return found


class OptimizerMismatch:
    """An optimizer that steps none (or only some) of the parameters the backward calls reach."""

    default = True
    gradprobe_name = "optimizer"

    def __init__(self) -> None:
        self._optimizers: dict[int, Any] = {}  # id -> weakref of the optimizers that stepped
        self._tries: dict[int, int] = {}  # id -> steps looked at while undecided
        self._decided: set[int] = set()
        self._first_site: Site | None = None
        self._built: dict[int, tuple[str, Site | None]] = {}
        self._gp801 = False
        self._records_at_step = 0  # backward calls made before the last optimizer step

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        steps_of(trace).after_step(self.gradprobe_name, self._on_step)

    def _on_step(self, trace: Trace, event: StepEvent) -> None:
        opt = event.optimizer
        key = id(opt)
        self._records_at_step = len(trace._ledger.records)
        known = self._optimizers.get(key)
        if known is not None and known() is opt and key in self._decided:
            return
        if known is None or known() is not opt:
            self._optimizers[key] = weakref.ref(opt)
            self._tries[key] = 0
            self._decided.discard(key)
            self._built[key] = optimizer_label(event)
            if self._first_site is None:
                self._first_site = event.site
        reached = _reached(trace)
        self._tries[key] += 1
        if not reached:
            if self._tries[key] >= _TRIES:
                self._decided.add(key)
            return
        self._decided.add(key)
        params = held_params(opt)
        if any(id(p) in reached for p in params) or any(p.grad is not None for p in params):
            return
        self._gp801 = True
        label, built = self._built[key]
        names = list(reached.values())
        shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        related = [RelatedSite(built.filename, built.lineno, "built the optimizer")] if built is not None else []
        trace.emit(Finding(
            code="GP801",
            kind="optimizer",
            severity="error",
            message=(
                f"{label} updates nothing: it holds {len(params)} parameter(s), none of which got a gradient, "
                f"while the traced parameters that did ({shown}) are in no group of it — it was built on another "
                "copy of the model, or on parameters replaced since"
            ),
            site=event.site,
            related=tuple(related),
            fix=(
                "build the optimizer from the model you train, after any layer is replaced or the model is re-created "
                "(`optimizer = torch.optim.SGD(model.parameters(), ...)` after `model = ...`)"
            ),
            plugin="optimizer",
            data={"leaves": names, "held": len(params)},
        ))

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        optimizers = [ref() for ref in self._optimizers.values()]
        optimizers = [o for o in optimizers if o is not None]
        if not optimizers or self._gp801:
            return []
        held = {id(p) for opt in optimizers for p in held_params(opt)}
        records = trace._ledger.records
        last = self._records_at_step
        missed = [  # gradients that were there when an optimizer stepped, and that none of them took
            state.leaf.name
            for state in trace._ledger.leaves
            if state.leaf.module is not None
            and state.leaf.tensor is not None
            and id(state.leaf.tensor) not in held
            and any(p.record < last and records[p.record].accumulates for p in state.parts)
        ]
        if not missed:
            return []
        shown = ", ".join(f"`{n}`" for n in missed[:6]) + (f" and {len(missed) - 6} more" if len(missed) > 6 else "")
        related = [
            RelatedSite(site.filename, site.lineno, f"built the optimizer of {label}")
            for label, site in self._built.values()
            if site is not None
        ]
        return [Finding(
            code="GP802",
            kind="optimizer",
            severity="warning",
            message=(
                f"{len(missed)} traced parameter(s) got gradients that no optimizer step uses: {shown} "
                "(they are in no param group of the optimizers that stepped)"
            ),
            site=self._first_site,
            related=tuple(related),
            fix=(
                "add them to the optimizer (`optimizer.add_param_group({'params': ...})`, or build it after "
                "replacing the layer); if they should stay fixed, freeze them with `requires_grad_(False)` so "
                "no gradient is computed for them"
            ),
            plugin="optimizer",
            data={"leaves": missed},
        )]
