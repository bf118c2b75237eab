"""Where splits come from besides decomposition: the parts separate backward calls added to ``.grad``.

# NOTE [per-backward Gram]
# With keep="tensors" every part is kept, so the Gram matrix of the parts in the final ``.grad`` is
# exact. In keep="stats" mode a part's hook only saw <p_j, .grad before it> (see NOTE [shares] in
# analysis/breakdown.py): that is <p_1, p_2> when ``.grad`` is exactly two parts, and nothing pins down the
# pairwise dots of three or more, nor of a part with a ``.grad`` carried in from before. Those leaves
# get no Gram matrix, and the split says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradprobe.analysis.split import LeafSplit, Split, roundoff_bound

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace

__all__ = ["per_backward_split", "read_back"]


def read_back(tensors: list[torch.Tensor | None]) -> list[list[float] | None]:
    """Read device tensors of any shape to flat float lists, one transfer per device."""
    out: list[list[float] | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_device.setdefault(t.device, []).append(i)
    for positions in by_device.values():
        flat = torch.cat([tensors[i].detach().reshape(-1).to(torch.float64) for i in positions])  # type: ignore[union-attr]
        values = flat.cpu().tolist()
        at = 0
        for i in positions:
            n = tensors[i].numel()  # type: ignore[union-attr]
            out[i] = values[at : at + n]
            at += n
    return out


def _gram(tensors: list[torch.Tensor]) -> tuple[tuple[float, ...], ...]:
    flat = torch.stack([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    return tuple(tuple(row) for row in (flat @ flat.T).cpu().tolist())


def per_backward_split(trace: Trace) -> Split | None:
    """The final ``.grad`` split into the parts of the backward calls that fed it (None if < 2 did)."""
    if sum(1 for r in trace.records if r.accumulates) < 2:
        return None
    rows = trace.breakdown()
    order = sorted({p.record for row in rows for p in row.parts if p.in_grad})
    if len(order) < 2:
        return None
    col = {r: i for i, r in enumerate(order)}
    k = len(order)
    leaves = []
    unknown = carried = 0
    scale = max(
        (p.absmax for row in rows for p in row.parts if p.in_grad and p.absmax == p.absmax and p.finite), default=0.0
    )
    for row in rows:
        parts = [p for p in row.parts if p.in_grad]
        if not parts:
            continue
        reached = tuple(any(col[p.record] == i for p in parts) for i in range(k))
        gram = None
        kept = None
        if row.carried_in is not None:
            carried += 1
        elif trace.keep == "tensors" and all(p.tensor is not None for p in parts):
            full = [torch.zeros_like(parts[0].tensor) for _ in range(k)]  # type: ignore[arg-type]
            for p in parts:
                full[col[p.record]] = p.tensor  # type: ignore[assignment]
            gram = _gram(full)
            kept = tuple(full)
        elif len(parts) <= 2 and all(p.finite for p in parts):
            g = [[0.0] * k for _ in range(k)]
            for p in parts:
                g[col[p.record]][col[p.record]] = p.norm**2
            if len(parts) == 2:
                cos = parts[1].cos_before
                dot = 0.0 if cos is None else cos * parts[0].norm * parts[1].norm
                i, j = col[parts[0].record], col[parts[1].record]
                g[i][j] = g[j][i] = dot
            gram = tuple(tuple(r) for r in g)
        else:
            unknown += 1
        bound = roundoff_bound(row.leaf.numel, row.leaf.dtype, scale)
        leaves.append(LeafSplit(row.leaf, gram, reached, parts=kept, verified=row.check, roundoff=(bound,) * k))
    notes = []
    if unknown:
        notes.append(
            f"{unknown} lea{'ves' if unknown != 1 else 'f'}: .grad holds 3+ parts, whose pairwise cosines keep='stats' "
            "cannot know; use trace(keep='tensors') or one backward with decompose=True"
        )
    if carried:
        notes.append(f"{carried} lea{'ves' if carried != 1 else 'f'}: .grad also holds a value carried in from before; not split")
    records = trace._ledger.records
    names = [records[r].name for r in order]
    dupes = {n for n in names if names.count(n) > 1}
    names = [f"{n}#{r}" if n in dupes else n for n, r in zip(names, order)]
    return Split(
        title="final .grad",
        kind="per-backward",
        record=None,
        site=records[order[-1]].site,
        losses=tuple(names),
        weights=None,
        leaves=tuple(leaves),
        strategy=f"parts of {k} backward calls (keep={trace.keep})",
        notes=tuple(notes),
    )
