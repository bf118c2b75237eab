"""GP401 / GP402 ``stale_grad``: gradients summed across optimizer steps without ``zero_grad()``.

# NOTE [stale gradients]
# The ledger remembers, per leaf, which `.grad` tensor (and which `_version` of it) AccumulateGrad
# left. After each backward the detector also notes each leaf's own `_version`. At the next backward,
# a leaf whose value changed in place since (an optimizer step) while its `.grad` is still exactly
# what the last backward left has not been zeroed. When that last backward was made on the same line
# as this one (a training loop's next step), this backward adds to a stale gradient (GP401). A
# different line is not flagged: in a GAN step, the generator's loss adding to the discriminator's
# .grad after the discriminator stepped is harmless once the next D step zeroes it.
# Deliberate accumulation over micro-batches runs several backwards with no step in between and one
# step after, then zero_grad(): no leaf changes between those backwards, so nothing is flagged.
# Only backwards that accumulate count: a `torch.autograd.grad` call (a gradient penalty) writes no
# `.grad`, so it is never "the last backward" here nor the one blamed for adding to a carried `.grad`.
# `.grad` already non-zero when the trace started (and not reset before the first backward) is read
# from the breakdown at the end (GP402); its site is the backward whose part opened the leaf's first
# epoch, i.e. the first that added to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradprobe.detectors._common import ledger_facts
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord, PartStats
    from gradprobe.api.trace import Trace

__all__ = ["StaleGrad"]


def _last_accumulating(trace: Trace, parts: list[PartStats]) -> BackwardRecord | None:
    """The last record among ``parts`` that added to `.grad` (not a ``torch.autograd.grad`` call)."""
    for part in reversed(parts):
        record = trace._ledger.records.get(part.record)
        if record is not None and record.accumulates:
            return record
    return None


class StaleGrad:
    """A backward that adds to gradients left over from before an optimizer step."""

    default = True
    gradprobe_name = "stale_grad"

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}  # leaf index -> leaf._version after the last backward
        self._flagged = False

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if self._flagged or call.kind != "backward" or not self._versions:
            return
        stale = []
        for state in trace._ledger.leaves:
            tensor = state.leaf.tensor
            seen = self._versions.get(state.leaf.index)
            if tensor is None or seen is None or tensor._version == seen:
                continue
            grad = tensor.grad
            after = state.after() if state.after is not None else None
            if grad is None or grad is not after or grad._version != state.after_version:
                continue
            last = _last_accumulating(trace, state.parts)
            if last is not None and last.site == call.site:  # the same loss a step later: no zero_grad()
                stale.append(state.leaf.name)
        if stale:
            self._flagged = True  # once per trace: a training loop would repeat it every step
            shown = ", ".join(f"`{n}`" for n in stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
            trace.emit(
                Finding(
                    code="GP401",
                    kind="stale_grad",
                    severity="warning",
                    message=(
                        f"{call.name} adds to gradients left from before an optimizer step: {shown} changed in "
                        "place (optimizer.step()?) since their .grad was last accumulated, and .grad was not reset"
                    ),
                    site=call.site,
                    fix="call optimizer.zero_grad() (or model.zero_grad()) after each optimizer.step(); to "
                    "accumulate over micro-batches, step only after the last of them",
                    plugin="stale_grad",
                    data={"leaves": stale},
                )
            )

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        if record.kind != "backward":
            return
        versions = self._versions
        for state in trace._ledger.leaves:
            tensor = state.ref()
            if tensor is not None:
                versions[state.leaf.index] = tensor._version

    @hookimpl
    def gradprobe_collect_findings(self, trace: Trace) -> Iterable[Finding]:
        facts = ledger_facts(trace)
        carried = [state.leaf.name for state in trace._ledger.leaves if facts.carried.get(state.leaf.index, 0.0) != 0.0]
        if not carried:
            return []
        shown = ", ".join(f"`{n}`" for n in carried[:4]) + (f" and {len(carried) - 4} more" if len(carried) > 4 else "")
        # the backward that added to it opened the leaf's first epoch (an autograd.grad never does)
        opened = [
            state.epochs[0].record
            for state in trace._ledger.leaves
            if state.epochs and facts.carried.get(state.leaf.index, 0.0) != 0.0
        ]
        first = trace._ledger.records.get(min(opened)) if opened else None
        return [
            Finding(
                code="GP402",
                kind="stale_grad",
                severity="warning",
                message=f".grad of {shown} was already non-zero when the trace started; the first backward added to it",
                site=first.site if first else None,
                fix="call optimizer.zero_grad() before the first backward (or deliberately keep what .grad held)",
                plugin="stale_grad",
                data={"leaves": carried},
            )
        ]
