"""What a decomposed backward leaves: its pending state, and the Split, cost text and conflicts made from it.

Place in the flow: analysis. The ``decompose`` plugin (``decompose_plugin.py``) fills a
:class:`Pending` per decomposed backward from its hooks; this module reads the numbers back and turns
it into a :class:`~gradprobe.Split`, the cost in words, and GP400 conflict findings.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.analysis.decompose import LeafReduction, derived_gram
from gradprobe.analysis.split import FLOOR, RTOL, LeafSplit, Split, roundoff_bound
from gradprobe.analysis.split_sources import read_back
from gradprobe.findings import Finding

if TYPE_CHECKING:
    from gradprobe.api.trace import Trace

__all__ = ["Pending", "conflict_findings", "cost_text", "to_split"]


class Pending:
    """One decomposed backward between its before- and after-backward hooks (holds live tensors)."""

    def __init__(
        self, record: int, names: list[str], weights: list[list[torch.Tensor]], strategy: str, notes: list[str]
    ) -> None:
        self.record = record
        self.names = names
        self.weights = weights
        self.strategy = strategy
        self.notes = notes
        self.derived: int | None = None
        self.entries: list[LeafReduction] = []
        self.handles: list[Any] = []
        self.facts: Any = None
        self.first = False  # the process's first decomposed backward of this graph
        self.passes_s = 0.0  # gradprobe's extra passes (before the backward)
        self.reduce_s = 0.0  # gradprobe's reductions inside the backward's hooks
        self.started = 0.0  # when the user's backward started
        self.backward_s: float | None = None  # the user's backward, less the reductions
        self.device: torch.device | None = None


def _weight_text(values: list[list[float] | None]) -> str:
    distinct = sorted({round(v[0], 6) for v in values if v})
    return "/".join(f"{v:g}" for v in distinct) or "?"


def to_split(trace: Trace, entry: Pending) -> Split:
    tensors: list[torch.Tensor | None] = []
    for red in entry.entries:
        tensors += [red.gram, red.error, red.total_absmax]
    for ws in entry.weights:
        tensors += ws
    values = read_back(tensors)
    flat_w = iter(values[3 * len(entry.entries) :])
    weights = [_weight_text([next(flat_w) for _ in ws]) for ws in entry.weights]
    absmaxes = [values[3 * i + 2] for i in range(len(entry.entries))]
    model_max = max((a[0] for a in absmaxes if a is not None and math.isfinite(a[0])), default=0.0)
    leaves = []
    k = len(entry.names)
    for i, red in enumerate(entry.entries):
        gram_v, err_v, absmax_v = values[3 * i : 3 * i + 3]
        if gram_v is None:
            gram = None
        elif red.derived is not None:
            c = k  # the Gram of [k-1 computed parts; the backward's gradient]
            gram = derived_gram([list(gram_v[r * c : (r + 1) * c]) for r in range(c)], red.derived)
        else:
            gram = tuple(tuple(gram_v[r * k : (r + 1) * k]) for r in range(k))
        error = err_v[0] if err_v is not None else None
        tol = None
        if error is not None and absmax_v is not None:
            tol = RTOL * max(absmax_v[0], FLOOR * model_max)
            error = error if math.isfinite(error) else float("inf")
        leaf = red.state.leaf
        bound = roundoff_bound(leaf.numel, leaf.dtype, model_max)
        extra = 0.0
        if red.derived is not None and gram is not None:
            # round-off of total - sum(computed): eps * k * (|total| + sum |computed_i|), by the triangle inequality
            norms = [math.sqrt(max(gram[j][j], 0.0)) for j in range(k) if j != entry.derived]
            extra = torch.finfo(leaf.dtype).eps * k * (math.sqrt(max(sum(map(sum, gram)), 0.0)) + sum(norms))
        roundoff = tuple(bound + (extra if j == red.derived else 0.0) for j in range(k))
        parts = tuple(red.parts.unbind(0)) if red.parts is not None else None
        leaves.append(
            LeafSplit(leaf, gram, red.reached, error, tol, parts, roundoff=roundoff, derived=red.derived is not None)
        )
    record = trace._ledger.records[entry.record]
    notes = list(entry.notes)
    derived = entry.names[entry.derived] if entry.derived is not None else None
    if derived == "(rest)":
        notes.append("(rest): terms of the root outside the named losses = the backward's gradient minus the parts")
    elif derived is not None:
        notes.append(
            f"{derived}: your backward's own gradient minus the other parts (k-1 extra passes), so the sum is "
            "not checked where it reaches; it was checked on the first decomposed backward of this model"
        )
    return Split(
        title=record.name,
        kind="decomposed",
        record=record.index,
        site=record.site,
        losses=tuple(entry.names),
        weights=tuple(weights),
        leaves=tuple(leaves),
        strategy=entry.strategy,
        notes=tuple(notes),
        derived=derived,
        cost=cost_text([entry]),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"


def cost_text(entries: list[Pending]) -> str:
    """What splitting cost next to the user's own backward, in words, over the given backwards."""
    timed = [e for e in entries if e.backward_s]
    if not timed:
        return ""
    extra = sum(e.passes_s + e.reduce_s for e in timed)
    own = sum(e.backward_s for e in timed)  # type: ignore[misc]
    steps = [str(e.record + 1) for e in timed]
    shown = ", ".join(steps[:6]) + (", …" if len(steps) > 6 else "")
    which = f"backward call{'s' * (len(steps) != 1)} {shown}"
    first = (
        "; the process's first backward of this graph also pays PyTorch's one-time set-up of its kernels, "
        "which your backward then skipped"
        if any(e.first for e in timed)
        else ""
    )
    return (
        f"split cost {extra / own:.1f}× your backward ({_ms(extra)} for gradprobe's passes and reductions, "
        f"{_ms(own)} for your backward; wall clock, measured on {which}{first})"
    )


def conflict_findings(splits: list[Split]) -> list[Finding]:
    """One ``conflict`` finding per pair of losses that pull against each other in some module.

    Decomposed backwards of one training loop are pooled: a pair is reported once, with the modules
    and the worst cosine seen, and in how many of the splits it showed.
    """
    pairs: dict[tuple[str, str, str], dict[str, Any]] = {}
    for split in splits:
        scale = max((m.largest for m in split.modules()), default=0.0)
        for module in split.modules():
            for i, j, cos in module.conflicts(scale):
                key = (split.kind, split.losses[i], split.losses[j])
                seen = pairs.setdefault(key, {"modules": {}, "splits": set(), "first": split})
                seen["splits"].add(id(split))
                seen["modules"][module.name] = min(cos, seen["modules"].get(module.name, 1.0))
    findings = []
    for (kind, a, b), seen in pairs.items():
        where = sorted(seen["modules"].items(), key=lambda x: x[1])
        total = sum(1 for s in splits if s.kind == kind and {a, b} <= set(s.losses))
        shown = ", ".join(f"{name} ({cos:+.2f})" for name, cos in where[:4])
        more = f" and {len(where) - 4} more" if len(where) > 4 else ""
        first: Split = seen["first"]
        what = f"{first.title!r}" if kind == "decomposed" else "the final .grad"
        often = f" in {len(seen['splits'])} of {total} decomposed backwards" if total > 1 else ""
        findings.append(
            Finding(
                code="GP400",
                kind="conflict",
                severity="warning",
                message=(
                    f"losses {a!r} and {b!r} pull against each other in {len(where)} module"
                    f"{'s' * (len(where) != 1)} of {what}{often}: {shown}{more} (cosine of their gradients)"
                ),
                site=first.site,
                fix=(
                    f"check the sign and weight of {a!r} / {b!r}; if both are right, the shared layers serve "
                    "competing objectives (reweight, separate heads, or a gradient-surgery method such as PCGrad)"
                ),
                plugin="decompose",
                data={"losses": [a, b], "modules": [[n, c] for n, c in where], "split": kind},
            )
        )
    return findings
