"""A training run in bounded memory: old steps folded into aggregates per leaf, module and loss.

Place in the flow: analysis. The trace calls :func:`fold_window` at every step end (NOTE [steps] in
capture/steps.py); the run report and ``to_dict()`` read :meth:`RunAggregates.snapshot`, which adds the
steps still kept in full to a copy of the aggregates.

# NOTE [window]
# A trace around a training loop sees thousands of steps. The ledger keeps every part (one small
# object per leaf and backward call) for the last `window` steps only. When 2 × window steps are
# kept, the oldest `window` of them are folded: their statistics are read back in one transfer (the
# only host sync, once every `window` steps), turned into per-part values (norm, finiteness, share of
# the `.grad` of its epoch, cosine with what `.grad` held before), added to the aggregates, and the
# parts, records and epochs are forgotten. So memory is O(leaves × (2·window + losses)), whatever the
# number of steps; the aggregates hold, per (leaf, loss) and per (module, loss): how many steps the
# loss reached it, mean/max of the norm, mean/min/max of the share, how often the part conflicted
# (cosine < 0 with what `.grad` held), non-finite parts, first and last step. Per module and loss,
# and per module, a bounded series (`Series`: at most 64 buckets, neighbours merged as the run grows)
# keeps the trend for the report's sparklines and for plots.
# A "loss" is a backward call's line (its site): the same `loss.backward()` in a loop is one loss
# with a count, not thousands of columns. Calls without a known site go by name.
# An epoch (a `.grad` from reset to reset, usually one step) is folded only when it has ended:
# shares are projections on the epoch's final `.grad`, unknown before. A leaf whose `.grad` keeps
# accumulating across the window (never reset) has its old parts folded with their norms only, and
# its breakdown row says so (no Σ check: some of what `.grad` holds is no longer kept in full).

# NOTE [sampling]
# `trace(every=N)` measures the parts of every N-th step only (steps 0, N, 2N, ...): in the other
# steps the leaf hooks return at once (the record is still made, so detectors see every call). A
# `.grad` that an unmeasured step added to is carried into the next measured epoch, labelled
# "unmeasured". The run report says which steps were measured.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.analysis.breakdown import stats_shares
from gradprobe.ledger.stats import read_floats

if TYPE_CHECKING:
    from gradprobe.findings import Site
    from gradprobe.ledger.ledger import BackwardRecord, Ledger, LeafState, PartStats

__all__ = ["Agg", "LossInfo", "ModuleRun", "RunAggregates", "Series", "fold_window", "loss_key"]

SERIES_BUCKETS = 64


def loss_key(record: BackwardRecord) -> str:
    """What makes backward calls one loss in the run's aggregates: the call's name and line.

    The same ``loss.backward()`` in a loop is one loss; an unnamed call's ``backward#N`` drops its number.
    """
    name = record.name
    head, sep, tail = name.rpartition("#")
    if sep and tail.isdigit():
        name = head
    site = record.site
    return f"{name} @ {site.filename}:{site.lineno}" if site is not None else name


class Agg:
    """Running count, sum, min, max of one quantity (and the step of its first and last value)."""

    __slots__ = ("n", "total", "low", "high", "first", "last", "last_value")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.first = -1
        self.last = -1
        self.last_value = math.nan

    def add(self, step: int, value: float) -> None:
        if self.n == 0:
            self.first = step
        self.n += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.last = step
        self.last_value = value

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def copy(self) -> Agg:
        new = Agg.__new__(Agg)
        for slot in Agg.__slots__:
            setattr(new, slot, getattr(self, slot))
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.n,
            "mean": _json(self.mean),
            "min": _json(self.low) if self.n else None,
            "max": _json(self.high) if self.n else None,
            "first_step": self.first if self.n else None,
            "last_step": self.last if self.n else None,
            "last": _json(self.last_value) if self.n else None,
        }


class Series:
    """A value per step in at most ``SERIES_BUCKETS`` buckets; when full, neighbours merge (width doubles)."""

    __slots__ = ("width", "buckets")

    def __init__(self) -> None:
        self.width = 1  # steps per bucket
        self.buckets: list[list[float]] = []  # [first step, last step, sum, count, min, max]

    def add(self, step: int, value: float) -> None:
        buckets = self.buckets
        if buckets and step // self.width == int(buckets[-1][0]) // self.width:
            b = buckets[-1]
            b[1] = step
            b[2] += value
            b[3] += 1
            b[4] = min(b[4], value)
            b[5] = max(b[5], value)
            return
        if len(buckets) >= SERIES_BUCKETS:
            self.width *= 2
            merged: list[list[float]] = []
            for b in buckets:
                if merged and int(b[0]) // self.width == int(merged[-1][0]) // self.width:
                    m = merged[-1]
                    m[1] = b[1]
                    m[2] += b[2]
                    m[3] += b[3]
                    m[4] = min(m[4], b[4])
                    m[5] = max(m[5], b[5])
                else:
                    merged.append(list(b))
            self.buckets = merged
            self.add(step, value)
            return
        buckets.append([step, step, value, 1, value, value])

    def points(self) -> list[tuple[int, int, float, float, float]]:
        """``(first step, last step, mean, min, max)`` per bucket, oldest first."""
        return [(int(b[0]), int(b[1]), b[2] / b[3], b[4], b[5]) for b in self.buckets]

    def copy(self) -> Series:
        new = Series()
        new.width = self.width
        new.buckets = [list(b) for b in self.buckets]
        return new


class LossInfo:
    """One loss of the run (a backward call's line): its name, site, how many calls and steps."""

    __slots__ = ("key", "name", "site", "calls")

    def __init__(self, key: str, name: str, site: Site | None) -> None:
        self.key = key
        self.name = name
        self.site = site
        self.calls = Agg()  # one value per call (1.0): the count and the first and last step

    def copy(self) -> LossInfo:
        new = LossInfo(self.key, self.name, self.site)
        new.calls = self.calls.copy()
        return new


class LeafLoss:
    """One loss on one leaf over the run: per part norm, per step share and conflicts."""

    __slots__ = ("norm", "share", "cos", "conflicts", "nonfinite", "steps", "_step")

    def __init__(self) -> None:
        self.norm = Agg()  # per part
        self.share = Agg()  # per step: the loss's share of the step's .grad
        self.cos = Agg()  # per part with something in .grad before it: cosine with it
        self.conflicts = 0  # parts with cosine < 0
        self.nonfinite = 0  # parts with inf/NaN
        self.steps = 0  # steps the loss reached the leaf
        self._step = -1

    def copy(self) -> LeafLoss:
        new = LeafLoss()
        new.norm, new.share, new.cos = self.norm.copy(), self.share.copy(), self.cos.copy()
        new.conflicts, new.nonfinite, new.steps, new._step = self.conflicts, self.nonfinite, self.steps, self._step
        return new


class ModuleRun:
    """One module (or the whole model, ``""``) over the run: per loss share and conflict, and ‖.grad‖."""

    __slots__ = (
        "leaves", "share", "share_trend", "cos", "cos_trend", "conflict_steps", "compared_steps", "conflict_trend",
        "grad_norm", "grad_trend",
    )

    def __init__(self) -> None:
        self.leaves: set[int] = set()
        self.share: dict[str, Agg] = {}  # loss -> per step share of the module's .grad
        self.share_trend: dict[str, Series] = {}
        self.cos: dict[str, Agg] = {}  # loss -> per part cosine with what the module's .grad held
        self.cos_trend: dict[str, Series] = {}  # the same per step (for plots: mean and worst per bucket)
        self.conflict_steps = 0  # steps in which some loss's part had cosine < 0 here
        self.compared_steps = 0  # steps with a cosine to compare (two contributions or more)
        self.conflict_trend = Series()  # per compared step: 1.0 in conflict, else 0.0 (bucket mean: the rate)
        self.grad_norm = Agg()  # per step: ‖.grad‖ of the module at the end of the step's epoch
        self.grad_trend = Series()

    @property
    def conflict_rate(self) -> float | None:
        return self.conflict_steps / self.compared_steps if self.compared_steps else None

    def copy(self) -> ModuleRun:
        new = ModuleRun()
        new.leaves = set(self.leaves)
        new.share = {k: v.copy() for k, v in self.share.items()}
        new.share_trend = {k: v.copy() for k, v in self.share_trend.items()}
        new.cos = {k: v.copy() for k, v in self.cos.items()}
        new.cos_trend = {k: v.copy() for k, v in self.cos_trend.items()}
        new.conflict_trend = self.conflict_trend.copy()
        new.conflict_steps, new.compared_steps = self.conflict_steps, self.compared_steps
        new.grad_norm, new.grad_trend = self.grad_norm.copy(), self.grad_trend.copy()
        return new


class _Value:
    """One part, read back: what the aggregates take from it."""

    __slots__ = ("leaf", "record", "norm", "finite", "share", "dot", "before", "epoch_end")

    def __init__(self, leaf: int, record: int, norm: float, finite: bool) -> None:
        self.leaf = leaf
        self.record = record
        self.norm = norm
        self.finite = finite
        self.share: float | None = None
        self.dot: float | None = None  # <part, .grad before it>
        self.before: float | None = None  # ‖.grad before it‖
        self.epoch_end: float | None = None  # ‖.grad‖ at the end of the part's epoch (when ended)


class RunAggregates:
    """What the trace knows of the steps it no longer keeps in full (NOTE [window])."""

    def __init__(self) -> None:
        self.losses: dict[str, LossInfo] = {}
        self.leaf_losses: dict[tuple[int, str], LeafLoss] = {}
        self.modules: dict[str, ModuleRun] = {}
        self.folded_steps = 0  # steps folded so far (0 .. folded_steps - 1)
        self.records = 0  # backward calls folded
        self._running: dict[int, tuple[int, float]] = {}  # leaf -> (open epoch, ‖.grad‖² so far)

    def copy(self) -> RunAggregates:
        new = RunAggregates()
        new.losses = {k: v.copy() for k, v in self.losses.items()}
        new.leaf_losses = {k: v.copy() for k, v in self.leaf_losses.items()}
        new.modules = {k: v.copy() for k, v in self.modules.items()}
        new.folded_steps, new.records = self.folded_steps, self.records
        new._running = dict(self._running)
        return new

    # -- adding steps --------------------------------------------------------------------------

    def add(self, ledger: Ledger, upto: int, closed: bool = False) -> None:
        """Add the parts of records before ``upto`` (those not added yet) to the aggregates.

        ``closed``: the epoch each leaf's `.grad` is in now counts as ended (a snapshot of the run so far).
        """
        modules = {s.leaf.index: s.leaf.module for s in ledger.leaves}
        records = {r.index: r for r in ledger.records if r.index < upto}
        for record in records.values():
            key = loss_key(record)
            info = self.losses.get(key)
            if info is None:
                info = self.losses[key] = LossInfo(key, record.name, record.site)
            info.calls.add(record.step, 1.0)
        self.records += len(records)
        values = _read_values(ledger, upto, self._running, closed)
        self._add_values(values, records, modules)

    def _add_values(
        self, values: list[_Value], records: dict[int, BackwardRecord], modules: dict[int, str | None]
    ) -> None:
        # per (step, module, loss): share numerator, ‖.grad‖² weights; per (step, module, record): dots
        share_num: dict[tuple[int, str, str], float] = {}
        share_ok: dict[tuple[int, str, str], bool] = {}
        ends: dict[tuple[int, str], dict[int, float]] = {}  # (step, module) -> leaf -> ‖.grad‖² at epoch end
        dots: dict[tuple[int, str, int], list[float]] = {}  # (step, module, record) -> [dot, before², part²]
        for v in values:
            record = records.get(v.record)
            if record is None:
                continue
            step, loss = record.step, loss_key(record)
            agg = self.leaf_losses.get((v.leaf, loss))
            if agg is None:
                agg = self.leaf_losses[(v.leaf, loss)] = LeafLoss()
            if agg._step != step:
                agg._step = step
                agg.steps += 1
            agg.norm.add(step, v.norm)
            if not v.finite:
                agg.nonfinite += 1
            cos = None
            if v.dot is not None and v.before and v.norm > 0 and v.finite:
                cos = max(-1.0, min(1.0, v.dot / (v.before * v.norm)))
                agg.cos.add(step, cos)
                agg.conflicts += cos < 0
            owner = modules.get(v.leaf)
            for module in ("", owner) if owner else ("",):
                run = self.modules.get(module)
                if run is None:
                    run = self.modules[module] = ModuleRun()
                run.leaves.add(v.leaf)
                sk = (step, module, loss)
                if v.epoch_end is not None:
                    ends.setdefault((step, module), {})[v.leaf] = v.epoch_end**2
                if v.share is not None and v.epoch_end is not None:
                    share_num[sk] = share_num.get(sk, 0.0) + v.share * v.epoch_end**2
                    share_ok.setdefault(sk, True)
                else:
                    share_ok[sk] = False
                if v.dot is not None and v.before is not None and v.finite:
                    d = dots.setdefault((step, module, v.record), [0.0, 0.0, 0.0])
                    d[0] += v.dot
                    d[1] += v.before**2
                    d[2] += v.norm**2
        # per leaf and loss: the share of each step (parts of one loss in one step add up)
        leaf_share: dict[tuple[int, str, int], float | None] = {}
        for v in values:
            record = records.get(v.record)
            if record is None:
                continue
            k = (v.leaf, loss_key(record), record.step)
            if v.share is None or k in leaf_share and leaf_share[k] is None:
                leaf_share[k] = None
            else:
                leaf_share[k] = (leaf_share.get(k) or 0.0) + v.share
        for (leaf, loss, step), value in sorted(leaf_share.items(), key=lambda kv: kv[0][2]):
            if value is not None:
                self.leaf_losses[(leaf, loss)].share.add(step, value)
        for (step, module, loss), ok in sorted(share_ok.items()):
            run = self.modules[module]
            total = sum(ends.get((step, module), {}).values())
            if ok and total > 0:
                value = share_num[(step, module, loss)] / total
                run.share.setdefault(loss, Agg()).add(step, value)
                run.share_trend.setdefault(loss, Series()).add(step, value)
        conflict: dict[tuple[int, str], bool] = {}
        for (step, module, index), (dot, before2, part2) in sorted(dots.items()):
            if before2 <= 0 or part2 <= 0:
                continue
            cos = max(-1.0, min(1.0, dot / math.sqrt(before2 * part2)))
            loss = loss_key(records[index])
            self.modules[module].cos.setdefault(loss, Agg()).add(step, cos)
            self.modules[module].cos_trend.setdefault(loss, Series()).add(step, cos)
            conflict[(step, module)] = conflict.get((step, module), False) or cos < 0
        for (step, module), bad in conflict.items():
            run = self.modules[module]
            run.compared_steps += 1
            run.conflict_steps += bad
            run.conflict_trend.add(step, float(bad))
        for (step, module), leaf_ends in sorted(ends.items()):
            run = self.modules[module]
            norm = math.sqrt(sum(leaf_ends.values()))
            run.grad_norm.add(step, norm)
            run.grad_trend.add(step, norm)

    def snapshot(self, ledger: Ledger) -> RunAggregates:
        """A copy with the steps still kept in full added (the run so far, for reports)."""
        new = self.copy()
        ledger.flush()
        new.add(ledger, len(ledger.records), closed=True)
        return new

    def to_dict(self, leaves: dict[int, str]) -> dict[str, Any]:
        return {
            "losses": [
                {"key": i.key, "name": i.name, "site": list(i.site) if i.site else None, "calls": i.calls.n,
                 "first_step": i.calls.first if i.calls.n else None, "last_step": i.calls.last if i.calls.n else None}
                for i in self.losses.values()
            ],
            "leaves": [
                {"leaf": leaves.get(leaf, str(leaf)), "loss": loss, "steps": a.steps, "norm": a.norm.to_dict(),
                 "share": a.share.to_dict(), "cos": a.cos.to_dict(), "conflicts": a.conflicts, "nonfinite": a.nonfinite}
                for (leaf, loss), a in self.leaf_losses.items()
            ],
            "modules": [
                {"module": name, "share": {k: v.to_dict() for k, v in run.share.items()},
                 "cos": {k: v.to_dict() for k, v in run.cos.items()},
                 "conflict_steps": run.conflict_steps, "compared_steps": run.compared_steps,
                 "grad_norm": run.grad_norm.to_dict(),
                 "share_trend": {k: v.points() for k, v in run.share_trend.items()},
                 "grad_trend": run.grad_trend.points()}
                for name, run in self.modules.items()
            ],
        }


def _json(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _read_values(ledger: Ledger, upto: int, running: dict[int, tuple[int, float]], closed: bool) -> list[_Value]:
    """The parts of records before ``upto``, read back at once, with shares per ended epoch (NOTE [window])."""
    refs: list[Any] = []

    def ticket(ref: Any) -> int:
        if ref is None:
            return -1
        refs.append(ref)
        return len(refs) - 1

    plan = []
    for state in ledger.leaves:
        parts = [p for p in state.parts if p.record < upto]
        if parts:
            part_t = [(ticket(p.norm_ref), ticket(p.absmax_ref), ticket(p.dot_before)) for p in parts]
            epoch_t = {e.epoch: ticket(e.norm) for e in state.epochs}
            plan.append((state, parts, part_t, epoch_t))
    floats = read_floats(refs) if refs else []

    def value(t: int) -> float | None:
        return None if t < 0 else floats[t]

    out: list[_Value] = []
    for state, parts, part_t, epoch_t in plan:
        leaf = state.leaf.index
        epochs = {e.epoch: e for e in state.epochs}
        kept_epochs = {p.epoch for p in state.parts if p.record >= upto}
        by_epoch: dict[int, list[tuple[PartStats, _Value]]] = {}
        for p, (nt, at, dt) in zip(parts, part_t):
            norm, absmax = value(nt), value(at)
            norm = 0.0 if norm is None else norm
            finite = absmax is not None and math.isfinite(absmax) and math.isfinite(norm)
            v = _Value(leaf, p.record, norm, finite)
            v.dot = value(dt)
            if p.accumulated or p.dot_before is not None:  # in .grad (an autograd.grad part is not)
                by_epoch.setdefault(p.epoch, []).append((p, v))
            out.append(v)
        for epoch, items in by_epoch.items():
            start = epochs.get(epoch)
            carried = value(epoch_t.get(epoch, -1)) if start is not None else None
            open_epoch, sq = running.get(leaf, (-1, 0.0))
            continued = open_epoch == epoch or start is None  # its start was folded before
            if open_epoch != epoch:
                sq = (carried or 0.0) ** 2
            for _, v in items:
                if v.dot is not None:
                    v.before = math.sqrt(max(sq, 0.0))
                sq = sq + 2.0 * (v.dot or 0.0) + v.norm * v.norm
            if epoch in kept_epochs or (epoch == state.epoch and not closed):  # not ended: carry its ‖.grad‖² on
                running[leaf] = (epoch, sq)
                continue
            running.pop(leaf, None)
            end = math.sqrt(max(sq, 0.0))
            for _, v in items:
                v.epoch_end = end
            if continued or not all(v.finite for _, v in items):
                continue  # shares need the whole epoch, finite
            norms = [v.norm for _, v in items]
            dots = [v.dot for _, v in items]
            tensors = [p.tensor for p, _ in items]
            carried_tensor = start.tensor if start is not None else None
            if len(items) + (carried is not None) <= 2:
                shares, _, _ = stats_shares(list(range(len(items))), norms, dots, carried)
            elif all(t is not None for t in tensors) and (carried is None or carried_tensor is not None):
                shares = _tensor_shares(tensors, carried_tensor)  # type: ignore[arg-type]
            else:
                shares = {}
            for i, (_, v) in enumerate(items):
                v.share = shares.get(i)
    return out


def _tensor_shares(parts: list[torch.Tensor], carried: torch.Tensor | None) -> dict[int, float | None]:
    """Exact projection shares of kept parts on their sum (keep="tensors")."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        dtype = torch.float64 if parts[0].dtype != torch.float64 else parts[0].dtype
        total = sum((p.to(dtype) for p in parts), carried.to(dtype) if carried is not None else torch.zeros((), dtype=dtype))
        g2 = float((total * total).sum())
        if g2 <= 0:
            return {}
        return {i: float((p.to(dtype) * total).sum()) / g2 for i, p in enumerate(parts)}


def fold_window(ledger: Ledger, run: RunAggregates, step: int, window: int) -> int | None:
    """At a step end: when 2 × ``window`` steps are kept, fold the oldest ``window`` (NOTE [window]).

    Returns the index of the first record still kept in full, or None when nothing was folded.
    """
    kept = ledger.records.kept
    if not kept or step - kept[0].step < 2 * window:
        return None
    cut_step = step - window
    upto = next((r.index for r in kept if r.step >= cut_step), len(ledger.records))
    ledger.flush()
    run.add(ledger, upto)
    run.folded_steps = cut_step
    for state in ledger.leaves:
        state.drop_before(upto)
    ledger.records.drop_before(upto)
    ledger.version += 1
    return upto
