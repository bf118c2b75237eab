"""A training run in bounded memory: old steps folded into aggregates per leaf, module and loss.

Place in the flow: analysis. The trace calls :func:`fold_window` at every step end (NOTE [steps] in
capture/steps.py); the run report and ``to_dict()`` read :meth:`RunAggregates.snapshot`, which adds the
steps still kept in full to a copy of the aggregates. Beside it: ``run_parts`` (reading back the
parts being folded, with their cosines and shares) and ``run_tables`` (the tensor tables the
aggregates are kept in, and the :class:`Agg` / :class:`Series` cells reports read).

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
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.analysis.run_parts import Parts, collect, first_per_group
from gradprobe.analysis.run_tables import Agg, AggTable, Counts, Series, SeriesTable
from gradprobe.capture.lifecycle import gc_paused

if TYPE_CHECKING:
    from collections.abc import Iterator

    from gradprobe.findings import Site
    from gradprobe.ledger.ledger import BackwardRecord, Ledger

__all__ = ["Agg", "LossInfo", "ModuleRun", "RunAggregates", "Series", "fold_window", "loss_key"]


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
        self._conflicts = Counts()
        self._nonfinite = Counts()
        self._steps = Counts()
        self._module_ids: dict[str, int] = {"": 0}  # module name -> row ("": the whole model)
        self._leaves_of: dict[int, set[int]] = {}
        self._m_share, self._m_share_trend = AggTable(), SeriesTable()  # (module, loss), per step
        self._m_norm = AggTable()  # (module, loss), per call: ‖part‖ over the module's leaves
        self._m_cos, self._m_cos_trend = AggTable(), SeriesTable()  # (module, loss), per call
        self._m_conflicts = Counts()  # (module, 0): steps in conflict; (module, 1): steps compared
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
        parts = collect(ledger, upto, self._running, closed, {r.index: r.step for r in records}, column)
        if parts is not None:
            if self.first_nonfinite is None and not bool(parts.finite.all()):
                bad = ~parts.finite
                first = int(parts.record[bad].min())
                leaves = parts.leaf[bad & (parts.record == first)].unique().tolist()
                self.first_nonfinite = (next(r for r in records if r.index == first), leaves)
            self._add_leaves(parts)
            self._add_modules(parts, ledger)

    def _add_leaves(self, p: Parts) -> None:
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

    def _add_modules(self, p: Parts, ledger: Ledger) -> None:
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
        uniq, first_of = first_per_group(leaf_step)
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
