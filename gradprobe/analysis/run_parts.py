"""The parts of steps being folded, read back at once and turned into flat per-part values.

Place in the flow: analysis, under :mod:`gradprobe.analysis.run`. :func:`collect` reads the statistics
of every part of the records being folded in one transfer, telescopes each leaf's ``.grad`` within its
epochs (the norm before each part, for the cosine), and takes each part's share of its epoch's final
``.grad`` where it can be known; the aggregates then take whole tensors of these values
(NOTE [window] in analysis/run.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.analysis.breakdown import stats_shares
from gradprobe.ledger.stats import read_floats

if TYPE_CHECKING:
    from gradprobe.ledger.ledger import Ledger, LeafState

__all__ = ["Parts", "collect", "first_per_group", "tensor_shares"]


class Parts:
    """The parts of one fold, flat, read back (NOTE [window]); NaN where a value does not exist."""

    __slots__ = ("leaf", "col", "step", "record", "norm", "finite", "in_grad", "dot", "before", "cos", "share", "seg_end_sq")


def first_per_group(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ``keys`` and, for each, the position of its first occurrence."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    position = torch.arange(keys.numel())
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long).scatter_reduce_(0, inverse, position, "amin")
    return unique, first


def collect(
    ledger: Ledger,
    upto: int,
    running: dict[int, tuple[int, float]],
    closed: bool,
    steps: dict[int, int],
    column: dict[int, int],
) -> Parts | None:
    """Read back the parts of records before ``upto`` at once and derive, per part, the values the
    aggregates take: cosine with what `.grad` held, share of its epoch's final `.grad` (NOTE [window])."""
    refs: list[Any] = []
    leaf_l: list[int] = []
    rec_l: list[int] = []
    grad_l: list[bool] = []
    tickets: list[int] = []  # 3 per part: norm, absmax, dot (-1: none)
    segments: list[tuple[LeafState, int, list[int]]] = []  # (state, epoch, positions of its parts in .grad)
    kept_tensors: list[torch.Tensor | None] = []
    for state in ledger.leaves:
        for p in state.parts:
            if p.record >= upto:
                break
            norm = p.norm_ref
            if norm is None or p.record not in steps:
                continue
            refs.append(norm)
            refs.append(p.absmax_ref if p.absmax_ref is not None else norm)
            dot = p.dot_before
            tickets.append(len(refs) - 2)
            tickets.append(len(refs) - 1)
            if dot is not None:
                refs.append(dot)
                tickets.append(len(refs) - 1)
            else:
                tickets.append(-1)
            in_grad = p.accumulated or dot is not None
            leaf_l.append(state.leaf.index)
            rec_l.append(p.record)
            grad_l.append(in_grad)
            kept_tensors.append(p.tensor)
            if in_grad:
                if not segments or segments[-1][0] is not state or segments[-1][1] != p.epoch:
                    segments.append((state, p.epoch, []))
                segments[-1][2].append(len(leaf_l) - 1)
    if not leaf_l:
        return None
    # epochs' carried-in norms go in the same read-back
    carried_t: list[int] = []
    starts = [next((e for e in state.epochs if e.epoch == epoch), None) for state, epoch, _ in segments]
    for start in starts:
        if start is not None and start.norm is not None:
            refs.append(start.norm)
            carried_t.append(len(refs) - 1)
        else:
            carried_t.append(-2 if start is not None else -3)  # -2: started with .grad None; -3: start folded
    values = read_floats(refs)
    norm_l = [values[tickets[3 * i]] for i in range(len(leaf_l))]
    absmax_l = [values[tickets[3 * i + 1]] for i in range(len(leaf_l))]
    dot_l = [values[tickets[3 * i + 2]] if tickets[3 * i + 2] >= 0 else math.nan for i in range(len(leaf_l))]
    finite_l = [math.isfinite(x) and math.isfinite(y) for x, y in zip(norm_l, absmax_l)]
    n = len(leaf_l)
    before_sq = [math.nan] * n
    share_l = [math.nan] * n
    end_l = [math.nan] * n
    kept_epochs = {
        state.leaf.index: {q.epoch for q in state.parts if q.record >= upto} for state in {id(s[0]): s[0] for s in segments}.values()
    }
    # ‖.grad‖² before each part, telescoped within its segment (a leaf's parts of one epoch)
    for (state, epoch, members), start, ct in zip(segments, starts, carried_t):
        leaf = state.leaf.index
        open_epoch, sq = running.get(leaf, (-1, 0.0))
        carried = None if ct < 0 else values[ct]
        continued = open_epoch == epoch or ct == -3  # its first parts were folded before
        if open_epoch != epoch:
            sq = (carried or 0.0) ** 2
        for i in members:
            before_sq[i] = sq
            d = dot_l[i]
            sq += (0.0 if d != d else 2.0 * d) + norm_l[i] * norm_l[i]
        if epoch in kept_epochs[leaf] or (epoch == state.epoch and not closed):  # not ended: carry ‖.grad‖² on
            running[leaf] = (epoch, sq)
            continue
        running.pop(leaf, None)
        for i in members:
            end_l[i] = sq
        if continued or not all(finite_l[i] for i in members):
            continue  # shares need the whole epoch, finite
        norms = [norm_l[i] for i in members]
        if len(members) + (carried is not None) <= 2:
            dots = [None if dot_l[i] != dot_l[i] else dot_l[i] for i in members]
            shares, _, _ = stats_shares(list(range(len(members))), norms, dots, carried)
        else:
            tensors = [kept_tensors[i] for i in members]
            carried_tensor = start.tensor if start is not None else None
            if all(x is not None for x in tensors) and (carried is None or carried_tensor is not None):
                shares = tensor_shares(tensors, carried_tensor)  # type: ignore[arg-type]
            else:
                shares = {}
        for j, i in enumerate(members):
            value = shares.get(j)
            if value is not None:
                share_l[i] = value
    f64 = torch.float64
    p = Parts()
    p.leaf = torch.tensor(leaf_l, dtype=torch.long)
    p.record = torch.tensor(rec_l, dtype=torch.long)
    p.step = torch.tensor([steps[r] for r in rec_l], dtype=torch.long)
    p.col = torch.tensor([column[r] for r in rec_l], dtype=torch.long)
    p.in_grad = torch.tensor(grad_l, dtype=torch.bool)
    p.norm = torch.tensor(norm_l, dtype=f64)
    p.dot = torch.tensor(dot_l, dtype=f64)
    p.finite = torch.tensor(finite_l, dtype=torch.bool)
    p.share = torch.tensor(share_l, dtype=f64)
    p.seg_end_sq = torch.tensor(end_l, dtype=f64)
    has_dot = ~torch.isnan(p.dot)
    p.before = torch.tensor(before_sq, dtype=f64).clamp(min=0.0).sqrt()
    p.before[~has_dot] = math.nan
    usable = has_dot & p.finite & (p.before > 0) & (p.norm > 0)
    p.cos = torch.full((n,), math.nan, dtype=f64)
    p.cos[usable] = (p.dot[usable] / (p.before[usable] * p.norm[usable])).clamp(-1.0, 1.0)
    return p


def tensor_shares(parts: list[torch.Tensor], carried: torch.Tensor | None) -> dict[int, float | None]:
    """Exact projection shares of kept parts on their sum (keep="tensors")."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        dtype = torch.float64 if parts[0].dtype != torch.float64 else parts[0].dtype
        total = sum((p.to(dtype) for p in parts), carried.to(dtype) if carried is not None else torch.zeros((), dtype=dtype))
        g2 = float((total * total).sum())
        if g2 <= 0:
            return {}
        return {i: float((p.to(dtype) * total).sum()) / g2 for i, p in enumerate(parts)}
