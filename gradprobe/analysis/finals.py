"""What each leaf's ``.grad`` holds when the trace ends: a device-side snapshot, read back later.

Place in the flow: analysis. The trace takes the snapshot once at exit (or on demand mid-trace);
:func:`~gradprobe.analysis.breakdown.compute_breakdown` checks the ledger's parts against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradprobe.ledger import stats

if TYPE_CHECKING:
    from gradprobe.ledger.ledger import Ledger, LeafState, PartStats, Reduced
    from gradprobe.ledger.records import StatRef

__all__ = ["FinalGrad", "last_epoch_parts", "snapshot_final"]


@dataclass(eq=False)
class FinalGrad:
    """Device-side snapshot of a leaf's `.grad` when the trace ended (or when asked, mid-trace)."""

    present: bool
    norm: StatRef | None  # a 0-d tensor or a batch row (ledger/records.py), for `read_floats`
    continuous: bool  # .grad is exactly what AccumulateGrad left after the last recorded part
    dots: dict[int, torch.Tensor]  # keep="tensors": <part or carried-in, G>, keyed by part position (-1)
    bitwise: bool | None  # keep="tensors": carried-in + parts, summed in order, torch.equal .grad
    freed: bool = False  # the leaf itself was garbage collected before the snapshot
    reduced: Reduced | None = None  # DDP: .grad is the all-reduce's average; the parts sum to reduced.local


def snapshot_final(ledger: Ledger) -> list[FinalGrad]:
    """Snapshot every leaf's current `.grad` on its device (no read-back).

    The norms are taken in batches per (device, dtype) (:func:`~gradprobe.ledger.stats.two_norms`);
    a `.grad` that is still exactly the one part it was measured from reuses that part's norm.
    """
    ledger.flush()
    finals = []
    batch: dict[tuple[torch.device, torch.dtype], list[tuple[FinalGrad, torch.Tensor]]] = {}
    with torch.no_grad():
        for state in ledger.leaves:
            final, grad = _snapshot_leaf(ledger, state)
            finals.append(final)
            if grad is not None:
                batch.setdefault((grad.device, grad.dtype), []).append((final, grad))
        for (_, dtype), items in batch.items():
            for (final, _), norm in zip(items, stats.two_norms([grad for _, grad in items], dtype)):
                final.norm = norm
    return finals


def last_epoch_parts(state: LeafState) -> list[tuple[int, PartStats]]:
    epoch = state.epoch
    return [(i, p) for i, p in enumerate(state.parts) if p.epoch == epoch and epoch >= 0 and _accumulating(p)]


def _accumulating(part: PartStats) -> bool:
    return part.accumulated


def _snapshot_leaf(ledger: Ledger, state: LeafState) -> tuple[FinalGrad, torch.Tensor | None]:
    """The leaf's FinalGrad, and its `.grad` when the norm is still to be taken in a batch."""
    tensor = state.leaf.tensor
    if tensor is None:
        return FinalGrad(False, None, False, {}, None, freed=True), None
    grad = tensor.grad
    if grad is None:
        return FinalGrad(False, None, False, {}, None), None
    after = state.after() if state.after is not None else None
    continuous = after is grad and grad._version == state.after_version
    reduced = state.reduced if state.reduced is not None and state.reduced.epoch == state.epoch else None
    if reduced is not None:  # NOTE [all-reduced .grad]: check the parts against the local .grad
        continuous = reduced.holds(grad)
    shown = grad.detach()  # the .grad the user sees (under DDP, the average): the row's ‖.grad‖
    if reduced is not None and continuous:
        if reduced.local is None:
            return _norm_later(FinalGrad(True, None, True, {}, None, reduced=reduced), shown)
        grad = reduced.local
    grad = grad.detach()
    dots: dict[int, torch.Tensor] = {}
    bitwise = None
    if ledger.keep == "tensors" and continuous:
        start = state.epochs[-1]
        total = start.tensor.clone() if start.tensor is not None else None
        if start.tensor is not None:
            dots[-1] = stats.dot(start.tensor, grad)
        for i, part in last_epoch_parts(state):
            assert part.tensor is not None
            dots[i] = stats.dot(part.tensor, grad)
            total = part.tensor.clone() if total is None else total + part.tensor
        bitwise = total is not None and torch.equal(total, grad)
    final = FinalGrad(True, None, continuous, dots, bitwise, reduced=reduced if continuous else None)
    parts = state.parts
    last = parts[-1] if parts else None
    if (
        reduced is None
        and continuous
        and last is not None
        and last.from_grad
        and last.epoch == state.epoch
        and last.accumulated
        and (len(parts) == 1 or parts[-2].epoch != last.epoch)  # the epoch's only part (epochs only grow)
    ):
        norm = last.norm_ref
        if norm is not None:
            final.norm = norm  # .grad is still exactly the part it was measured from
            return final, None
    return _norm_later(final, shown)


def _norm_later(final: FinalGrad, grad: torch.Tensor) -> tuple[FinalGrad, torch.Tensor | None]:
    """Leave ``grad`` for the batched norm, or take the norm now where _foreach_norm cannot."""
    if grad.is_sparse or grad.is_complex() or grad.layout != torch.strided:
        final.norm, _ = stats.norms(grad)
        return final, None
    return final, grad
