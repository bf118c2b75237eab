"""The run's tables: running statistics and bounded trends per (row, column), for many values at once.

Place in the flow: analysis, under :mod:`gradprobe.analysis.run`, whose aggregates keep one table per
statistic, a row per leaf or module and a column per loss (NOTE [window] there). :class:`Agg` and
:class:`Series` are one cell of an :class:`AggTable` / :class:`SeriesTable`, read out for reports.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradprobe._format import json_float

__all__ = ["SERIES_BUCKETS", "Agg", "AggTable", "Counts", "Series", "SeriesTable", "grown"]

SERIES_BUCKETS = 64


def grown(old: torch.Tensor, rows: int, cols: int, fill: float) -> torch.Tensor:
    """``old`` (rows × columns × …) with at least ``rows`` rows and ``cols`` columns, new cells ``fill``."""
    r0, c0 = old.shape[0], old.shape[1]
    if rows <= r0 and cols <= c0:
        return old
    new = torch.full((max(rows, r0), max(cols, c0), *old.shape[2:]), fill, dtype=old.dtype)
    new[:r0, :c0] = old
    return new


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
            "mean": json_float(self.mean),
            "min": json_float(self.low) if self.n else None,
            "max": json_float(self.high) if self.n else None,
            "first_step": self.first if self.n else None,
            "last_step": self.last if self.n else None,
            "last": json_float(self.last_value) if self.n else None,
        }


class Series:
    """A value per step in at most ``SERIES_BUCKETS`` buckets: one cell of a :class:`SeriesTable`, read out."""

    __slots__ = ("width", "buckets")

    def __init__(self) -> None:
        self.width = 1  # steps per bucket
        self.buckets: list[list[float]] = []  # [first step, last step, sum, count, min, max]

    def points(self) -> list[tuple[int, int, float, float, float]]:
        """``(first step, last step, mean, min, max)`` per bucket, oldest first."""
        return [(int(b[0]), int(b[1]), b[2] / b[3], b[4], b[5]) for b in self.buckets]


class AggTable:
    """:class:`Agg` per (row, column) as float64 tensors, updated for many values at once (NOTE [window])."""

    FIELDS = ("n", "total", "low", "high", "first", "last", "last_value")
    _INIT = {"n": 0.0, "total": 0.0, "low": math.inf, "high": -math.inf, "first": -1.0, "last": -1.0, "last_value": math.nan}

    def __init__(self) -> None:
        self.rows = 0
        self.cols = 0
        self.data = {f: torch.empty(0, 0, dtype=torch.float64) for f in self.FIELDS}

    def grow(self, rows: int, cols: int) -> None:
        self.data = {f: grown(old, rows, cols, self._INIT[f]) for f, old in self.data.items()}
        self.rows, self.cols = self.data["n"].shape

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


class Counts:
    """Integer counts per (row, column) (conflicts, non-finite parts, steps reached), as a tensor."""

    def __init__(self) -> None:
        self.t = torch.zeros(0, 0, dtype=torch.float64)

    def add(self, row: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        if row.numel() == 0:
            return
        self.t = grown(self.t, int(row.max()) + 1, int(col.max()) + 1, 0.0)
        self.t.view(-1).index_add_(0, row * self.t.shape[1] + col, value.to(torch.float64))

    def get(self, row: int, col: int) -> int:
        return int(self.t[row, col]) if row < self.t.shape[0] and col < self.t.shape[1] else 0

    def copy(self) -> Counts:
        new = Counts()
        new.t = self.t.clone()
        return new


class SeriesTable:
    """:class:`Series` per (row, column) as tensors: one bucket grid shared by all cells (NOTE [window]).

    Bucket ``b`` holds the steps ``b·width … (b+1)·width - 1``; when a step lands past the last of
    ``SERIES_BUCKETS`` buckets, the width doubles and neighbouring buckets merge.
    """

    _FIELDS = (("sum", 0.0), ("count", 0.0), ("low", math.inf), ("high", -math.inf), ("first", math.inf), ("last", -math.inf))

    def __init__(self) -> None:
        self.width = 1
        for name, fill in self._FIELDS:
            setattr(self, name, torch.full((0, 0, SERIES_BUCKETS), fill, dtype=torch.float64))

    def _grow(self, rows: int, cols: int) -> None:
        for name, fill in self._FIELDS:
            setattr(self, name, grown(getattr(self, name), rows, cols, fill))

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
