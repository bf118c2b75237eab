"""Turn the ledger's device-side statistics into per-leaf breakdown rows (one host read-back).

# NOTE [shares]
# A part's share is its projection on the final gradient G: <p, G> / <G, G>. The shares of the
# parts in `.grad` (and of what was carried in) sum to 100%. With keep="tensors" the parts are
# kept, so every share is exact. In keep="stats" mode a hook sees only the new part p_j and
# S_{j-1}, what `.grad` held before it, so it can record <p_j, S_{j-1}> but not each <p_i, p_j>.
# That pins the shares down exactly when `.grad` is the sum of at most two things (one part plus a
# carried-in value, or two parts); with three or more the split of the cross terms is unknowable
# and the share is left empty (and the report says to use keep="tensors"). The cosine of each part
# with what `.grad` already held ("cos before") is always exact: it is the conflict signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from gradprobe._format import json_float
from gradprobe.analysis.finals import last_epoch_parts
from gradprobe.ledger.stats import read_floats

if TYPE_CHECKING:
    from gradprobe.analysis.finals import FinalGrad
    from gradprobe.ledger.ledger import EpochStart, Leaf, Ledger, LeafState
    from gradprobe.ledger.records import StatRef

__all__ = ["CarriedIn", "LeafBreakdown", "Part", "compute_breakdown", "stats_shares"]


@dataclass(frozen=True)
class Part:
    """What one backward call added to one leaf."""

    record: int
    norm: float
    absmax: float
    finite: bool
    in_grad: bool  # part of the final .grad (False: reset later, or an autograd.grad call)
    share: float | None  # projection share of the final .grad, None when not in it or not knowable
    cos_before: float | None  # cosine with what .grad held just before this part was added
    tensor: torch.Tensor | None = None  # keep="tensors" only

    @property
    def zero(self) -> bool:
        """Reached by the backward, but the gradient is exactly zero everywhere."""
        return self.absmax == 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "record": self.record,
            "norm": json_float(self.norm),
            "absmax": json_float(self.absmax),
            "finite": self.finite,
            "in_grad": self.in_grad,
            "share": json_float(self.share),
            "cos_before": json_float(self.cos_before),
        }


@dataclass(frozen=True)
class CarriedIn:
    """What `.grad` held before the parts that make up the final `.grad`."""

    norm: float
    share: float | None
    reason: Literal["trace_start", "modified", "allreduce"]  # before the trace, written outside backward, DDP

    def to_dict(self) -> dict[str, object]:
        return {"norm": json_float(self.norm), "share": json_float(self.share), "reason": self.reason}


@dataclass(frozen=True)
class LeafBreakdown:
    """One leaf's final `.grad`, split into the parts each backward call added."""

    leaf: Leaf
    parts: tuple[Part, ...]
    carried_in: CarriedIn | None
    grad_norm: float | None  # the final .grad (None: .grad is None)
    grad_finite: bool | None
    check: bool | None  # the parts (+ carried in) add up to .grad; None when nothing to check
    note: str = ""
    local_norm: float | None = None  # DDP: ‖local .grad‖ before the all-reduce (the parts add up to it)
    world: int | None = None  # DDP: .grad is the average over this many ranks

    @property
    def reached(self) -> bool:
        """Whether any recorded backward call reached this leaf."""
        return bool(self.parts)

    def part(self, record: int) -> Part | None:
        """The part record ``record`` added (None if that call did not reach this leaf)."""
        for part in self.parts:
            if part.record == record:
                return part
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "leaf": self.leaf.name,
            "parts": [p.to_dict() for p in self.parts],
            "carried_in": self.carried_in.to_dict() if self.carried_in else None,
            "grad_norm": json_float(self.grad_norm),
            "grad_finite": self.grad_finite,
            "check": self.check,
            "note": self.note,
            "local_norm": json_float(self.local_norm),
            "world": self.world,
        }


class _Values:
    """Collects device tensors, reads them back once, then hands out floats by ticket."""

    def __init__(self) -> None:
        self._tensors: list[StatRef] = []
        self._floats: list[float] = []

    def ticket(self, t: StatRef | None) -> int:
        if t is None:
            return -1
        self._tensors.append(t)
        return len(self._tensors) - 1

    def read(self) -> None:
        self._floats = read_floats(self._tensors) if self._tensors else []

    def __getitem__(self, ticket: int) -> float | None:
        return None if ticket < 0 else self._floats[ticket]


def compute_breakdown(ledger: Ledger, finals: list[FinalGrad]) -> list[LeafBreakdown]:
    """Read back all statistics once and assemble one :class:`LeafBreakdown` per leaf."""
    values = _Values()
    tickets = []
    for state, final in zip(ledger.leaves, finals):
        part_t = [(values.ticket(p.norm_ref), values.ticket(p.absmax_ref), values.ticket(p.dot_before)) for p in state.parts]
        epoch_t = {e.epoch: values.ticket(e.norm) for e in state.epochs}
        final_t = values.ticket(final.norm)
        local_t = values.ticket(final.reduced.local_norm if final.reduced is not None else None)
        dots_t = {k: values.ticket(v) for k, v in final.dots.items()}
        tickets.append((part_t, epoch_t, final_t, local_t, dots_t))
    values.read()
    return [
        _assemble(ledger, state, final, values, *t) for state, final, t in zip(ledger.leaves, finals, tickets)
    ]


def _assemble(
    ledger: Ledger,
    state: LeafState,
    final: FinalGrad,
    values: _Values,
    part_t: list[tuple[int, int, int]],
    epoch_t: dict[int, int],
    final_t: int,
    local_t: int,
    dots_t: dict[int, int],
) -> LeafBreakdown:
    norms = [values[t[0]] or 0.0 for t in part_t]
    absmaxes = [values[t[1]] for t in part_t]
    dots = [values[t[2]] for t in part_t]
    grad_norm = values[final_t]
    local_norm = values[local_t]
    summed_norm = local_norm if final.reduced is not None else grad_norm  # what the parts add up to
    last = state.epoch
    in_final = {i for i, _ in last_epoch_parts(state)} if final.present and final.continuous else set()
    note = ""
    carried: CarriedIn | None = None
    start: EpochStart | None = state.epochs[-1] if last >= 0 and state.epochs else None
    carried_norm = values[epoch_t[last]] if start is not None else None

    # Norm of .grad just before each part (telescoped within its epoch), for the cosine.
    before_norm: list[float | None] = []
    running: dict[int, float] = {e.epoch: (values[epoch_t[e.epoch]] or 0.0) ** 2 for e in state.epochs}
    for part, n, d in zip(state.parts, norms, dots):
        if not part.accumulated and part.dot_before is None:
            before_norm.append(None)  # an autograd.grad part: .grad never held it
            continue
        sq = running.get(part.epoch, 0.0)
        known = d is not None and part.epoch != state.folded  # a partly folded epoch lost its first parts
        before_norm.append(math.sqrt(max(sq, 0.0)) if known else None)
        running[part.epoch] = sq + 2.0 * (d or 0.0) + n * n

    shares: dict[int, float | None] = {}
    carried_share: float | None = None
    if in_final:
        if ledger.keep == "tensors" and dots_t:
            g2 = (summed_norm or 0.0) ** 2
            if g2 > 0:
                shares = {i: (values[dots_t[i]] or 0.0) / g2 for i in in_final}
                carried_share = (values[dots_t[-1]] or 0.0) / g2 if -1 in dots_t else None
        else:
            shares, carried_share, note = stats_shares(sorted(in_final), norms, dots, carried_norm)
    if start is not None and start.norm is not None and in_final:
        carried = CarriedIn(carried_norm or 0.0, carried_share, start.reason)  # type: ignore[arg-type]

    check: bool | None = None
    if final.freed:
        note = "the tensor was freed before the trace ended, so its final .grad is unknown"
    elif not final.present:
        if state.parts:
            note = ".grad was reset to None after the last recorded part"
    elif state.folded >= 0 and state.folded == last:
        in_final = set()  # some of the epoch's parts are folded into the run's aggregates: no Σ check
        shares, carried = {}, None
        note = ".grad kept accumulating over more steps than trace(window=...) keeps in full; older parts are in the run summary"
    elif not state.parts:
        note = ".grad was set before the trace or outside any recorded backward"
    elif not final.continuous:
        check = False
        note = ".grad was modified outside backward after the last recorded part (zero_grad, clipping, p.grad.mul_)"
    else:
        check = final.bitwise if final.bitwise is not None else True
        if final.reduced is not None:
            note = (
                "DDP: parts are this rank's local gradients and add up to the local .grad before the "
                f"all-reduce; ‖.grad‖ is the average over {final.reduced.world} ranks"
            )

    parts = []
    for i, part in enumerate(state.parts):
        absmax = absmaxes[i]
        finite = absmax is not None and math.isfinite(absmax) and math.isfinite(norms[i])
        cos = None
        bn = before_norm[i]
        if bn is not None and dots[i] is not None and bn > 0 and norms[i] > 0:
            cos = max(-1.0, min(1.0, dots[i] / (bn * norms[i])))
        parts.append(
            Part(
                record=part.record,
                norm=norms[i],
                absmax=absmax if absmax is not None else float("nan"),
                finite=finite,
                in_grad=i in in_final,
                share=shares.get(i),
                cos_before=cos,
                tensor=part.tensor,
            )
        )
    grad_finite = None if grad_norm is None else math.isfinite(grad_norm)
    world = final.reduced.world if final.reduced is not None else None
    return LeafBreakdown(state.leaf, tuple(parts), carried, grad_norm, grad_finite, check, note, local_norm, world)


def stats_shares(
    in_final: list[int], norms: list[float], dots: list[float | None], carried_norm: float | None
) -> tuple[dict[int, float | None], float | None, str]:
    """Exact projection shares from stats alone, when .grad is the sum of at most two things."""
    elements = len(in_final) + (1 if carried_norm is not None else 0)
    if elements == 1:
        if carried_norm is None:
            return {in_final[0]: 1.0}, None, ""
        return {}, 1.0, ""
    if elements == 2:
        if carried_norm is not None:
            x2, (j,) = carried_norm**2, in_final
            y2, d = norms[j] ** 2, dots[j] or 0.0
            g2 = x2 + y2 + 2 * d
            if g2 <= 0:
                return {}, None, ""
            return {j: (y2 + d) / g2}, (x2 + d) / g2, ""
        i, j = in_final
        x2, y2, d = norms[i] ** 2, norms[j] ** 2, dots[j] or 0.0
        g2 = x2 + y2 + 2 * d
        if g2 <= 0:
            return {}, None, ""
        return {i: (x2 + d) / g2, j: (y2 + d) / g2}, None, ""
    return {}, None, "shares of 3+ contributions to one .grad need trace(keep='tensors')"
