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
# Cost: the fold works on flat float64 tensors (one entry per part; per (leaf, loss) and per
# (module, loss) tables, bucketed trends as tensors too), so its Python work is one short loop per
# part (reading the part's statistics) and one per (leaf, epoch). It runs with the garbage collector
# paused and with torch's intra-op thread pool set to one thread for its duration (restored after):
# its tensors are a few thousand elements, and on a busy machine each op that wakes the pool waited
# a scheduler slice (~1 ms per indexing op on 2 loaded cores, against ~50 µs on one thread).

# NOTE [sampling]
# `trace(every=N)` measures the parts of every N-th step only (steps 0, N, 2N, ...): in the other
# steps the leaf hooks return at once (the record is still made, so detectors see every call). A
# `.grad` that an unmeasured step added to is carried into the next measured epoch, labelled
# "unmeasured". The run report says which steps were measured.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.analysis.breakdown import stats_shares
from gradprobe.capture.lifecycle import gc_paused
from gradprobe.ledger.stats import read_floats

if TYPE_CHECKING:
    from collections.abc import Iterator

    from gradprobe.findings import Site
    from gradprobe.ledger.ledger import BackwardRecord, Ledger, LeafState

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
        "leaves", "share", "share_trend", "norm", "cos", "cos_trend", "conflict_steps", "compared_steps",
        "conflict_trend", "grad_norm", "grad_trend",
    )

    def __init__(self) -> None:
        self.leaves: set[int] = set()
        self.share: dict[str, Agg] = {}  # loss -> per step share of the module's .grad
        self.share_trend: dict[str, Series] = {}
        self.norm: dict[str, Agg] = {}  # loss -> per call ‖part‖ over the module's leaves
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
        new.norm = {k: v.copy() for k, v in self.norm.items()}
        new.cos = {k: v.copy() for k, v in self.cos.items()}
        new.cos_trend = {k: v.copy() for k, v in self.cos_trend.items()}
        new.conflict_trend = self.conflict_trend.copy()
        new.conflict_steps, new.compared_steps = self.conflict_steps, self.compared_steps
        new.grad_norm, new.grad_trend = self.grad_norm.copy(), self.grad_trend.copy()
        return new


class AggTable:
    """:class:`Agg` per (row, column) as float64 tensors, updated for many values at once (NOTE [window])."""

    FIELDS = ("n", "total", "low", "high", "first", "last", "last_value")
    _INIT = {"n": 0.0, "total": 0.0, "low": math.inf, "high": -math.inf, "first": -1.0, "last": -1.0, "last_value": math.nan}

    def __init__(self) -> None:
        self.rows = 0
        self.cols = 0
        self.data = {f: torch.empty(0, 0, dtype=torch.float64) for f in self.FIELDS}

    def grow(self, rows: int, cols: int) -> None:
        if rows <= self.rows and cols <= self.cols:
            return
        rows, cols = max(rows, self.rows), max(cols, self.cols)
        for f, old in self.data.items():
            new = torch.full((rows, cols), self._INIT[f], dtype=torch.float64)
            new[: self.rows, : self.cols] = old
            self.data[f] = new
        self.rows, self.cols = rows, cols

    def add(self, row: torch.Tensor, col: torch.Tensor, step: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``value[i]`` at ``(row[i], col[i])`` in step ``step[i]``; within a cell, values come in step order."""
        if row.numel() == 0:
            return
        self.grow(int(row.max()) + 1, int(col.max()) + 1)
        d = {f: t.view(-1) for f, t in self.data.items()}
        idx = row * self.cols + col
        step = step.to(torch.float64)
        cells = self.rows * self.cols
        fresh = d["n"] == 0
        count = torch.zeros(cells, dtype=torch.float64).index_add_(0, idx, torch.ones_like(value))
        d["n"] += count
        d["total"].index_add_(0, idx, value)
        d["low"].scatter_reduce_(0, idx, value, "amin")
        d["high"].scatter_reduce_(0, idx, value, "amax")
        first = torch.full((cells,), math.inf, dtype=torch.float64).scatter_reduce_(0, idx, step, "amin")
        start = fresh & (count > 0)
        d["first"][start] = first[start]
        position = torch.arange(idx.numel(), dtype=torch.float64)
        last = torch.full((cells,), -1.0, dtype=torch.float64).scatter_reduce_(0, idx, position, "amax")
        hit = last >= 0
        at = last[hit].long()
        d["last"][hit] = step[at]
        d["last_value"][hit] = value[at]

    def agg(self, row: int, col: int) -> Agg:
        new = Agg()
        if row < self.rows and col < self.cols:
            n, total, low, high, first, last, last_value = (float(self.data[f][row, col]) for f in self.FIELDS)
            new.n, new.total, new.low, new.high = int(n), total, low, high
            new.first, new.last, new.last_value = int(first), int(last), last_value
        return new

    def cells(self) -> list[tuple[int, int]]:
        """The (row, column) cells with at least one value."""
        return [tuple(c) for c in (self.data["n"] > 0).nonzero().tolist()] if self.rows else []  # type: ignore[misc]

    def copy(self) -> AggTable:
        new = AggTable()
        new.rows, new.cols = self.rows, self.cols
        new.data = {f: t.clone() for f, t in self.data.items()}
        return new


class _Counts:
    """Integer counts per (row, column) (conflicts, non-finite parts, steps reached), as a tensor."""

    def __init__(self) -> None:
        self.t = torch.zeros(0, 0, dtype=torch.float64)

    def add(self, row: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        if row.numel() == 0:
            return
        rows, cols = max(int(row.max()) + 1, self.t.shape[0]), max(int(col.max()) + 1, self.t.shape[1])
        if (rows, cols) != tuple(self.t.shape):
            new = torch.zeros(rows, cols, dtype=torch.float64)
            new[: self.t.shape[0], : self.t.shape[1]] = self.t
            self.t = new
        self.t.view(-1).index_add_(0, row * cols + col, value.to(torch.float64))

    def get(self, row: int, col: int) -> int:
        return int(self.t[row, col]) if row < self.t.shape[0] and col < self.t.shape[1] else 0

    def copy(self) -> _Counts:
        new = _Counts()
        new.t = self.t.clone()
        return new


class SeriesTable:
    """:class:`Series` per (row, column) as tensors: one bucket grid shared by all cells (NOTE [window]).

    Bucket ``b`` holds the steps ``b·width … (b+1)·width - 1``; when a step lands past the last of
    ``SERIES_BUCKETS`` buckets, the width doubles and neighbouring buckets merge.
    """

    def __init__(self) -> None:
        self.width = 1
        f64 = torch.float64
        self.sum = torch.zeros(0, 0, SERIES_BUCKETS, dtype=f64)
        self.count = torch.zeros(0, 0, SERIES_BUCKETS, dtype=f64)
        self.low = torch.full((0, 0, SERIES_BUCKETS), math.inf, dtype=f64)
        self.high = torch.full((0, 0, SERIES_BUCKETS), -math.inf, dtype=f64)
        self.first = torch.full((0, 0, SERIES_BUCKETS), math.inf, dtype=f64)
        self.last = torch.full((0, 0, SERIES_BUCKETS), -math.inf, dtype=f64)

    _FIELDS = (("sum", 0.0), ("count", 0.0), ("low", math.inf), ("high", -math.inf), ("first", math.inf), ("last", -math.inf))

    def _grow(self, rows: int, cols: int) -> None:
        r0, c0 = self.sum.shape[0], self.sum.shape[1]
        if rows <= r0 and cols <= c0:
            return
        rows, cols = max(rows, r0), max(cols, c0)
        for name, fill in self._FIELDS:
            old = getattr(self, name)
            new = torch.full((rows, cols, SERIES_BUCKETS), fill, dtype=torch.float64)
            new[:r0, :c0] = old
            setattr(self, name, new)

    def _widen(self) -> None:
        half = SERIES_BUCKETS // 2
        for name, fill in self._FIELDS:
            old = getattr(self, name)
            pairs = old.view(old.shape[0], old.shape[1], half, 2)
            if name in ("sum", "count"):
                merged = pairs.sum(-1)
            elif name in ("low", "first"):
                merged = pairs.amin(-1)
            else:
                merged = pairs.amax(-1)
            new = torch.full_like(old, fill)
            new[:, :, :half] = merged
            setattr(self, name, new)
        self.width *= 2

    def add(self, row: torch.Tensor, col: torch.Tensor, step: torch.Tensor, value: torch.Tensor) -> None:
        if row.numel() == 0:
            return
        self._grow(int(row.max()) + 1, int(col.max()) + 1)
        top = int(step.max())
        while top // self.width >= SERIES_BUCKETS:
            self._widen()
        cols = self.sum.shape[1]
        idx = (row * cols + col) * SERIES_BUCKETS + step // self.width
        s = step.to(torch.float64)
        self.sum.view(-1).index_add_(0, idx, value)
        self.count.view(-1).index_add_(0, idx, torch.ones_like(value))
        self.low.view(-1).scatter_reduce_(0, idx, value, "amin")
        self.high.view(-1).scatter_reduce_(0, idx, value, "amax")
        self.first.view(-1).scatter_reduce_(0, idx, s, "amin")
        self.last.view(-1).scatter_reduce_(0, idx, s, "amax")

    def series(self, row: int, col: int) -> Series | None:
        """The cell as a :class:`Series` (None when it holds nothing)."""
        if row >= self.sum.shape[0] or col >= self.sum.shape[1]:
            return None
        count = self.count[row, col]
        filled = (count > 0).nonzero().view(-1).tolist()
        if not filled:
            return None
        out = Series()
        out.width = self.width
        cols = [self.first[row, col], self.last[row, col], self.sum[row, col], count, self.low[row, col], self.high[row, col]]
        values = torch.stack(cols).tolist()
        out.buckets = [[values[j][b] for j in range(6)] for b in filled]
        return out

    def copy(self) -> SeriesTable:
        new = SeriesTable()
        new.width = self.width
        for name, _ in self._FIELDS:
            setattr(new, name, getattr(self, name).clone())
        return new


class RunAggregates:
    """What the trace knows of the steps it no longer keeps in full (NOTE [window]).

    Per (leaf, loss) the statistics live in tensors (one row per leaf, one column per loss) and are
    updated for a whole fold at once; :attr:`leaf_losses` hands them out as :class:`LeafLoss` objects.
    Per module and loss they are Python objects (:class:`ModuleRun`), one update per step.
    """

    def __init__(self) -> None:
        self.losses: dict[str, LossInfo] = {}
        self.folded_steps = 0  # steps folded so far (0 .. folded_steps - 1)
        self.records = 0  # backward calls folded
        self._running: dict[int, tuple[int, float]] = {}  # leaf -> (open epoch, ‖.grad‖² so far)
        # the first backward call with a NaN/Inf part, and the leaves it had them in (for GP601 once folded)
        self.first_nonfinite: tuple[BackwardRecord, list[int]] | None = None
        self._column: dict[str, int] = {}  # loss key -> its column in the tables
        self._norm = AggTable()  # per part
        self._share = AggTable()  # per step
        self._cos = AggTable()  # per part with something in .grad before it
        self._conflicts = _Counts()
        self._nonfinite = _Counts()
        self._steps = _Counts()
        self._module_ids: dict[str, int] = {"": 0}  # module name -> row ("": the whole model)
        self._leaves_of: dict[int, set[int]] = {}
        self._m_share, self._m_share_trend = AggTable(), SeriesTable()  # (module, loss), per step
        self._m_norm = AggTable()  # (module, loss), per call: ‖part‖ over the module's leaves
        self._m_cos, self._m_cos_trend = AggTable(), SeriesTable()  # (module, loss), per call
        self._m_conflicts = _Counts()  # (module, 0): steps in conflict; (module, 1): steps compared
        self._m_conflict_trend = SeriesTable()
        self._m_grad, self._m_grad_trend = AggTable(), SeriesTable()  # (module, 0): ‖.grad‖ per step

    def copy(self) -> RunAggregates:
        new = RunAggregates()
        new.losses = {k: v.copy() for k, v in self.losses.items()}
        new._module_ids = dict(self._module_ids)
        new._leaves_of = {k: set(v) for k, v in self._leaves_of.items()}
        for name in ("_m_share", "_m_share_trend", "_m_norm", "_m_cos", "_m_cos_trend", "_m_conflicts", "_m_conflict_trend",
                     "_m_grad", "_m_grad_trend"):
            setattr(new, name, getattr(self, name).copy())
        new.folded_steps, new.records = self.folded_steps, self.records
        new._running = dict(self._running)
        new.first_nonfinite = self.first_nonfinite
        new._column = dict(self._column)
        new._norm, new._share, new._cos = self._norm.copy(), self._share.copy(), self._cos.copy()
        new._conflicts, new._nonfinite, new._steps = self._conflicts.copy(), self._nonfinite.copy(), self._steps.copy()
        return new

    @property
    def leaf_losses(self) -> dict[tuple[int, str], LeafLoss]:
        """Per (leaf index, loss key): the loss's statistics on that leaf over the run."""
        keys = {col: key for key, col in self._column.items()}
        out: dict[tuple[int, str], LeafLoss] = {}
        for row, col in self._norm.cells():
            agg = LeafLoss()
            agg.norm, agg.share, agg.cos = self._norm.agg(row, col), self._share.agg(row, col), self._cos.agg(row, col)
            agg.conflicts, agg.nonfinite = self._conflicts.get(row, col), self._nonfinite.get(row, col)
            agg.steps = self._steps.get(row, col)
            out[(row, keys[col])] = agg
        return out

    # -- adding steps --------------------------------------------------------------------------

    def add(self, ledger: Ledger, upto: int, closed: bool = False) -> None:
        """Add the parts of records before ``upto`` (those not added yet) to the aggregates.

        ``closed``: the epoch each leaf's `.grad` is in now counts as ended (a snapshot of the run so far).
        """
        records = [r for r in ledger.records if r.index < upto]
        if not records:
            return
        column: dict[int, int] = {}  # record index -> loss column
        for record in records:
            key = loss_key(record)
            info = self.losses.get(key)
            if info is None:
                info = self.losses[key] = LossInfo(key, record.name, record.site)
                self._column[key] = len(self._column)
            info.calls.add(record.step, 1.0)
            column[record.index] = self._column[key]
        self.records += len(records)
        parts = _collect(ledger, upto, self._running, closed, {r.index: r.step for r in records}, column)
        if parts is not None:
            if self.first_nonfinite is None and not bool(parts.finite.all()):
                bad = ~parts.finite
                first = int(parts.record[bad].min())
                leaves = parts.leaf[bad & (parts.record == first)].unique().tolist()
                self.first_nonfinite = (next(r for r in records if r.index == first), leaves)
            self._add_leaves(parts)
            self._add_modules(parts, ledger)

    def _add_leaves(self, p: _Parts) -> None:
        leaf, col, step = p.leaf, p.col, p.step
        self._norm.add(leaf, col, step, p.norm)
        self._nonfinite.add(leaf, col, (~p.finite).to(torch.float64))
        has_cos = ~torch.isnan(p.cos)
        self._cos.add(leaf[has_cos], col[has_cos], step[has_cos], p.cos[has_cos])
        self._conflicts.add(leaf[has_cos], col[has_cos], (p.cos[has_cos] < 0).to(torch.float64))
        # per (leaf, loss, step): steps reached, and the loss's share of the step's .grad (parts add up)
        span = int(step.max()) + 1
        cells = (leaf * (int(col.max()) + 1) + col) * span + step
        unique, inverse = torch.unique(cells, return_inverse=True)
        u_step = unique % span
        u_cell = unique // span
        u_leaf, u_col = u_cell // (int(col.max()) + 1), u_cell % (int(col.max()) + 1)
        self._steps.add(u_leaf, u_col, torch.ones_like(u_step, dtype=torch.float64))
        in_grad = p.in_grad
        share = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(
            0, inverse[in_grad], p.share[in_grad]
        )  # NaN when any of the step's parts has no share
        counted = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(
            0, inverse[in_grad], torch.ones(int(in_grad.sum()), dtype=torch.float64)
        )
        ok = (counted > 0) & ~torch.isnan(share)
        self._share.add(u_leaf[ok], u_col[ok], u_step[ok], share[ok])

    def _add_modules(self, p: _Parts, ledger: Ledger) -> None:
        ids = self._module_ids
        for state in ledger.leaves:
            name = state.leaf.module or ""
            if name not in ids:
                ids[name] = len(ids)
        owner = torch.tensor([ids[s.leaf.module or ""] for s in ledger.leaves], dtype=torch.long)
        m_count = len(ids)
        k_count = int(p.col.max()) + 1
        first_step = int(p.step.min())
        s_count = int(p.step.max()) - first_step + 1
        rec_base = int(p.record.min())
        r_count = int(p.record.max()) - rec_base + 1
        n = p.leaf.numel()
        for leaf, m in zip(*(t.tolist() for t in (p.leaf.unique(), owner[p.leaf.unique()]))):
            self._leaves_of.setdefault(0, set()).add(leaf)
            if m:
                self._leaves_of.setdefault(m, set()).add(leaf)
        # each part counts for the whole model (module 0) and for its own module (when it has one)
        leaf_m = owner[p.leaf]
        keep = torch.cat([torch.ones(n, dtype=torch.bool), leaf_m != 0])
        both = torch.cat([torch.zeros_like(leaf_m), leaf_m])[keep]
        twice = torch.cat([torch.arange(n), torch.arange(n)])[keep]
        step = p.step[twice] - first_step
        f64 = torch.float64
        # the module's ‖.grad‖² at each step's end: Σ over its leaves of their epoch's end
        ends = p.seg_end_sq[twice]
        ended = ~torch.isnan(ends)
        leaf_step = (p.leaf[twice][ended] * s_count + step[ended]) * m_count + both[ended]
        uniq, first_of = _first_per_group(leaf_step)
        sm = (uniq // m_count % s_count) * m_count + uniq % m_count
        g2 = torch.zeros(s_count * m_count, dtype=f64).index_add_(0, sm, ends[ended][first_of])
        seen = torch.zeros(s_count * m_count, dtype=torch.bool)
        seen[sm] = True
        # each loss's share of the module's .grad at the step's end: Σ share·‖G_leaf‖² / Σ ‖G_leaf‖²
        in_grad = p.in_grad[twice]
        group = ((step * m_count + both) * k_count + p.col[twice])[in_grad]
        numer = torch.zeros(s_count * m_count * k_count, dtype=f64).index_add_(0, group, (p.share[twice] * ends)[in_grad])
        has = torch.zeros_like(numer).index_add_(0, group, torch.ones(group.numel(), dtype=f64))
        totals = g2.repeat_interleave(k_count)
        share = numer / totals
        ok = ((has > 0) & ~torch.isnan(share) & (totals > 0)).nonzero().view(-1)
        s_, m_, k_ = ok // (m_count * k_count), ok // k_count % m_count, ok % k_count
        self._m_share.add(m_, k_, s_ + first_step, share[ok])
        self._m_share_trend.add(m_, k_, s_ + first_step, share[ok])
        call_col = torch.zeros(r_count, dtype=torch.long)
        call_col[p.record - rec_base] = p.col
        # each call's ‖part‖ over the module: √(Σ ‖part_leaf‖²)
        every, slot = torch.unique((step * m_count + both) * r_count + (p.record[twice] - rec_base), return_inverse=True)
        square = torch.zeros(every.numel(), dtype=f64).index_add_(0, slot, p.norm[twice] ** 2)
        s_, m_, r_ = every // (m_count * r_count), every // r_count % m_count, every % r_count
        self._m_norm.add(m_, call_col[r_], s_ + first_step, square.sqrt())
        # cosine of each call's part with what the module's .grad held: Σ dot / √(Σ before² · Σ part²)
        valid = ~torch.isnan(p.before[twice]) & p.finite[twice] & ~torch.isnan(p.dot[twice])
        calls, slot = torch.unique(((step * m_count + both) * r_count + (p.record[twice] - rec_base))[valid], return_inverse=True)
        sums = torch.zeros(3, calls.numel(), dtype=f64)  # only the (step, module, call) groups that occur
        sums[0].index_add_(0, slot, p.dot[twice][valid])
        sums[1].index_add_(0, slot, p.before[twice][valid] ** 2)
        sums[2].index_add_(0, slot, p.norm[twice][valid] ** 2)
        compared = ((sums[1] > 0) & (sums[2] > 0)).nonzero().view(-1)
        cos = (sums[0, compared] / (sums[1, compared] * sums[2, compared]).sqrt()).clamp(-1.0, 1.0)
        compared = calls[compared]
        s_, m_, r_ = compared // (m_count * r_count), compared // r_count % m_count, compared % r_count
        self._m_cos.add(m_, call_col[r_], s_ + first_step, cos)
        self._m_cos_trend.add(m_, call_col[r_], s_ + first_step, cos)
        # per (step, module): compared at all, and in conflict (some call's cosine < 0)
        sm_call = s_ * m_count + m_
        bad = torch.zeros(s_count * m_count, dtype=f64).scatter_reduce_(0, sm_call, (cos < 0).to(f64), "amax")
        any_compared = torch.zeros(s_count * m_count, dtype=torch.bool)
        any_compared[sm_call] = True
        where = any_compared.nonzero().view(-1)
        ws, wm = where // m_count, where % m_count
        zero = torch.zeros_like(wm)
        self._m_conflicts.add(wm, zero, bad[where])
        self._m_conflicts.add(wm, zero + 1, torch.ones(where.numel(), dtype=f64))
        self._m_conflict_trend.add(wm, zero, ws + first_step, bad[where])
        where = seen.nonzero().view(-1)
        ws, wm = where // m_count, where % m_count
        norms = g2[where].sqrt()
        self._m_grad.add(wm, torch.zeros_like(wm), ws + first_step, norms)
        self._m_grad_trend.add(wm, torch.zeros_like(wm), ws + first_step, norms)

    @property
    def modules(self) -> dict[str, ModuleRun]:
        """Per module (``""``: the whole model): each loss's share and cosine over the run, ‖.grad‖."""
        keys = {col: key for key, col in self._column.items()}
        out: dict[str, ModuleRun] = {}
        for name, m in self._module_ids.items():
            if m not in self._leaves_of:
                continue
            run = out[name] = ModuleRun()
            run.leaves = set(self._leaves_of[m])
            for col, key in keys.items():
                share = self._m_share.agg(m, col)
                if share.n:
                    run.share[key] = share
                    run.share_trend[key] = self._m_share_trend.series(m, col) or Series()
                norm = self._m_norm.agg(m, col)
                if norm.n:
                    run.norm[key] = norm
                cos = self._m_cos.agg(m, col)
                if cos.n:
                    run.cos[key] = cos
                    run.cos_trend[key] = self._m_cos_trend.series(m, col) or Series()
            run.conflict_steps = self._m_conflicts.get(m, 0)
            run.compared_steps = self._m_conflicts.get(m, 1)
            run.conflict_trend = self._m_conflict_trend.series(m, 0) or Series()
            run.grad_norm = self._m_grad.agg(m, 0)
            run.grad_trend = self._m_grad_trend.series(m, 0) or Series()
        return out

    def snapshot(self, ledger: Ledger) -> RunAggregates:
        """A copy with the steps still kept in full added (the run so far, for reports)."""
        with gc_paused(), one_thread():  # NOTE [window]: small tensors, no thread pool
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


class _Parts:
    """The parts of one fold, flat, read back (NOTE [window]); NaN where a value does not exist."""

    __slots__ = ("leaf", "col", "step", "record", "norm", "finite", "in_grad", "dot", "before", "cos", "share", "seg_end_sq")


def _first_per_group(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ``keys`` and, for each, the position of its first occurrence."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    position = torch.arange(keys.numel())
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long).scatter_reduce_(0, inverse, position, "amin")
    return unique, first


def _collect(
    ledger: Ledger,
    upto: int,
    running: dict[int, tuple[int, float]],
    closed: bool,
    steps: dict[int, int],
    column: dict[int, int],
) -> _Parts | None:
    """Read back the parts of records before ``upto`` at once and derive, per part, the values the
    aggregates take: cosine with what `.grad` held, share of its epoch's final `.grad` (NOTE [window])."""
    refs: list[Any] = []
    leaf_l: list[int] = []
    rec_l: list[int] = []
    epoch_l: list[int] = []
    grad_l: list[bool] = []
    tickets: list[int] = []  # 3 per part: norm, absmax, dot (-1: none)
    segments: list[tuple[LeafState, int, int, list[int]]] = []  # (state, epoch, first part, parts' tensors' positions)
    kept_tensors: list[torch.Tensor | None] = []
    nan_ticket = -1
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
                tickets.append(nan_ticket)
            in_grad = p.accumulated or dot is not None
            leaf_l.append(state.leaf.index)
            rec_l.append(p.record)
            epoch_l.append(p.epoch)
            grad_l.append(in_grad)
            kept_tensors.append(p.tensor)
            if in_grad:
                if not segments or segments[-1][0] is not state or segments[-1][1] != p.epoch:
                    segments.append((state, p.epoch, len(leaf_l) - 1, []))
                segments[-1][3].append(len(leaf_l) - 1)
    if not leaf_l:
        return None
    # epochs' carried-in norms go in the same read-back
    carried_t: list[int] = []
    for state, epoch, _, _ in segments:
        start = next((e for e in state.epochs if e.epoch == epoch), None)
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
    for (state, epoch, _, members), ct in zip(segments, carried_t):
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
            start = next((e for e in state.epochs if e.epoch == epoch), None)
            carried_tensor = start.tensor if start is not None else None
            if all(x is not None for x in tensors) and (carried is None or carried_tensor is not None):
                shares = _tensor_shares(tensors, carried_tensor)  # type: ignore[arg-type]
            else:
                shares = {}
        for j, i in enumerate(members):
            value = shares.get(j)
            if value is not None:
                share_l[i] = value
    f64 = torch.float64
    p = _Parts()
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



def _json(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _tensor_shares(parts: list[torch.Tensor], carried: torch.Tensor | None) -> dict[int, float | None]:
    """Exact projection shares of kept parts on their sum (keep="tensors")."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        dtype = torch.float64 if parts[0].dtype != torch.float64 else parts[0].dtype
        total = sum((p.to(dtype) for p in parts), carried.to(dtype) if carried is not None else torch.zeros((), dtype=dtype))
        g2 = float((total * total).sum())
        if g2 <= 0:
            return {}
        return {i: float((p.to(dtype) * total).sum()) / g2 for i, p in enumerate(parts)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the fold's many small tensor ops on this thread only (NOTE [window])."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fold_window(ledger: Ledger, run: RunAggregates, step: int, window: int) -> int | None:
    """At a step end: when 2 × ``window`` steps are kept, fold the oldest ``window`` (NOTE [window]).

    Returns the index of the first record still kept in full, or None when nothing was folded.
    """
    kept = ledger.records.kept
    if not kept or step - kept[0].step < 2 * window:
        return None
    cut_step = step - window
    upto = next((r.index for r in kept if r.step >= cut_step), len(ledger.records))
    with gc_paused(), one_thread():  # NOTE [window]: small tensors, no thread pool
        ledger.flush()
        run.add(ledger, upto)
        run.folded_steps = cut_step
        for state in ledger.leaves:
            state.drop_before(upto)
        ledger.records.drop_before(upto)
    ledger.version += 1
    return upto
