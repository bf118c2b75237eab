"""The ledger: one record per backward call, one part per (call, leaf).

# NOTE [exact parts]
# A leaf's tensor hook receives exactly the gradient one backward call adds to it, before
# AccumulateGrad adds it to `.grad`. Those are the parts. Differences of `.grad` taken after
# accumulation are not exact (float round-off), so they are never used for attribution.

# NOTE [epochs of .grad]
# `.grad` is the sum of the parts since it was last reset. A post-accumulate hook remembers which
# tensor (and which `_version` of it) AccumulateGrad left in `.grad`. At the next part, if `.grad`
# is None, or is another tensor, or was written in place since (zero_grad(set_to_none=False),
# clip_grad_norm_, a manual `p.grad.mul_()`), a new epoch starts and whatever `.grad` held then is
# the epoch's "carried in" value. Only the last epoch's parts make up the final `.grad`.

# NOTE [stats without syncs]
# In keep="stats" mode a hook launches two or three reductions (norm, abs-max, dot with what .grad
# held before) and keeps the 0-d results on the gradient's device. Nothing is read back to the host
# until someone asks for numbers (breakdown/report/to_dict), and then all at once.

# NOTE [all-reduced .grad]
# Under DistributedDataParallel a leaf's hooks see this rank's local part; the post-accumulate hook
# sees the local `.grad` (carried in + local parts); then DDP's reducer replaces `.grad` with the
# average over ranks (an in-place copy, or the bucket view itself with gradient_as_bucket_view).
# The DDP plugin reports that with `Ledger.on_reduced`: the epoch's parts are checked against the
# local `.grad` it captured, `.grad` itself is the average, and the next part opens a new epoch that
# carries the average in (reason "allreduce"). Identity is by storage (data_ptr), since a bucket
# view's Python object does not survive, and its version counter is shared by the whole bucket.
# NOTE [deferred stats]
# Most parts open an epoch: `.grad` was None before the backward, so AccumulateGrad stores the part
# itself (or a same-valued copy) as `.grad`. For those, in keep="stats" mode, the tensor hook only
# notes the part and the statistics are taken later from `.grad`, for many leaves at once with
# `torch._foreach_norm` (a fused kernel on CUDA; on the CPU it still saves the Python work per leaf):
# at the end of the backward (an engine callback), or sooner if anything could change `.grad` first.
# Nothing is held meanwhile but the weak reference the post-accumulate hook keeps anyway, so no
# gradient lives longer than it would untraced. Deferral is only used when the trace's own
# post-accumulate hook is the only one on the leaf (a user's hook, e.g. an optimizer step in
# backward, could replace `.grad` before the flush); otherwise the part is measured in the hook.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Literal

import torch

from gradprobe.ledger.records import BackwardRecord, EpochStart, Leaf, PartStats, Reduced, StatBatch
from gradprobe.ledger.stats import dot, foreach_norms, norms, stack_groups, stacked_norms

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["BackwardRecord", "Leaf", "Ledger", "LeafState", "PartStats", "RecordLog", "Reduced"]


_STRIDED = torch.strided


def _deferrable(tensor: torch.Tensor | None, grad: torch.Tensor) -> bool:
    if tensor is None or grad.layout is not _STRIDED or grad.is_complex():
        return False
    hooks = tensor._post_accumulate_grad_hooks
    return hooks is not None and len(hooks) == 1  # only the trace's own (NOTE [deferred stats])


def _stored_part(state: LeafState) -> torch.Tensor | None:
    """`.grad` if it is still exactly what AccumulateGrad stored for the deferred part, else None."""
    part = state.deferred
    if part is None or not part.accumulated or state.after is None:
        return None
    grad = state.after()
    if grad is None or grad._version != state.after_version:
        return None
    tensor = state.ref()  # type: ignore[misc]
    if tensor is None or tensor.grad is not grad:
        return None
    return grad.detach()


def _measure(parts: list[PartStats], grads: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Statistics of same-device, same-dtype parts: small ones stacked per shape, large ones fused
    (NOTE [batched statistics] in stats.py)."""
    groups, large = stack_groups(grads)
    for rows in groups:
        batch = StatBatch(*stacked_norms([grads[i] for i in rows], dtype))
        for row, i in enumerate(rows):
            part = parts[i]
            part.batch, part.row = batch, row
    if large:
        for i, (norm, top) in zip(large, foreach_norms([grads[i] for i in large], dtype)):
            parts[i].norm, parts[i].absmax = norm, top


class RecordLog:
    """The records of one trace, addressed by their index; the oldest may be folded away (NOTE [window]
    in analysis/run.py).

    ``len()`` counts every record ever made (the next record's index); iteration yields the records
    still kept, oldest first; ``log[i]`` is the record with index ``i`` (negative: from the newest).
    """

    __slots__ = ("_kept", "base")

    def __init__(self) -> None:
        self._kept: list[BackwardRecord] = []
        self.base = 0  # index of the oldest record kept

    def append(self, record: BackwardRecord) -> None:
        self._kept.append(record)

    def __len__(self) -> int:
        return self.base + len(self._kept)

    def __iter__(self) -> Iterator[BackwardRecord]:
        return iter(self._kept)

    def __getitem__(self, index: int) -> BackwardRecord:
        if index < 0:
            return self._kept[index]
        if index < self.base:
            raise IndexError(
                f"gradprobe: backward record {index} was folded into the run's aggregates (records before "
                f"{self.base} are no longer kept in full; see trace(window=...))"
            )
        return self._kept[index - self.base]

    def get(self, index: int) -> BackwardRecord | None:
        """The record with ``index``, or None when it was folded away or does not exist."""
        i = index - self.base
        return self._kept[i] if 0 <= i < len(self._kept) else None

    @property
    def kept(self) -> list[BackwardRecord]:
        return self._kept

    def drop_before(self, index: int) -> list[BackwardRecord]:
        """Forget the records before ``index``; return them."""
        cut = max(0, min(index - self.base, len(self._kept)))
        dropped, self._kept = self._kept[:cut], self._kept[cut:]
        self.base += cut
        return dropped


class LeafState:
    """Everything the ledger knows about one leaf; mutated only from its own hooks."""

    __slots__ = (
        "leaf", "parts", "epochs", "epoch_base", "folded", "skipped", "unmeasured", "after", "after_version", "reduced",
        "deferred", "ref",
    )

    def __init__(self, leaf: Leaf) -> None:
        self.leaf = leaf
        self.ref = leaf.ref
        self.parts: list[PartStats] = []
        self.epochs: list[EpochStart] = []  # the epochs still kept: numbers epoch_base, epoch_base + 1, ...
        self.epoch_base = 0
        self.folded = -1  # an epoch some of whose parts were folded away (NOTE [window] in analysis/run.py)
        self.skipped = False  # a part of an unmeasured step is going into .grad (NOTE [sampling] in analysis/run.py)
        self.unmeasured = False  # .grad holds unmeasured parts: the next epoch carries them in
        self.after: weakref.ReferenceType[torch.Tensor] | None = None  # .grad left by AccumulateGrad
        self.after_version = -1
        self.reduced: Reduced | None = None  # NOTE [all-reduced .grad]
        self.deferred: PartStats | None = None  # a part whose stats are still to be taken from .grad

    @property
    def epoch(self) -> int:
        """The number of the current epoch (-1 before the first part)."""
        return self.epoch_base + len(self.epochs) - 1

    def drop_before(self, record: int) -> list[PartStats]:
        """Forget the parts of records before ``record`` and the epochs no kept part needs; return the parts."""
        parts = self.parts
        if not parts or parts[0].record >= record:
            return []
        dropped = [p for p in parts if p.record < record]
        self.parts = [p for p in parts if p.record >= record]
        current = self.epoch
        if any(p.epoch == current for p in dropped):
            self.folded = current
        first = self.parts[0].epoch if self.parts else current
        cut = max(0, min(first, current) - self.epoch_base)
        if cut:
            del self.epochs[:cut]
            self.epoch_base += cut
        return dropped


class Ledger:
    """Records and parts of one trace. Hooks write here; nothing else happens inside a hook."""

    def __init__(self, keep: Literal["stats", "tensors"]) -> None:
        self.keep = keep
        self.deferring = keep == "stats"
        self.records = RecordLog()
        self.leaves: list[LeafState] = []
        self.step = 0  # the training step running now (NOTE [steps] in capture/steps.py)
        # NOTE [steps] in capture/steps.py: the first leaf given a part in this step, and the `.grad` its
        # last backward left (measured or not), to tell a reset in a loop without an optimizer
        self.sentinel: LeafState | None = None
        self.sentinel_grad: weakref.ReferenceType[torch.Tensor] | None = None
        self.sentinel_version = -1
        self.lock = threading.RLock()  # reentrant: an unseen backward's record is added under it
        self.version = 0  # bumped on every change, so read-backs know when to refresh
        self.pending: list[LeafState] = []  # leaves with a deferred part (NOTE [deferred stats])

    def add_record(self, **fields: object) -> BackwardRecord:
        with self.lock:
            record = BackwardRecord(index=len(self.records), step=self.step, **fields)  # type: ignore[arg-type]
            self.records.append(record)
            self.version += 1
        return record

    def add_leaf(self, tensor: torch.Tensor, name: str, module: str | None) -> LeafState:
        leaf = Leaf(
            index=len(self.leaves),
            name=name,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            device=tensor.device,
            module=module,
            ref=weakref.ref(tensor),
        )
        state = LeafState(leaf)
        self.leaves.append(state)
        return state

    # -- called from hooks -------------------------------------------------------------------

    def on_part(self, state: LeafState, record: BackwardRecord, grad: torch.Tensor) -> bool:
        """Record the gradient ``record`` is about to add to ``state``'s leaf (tensor hook).

        Returns whether the part's statistics were deferred (a flush is due at the backward's end).
        """
        if state.deferred is not None:
            self._settle(state)  # .grad still holds exactly that part: measure it before it changes
        accumulates = record.kind == "backward"
        if accumulates:
            if self.sentinel is None:
                self.sentinel = state
            tensor = state.ref()  # type: ignore[misc]
            before = tensor.grad if tensor is not None else None
            if before is None and self.deferring and _deferrable(tensor, grad):
                epochs = state.epochs
                state.unmeasured = False
                if state.reduced is None:  # _maybe_new_epoch's answer when .grad is None and no all-reduce
                    epochs.append(EpochStart(state.epoch + 1, record.index, None, None, "reset" if epochs else "start"))
                else:
                    self._maybe_new_epoch(state, record, None)
                part = PartStats(record.index, state.epoch, None, None, None, False, False, True)
                state.parts.append(part)
                state.deferred = part
                self.pending.append(state)
                self.version += 1
                return True
        enabled = torch.is_grad_enabled()  # only under create_graph=True: skip the no_grad() machinery
        if enabled:
            torch._C._set_grad_enabled(False)
        try:
            norm, absmax = norms(grad)
            dot_before = None
            if accumulates:
                if before is not None and before.shape != grad.shape:
                    before = None
                self._maybe_new_epoch(state, record, before)
                if before is not None:
                    dot_before = dot(grad, before)
            kept = grad.clone() if self.keep == "tensors" else None
        finally:
            if enabled:
                torch._C._set_grad_enabled(True)
        state.parts.append(PartStats(record.index, state.epoch, norm, absmax, dot_before, kept))
        self.version += 1
        return False

    def flush(self, everything: bool = False) -> None:
        """Take the deferred statistics from `.grad`, batched per (device, dtype).

        Only parts AccumulateGrad has stored are measured (a backward running on another thread may
        not be there yet), unless ``everything``: then a part whose `.grad` is gone gets NaN stats.
        """
        pending, self.pending = self.pending, []
        if not pending:
            return
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[PartStats], list[torch.Tensor]]] = {}
        waiting = []
        for state in pending:
            part = state.deferred
            if part is None:
                continue
            grad = _stored_part(state)
            if grad is None:
                if part.accumulated or everything:
                    state.deferred = None
                    part.norm = part.absmax = torch.full((), float("nan"))
                else:
                    waiting.append(state)
                continue
            state.deferred = None
            parts, grads = groups.setdefault((grad.device, grad.dtype), ([], []))
            parts.append(part)
            grads.append(grad)
        self.pending.extend(waiting)
        with torch.no_grad():
            for (_, dtype), (parts, grads) in groups.items():
                _measure(parts, grads, dtype)
        self.version += 1

    def _settle(self, state: LeafState) -> None:
        part, state.deferred = state.deferred, None
        assert part is not None
        grad = _stored_part(state)
        with torch.no_grad():
            if grad is None:
                part.norm = part.absmax = torch.full((), float("nan"))
            else:
                part.norm, part.absmax = norms(grad)

    def on_skipped(self, state: LeafState) -> None:
        """A backward of an unmeasured step is about to add to the leaf's `.grad` (NOTE [sampling])."""
        if state.deferred is not None:
            self._settle(state)
        state.skipped = True
        if self.sentinel is None:
            self.sentinel = state

    def on_accumulated(self, state: LeafState, grad: torch.Tensor | None) -> None:
        """Remember the `.grad` AccumulateGrad left (post-accumulate hook)."""
        if state is self.sentinel and grad is not None:
            self.sentinel_grad, self.sentinel_version = weakref.ref(grad), grad._version
        if state.skipped:  # .grad now holds an unmeasured part: the next measured one opens an epoch
            state.skipped = False
            state.unmeasured = True
            state.after = None
            return
        if grad is None:
            return
        state.after = weakref.ref(grad)
        state.after_version = grad._version
        if state.parts:
            state.parts[-1].accumulated = True

    def on_reduced(
        self, state: LeafState, record: BackwardRecord, local_norm: torch.Tensor, local: torch.Tensor | None,
        world: int, shared_version: bool,
    ) -> None:
        """An all-reduce replaced the leaf's local `.grad` by the average (NOTE [all-reduced .grad])."""
        tensor = state.leaf.tensor
        grad = tensor.grad if tensor is not None else None
        if grad is None or state.epoch < 0:
            return
        version = None if shared_version else grad._version
        state.reduced = Reduced(state.epoch, record.index, world, local_norm, local, grad.data_ptr(), version)
        self.version += 1

    def _maybe_new_epoch(self, state: LeafState, record: BackwardRecord, before: torch.Tensor | None) -> None:
        reduced = state.reduced
        if reduced is not None and reduced.epoch == state.epoch:
            if reduced.holds(before):
                assert before is not None
                norm, _ = norms(before.detach())
                kept = before.detach().clone() if self.keep == "tensors" else None
                state.epochs.append(EpochStart(state.epoch + 1, record.index, norm, kept, "allreduce"))
                return
            if before is not None:  # written after the all-reduce: the next checks treat it as modified
                state.after = None
        after = state.after() if state.after is not None else None
        continuing = (
            before is not None
            and state.epochs
            and after is before
            and before._version == state.after_version
        )
        if continuing:
            return
        if before is None:
            state.unmeasured = False
            reason = "start" if not state.epochs else "reset"
            state.epochs.append(EpochStart(state.epoch + 1, record.index, None, None, reason))  # type: ignore[arg-type]
            return
        reason = "trace_start" if not state.epochs else ("unmeasured" if state.unmeasured else "modified")
        state.unmeasured = False
        norm, _ = norms(before.detach())
        kept = before.detach().clone() if self.keep == "tensors" else None
        state.epochs.append(EpochStart(state.epoch + 1, record.index, norm, kept, reason))  # type: ignore[arg-type]
