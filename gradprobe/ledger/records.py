"""The ledger's records: what stays of a backward call, a leaf, a part and an epoch of ``.grad``.

Place in the flow: these are the data the capture layer writes (through :class:`~gradprobe.ledger.ledger.Ledger`)
and everything above reads: analysis, detectors, reports. Frozen where the user sees them
(:class:`BackwardRecord`, :class:`Leaf`); the device-side statistics stay mutable until read back.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Union

import torch

if TYPE_CHECKING:
    from gradprobe.findings import Site

__all__ = ["BackwardRecord", "EpochStart", "Leaf", "PartStats", "Reduced", "StatBatch", "StatRef"]

Kind = Literal["backward", "grad"]


@dataclass(frozen=True)
class BackwardRecord:
    """One backward call seen by a trace.

    Attributes:
        index: position in ``trace.records``.
        name: what the user calls the loss: ``t.name(...)``, the expression on the call line
            (``loss_cls``, ``l1 + l2``), or ``backward#N``.
        site: ``(filename, lineno)`` of the call, None when unknown (a backward run on a thread
            gradprobe could not see).
        retain_graph: the effective value (``None`` means ``create_graph``).
        kind: ``"backward"`` accumulates into ``.grad``; ``"grad"`` (``torch.autograd.grad``) does not.
        create_graph: whether the call built a graph of the gradient.
        inputs: names of the tensors given as ``inputs=`` (None when not given).
        thread: name of the thread the call was made on.
        seen: False for a backward gradprobe learnt of from its hooks only (started on another thread).
        step: the training step the call belongs to, counted from 0 (NOTE [steps] in capture/steps.py).
    """

    index: int
    name: str
    site: Site | None
    retain_graph: bool
    kind: Kind
    create_graph: bool = False
    inputs: tuple[str, ...] | None = None
    thread: str = "MainThread"
    seen: bool = True
    step: int = 0

    @property
    def accumulates(self) -> bool:
        return self.kind == "backward"

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "site": self.site.to_list() if self.site else None,
            "site_library": self.site.library if self.site else None,
            "retain_graph": self.retain_graph,
            "kind": self.kind,
            "create_graph": self.create_graph,
            "inputs": list(self.inputs) if self.inputs is not None else None,
            "thread": self.thread,
            "seen": self.seen,
            "step": self.step,
        }


@dataclass(frozen=True, eq=False)
class Leaf:
    """A leaf tensor recorded by a trace (a parameter, or any tensor that requires grad)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    module: str | None = None
    ref: weakref.ReferenceType[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tensor(self) -> torch.Tensor | None:
        """The live tensor, or None once it was garbage collected."""
        return self.ref() if self.ref is not None else None

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "module": self.module,
        }


class StatBatch:
    """Statistics of several same-shaped parts, one row each (NOTE [batched statistics] in stats.py)."""

    __slots__ = ("norms", "absmax")

    def __init__(self, norms: torch.Tensor, absmax: torch.Tensor) -> None:
        self.norms = norms  # shape (k,), accumulated like `stats.norms`
        self.absmax = absmax


# A statistic as `read_floats` takes it: a 0-d device tensor, or (a batch's 1-d tensor, row).
StatRef = Union[torch.Tensor, "tuple[torch.Tensor, int]"]


class PartStats:
    """Device-side statistics of one part (not read back until asked).

    One small slotted object per (backward, leaf): a long trace holds many. ``norm`` / ``absmax`` are
    0-d tensors; a part measured in a batch (``batch`` set) hands out a view of its row on access,
    and ``norm_ref`` / ``absmax_ref`` for a read-back without creating one.
    """

    __slots__ = ("record", "epoch", "_norm", "_absmax", "dot_before", "tensor", "accumulated", "from_grad", "batch", "row")

    def __init__(
        self,
        record: int,
        epoch: int,
        norm: torch.Tensor | None,  # None only while deferred (see NOTE [deferred stats])
        absmax: torch.Tensor | None,
        dot_before: torch.Tensor | None,  # <part, .grad before it>, None when .grad was None
        tensor: torch.Tensor | None = None,  # keep="tensors" only
        accumulated: bool = False,
        from_grad: bool = False,  # stats were taken from the `.grad` AccumulateGrad stored (deferred)
    ) -> None:
        self.record = record
        self.epoch = epoch
        self._norm = norm
        self._absmax = absmax
        self.dot_before = dot_before
        self.tensor = tensor
        self.accumulated = accumulated
        self.from_grad = from_grad
        self.batch: StatBatch | None = None
        self.row = -1

    @property
    def norm(self) -> torch.Tensor | None:
        if self._norm is None and self.batch is not None:
            return self.batch.norms[self.row]
        return self._norm

    @norm.setter
    def norm(self, value: torch.Tensor | None) -> None:
        self._norm, self.batch = value, None if value is not None else self.batch

    @property
    def absmax(self) -> torch.Tensor | None:
        if self._absmax is None and self.batch is not None:
            return self.batch.absmax[self.row]
        return self._absmax

    @absmax.setter
    def absmax(self, value: torch.Tensor | None) -> None:
        self._absmax = value

    @property
    def norm_ref(self) -> StatRef | None:
        return (self.batch.norms, self.row) if self._norm is None and self.batch is not None else self._norm

    @property
    def absmax_ref(self) -> StatRef | None:
        return (self.batch.absmax, self.row) if self._absmax is None and self.batch is not None else self._absmax

    def __repr__(self) -> str:
        return f"PartStats(record={self.record}, epoch={self.epoch}, from_grad={self.from_grad})"


@dataclass(eq=False)
class Reduced:
    """An all-reduce replaced `.grad` after the parts of ``epoch`` (see NOTE [all-reduced .grad])."""

    epoch: int
    record: int
    world: int
    local_norm: torch.Tensor  # norm of the local .grad before the all-reduce
    local: torch.Tensor | None  # keep="tensors": a copy of it
    ptr: int  # storage of the averaged .grad
    version: int | None  # its _version, None when a shared bucket counter makes versions meaningless

    def holds(self, grad: torch.Tensor | None) -> bool:
        """Whether ``grad`` is still the averaged .grad the all-reduce left."""
        return (
            grad is not None
            and grad.data_ptr() == self.ptr
            and (self.version is None or grad._version == self.version)
        )


@dataclass(eq=False)
class EpochStart:
    """What `.grad` held when an epoch began."""

    epoch: int
    record: int  # the record whose part opened the epoch
    norm: torch.Tensor | None  # norm of the carried-in .grad (None: .grad was None)
    tensor: torch.Tensor | None  # keep="tensors": a copy of the carried-in .grad
    reason: Literal["start", "trace_start", "reset", "modified", "allreduce", "unmeasured"]
