"""DistributedDataParallel: local parts vs the all-reduced `.grad`, and parameters DDP will wait for.

# NOTE [what a rank sees under DDP]
# Each rank runs its own trace. A leaf's tensor hook sees this rank's local part, before any
# communication; the post-accumulate hook sees the local `.grad` (what `.grad` held + the local
# part); only then does DDP's reducer (a hook on the AccumulateGrad node, which runs after the
# post-accumulate hooks) copy it into a bucket, and at the end of the backward the averaged bucket
# is copied back into `.grad` (or `.grad` is the bucket view itself, with gradient_as_bucket_view).
# So after a synchronising backward, `.grad` is the average over ranks, not the sum of this rank's
# parts. The plugin keeps the local `.grad`'s norm (and a copy, with keep="tensors") from its own
# post-accumulate hook, and tells the ledger about the all-reduce (NOTE [all-reduced .grad] in
# ledger/ledger.py): the Σ check then compares the parts with the local `.grad`, exactly as before, and
# the report says which number is which. Whether the all-reduce itself agreed across ranks is
# checked by `Trace.gather()` (the averaged `.grad` must be identical on every rank).

# NOTE [does this backward synchronise?]
# DDP decides in its forward: the reducer prepares a synchronising backward when grad is enabled
# and `require_backward_grad_sync` is set (it is cleared inside `ddp.no_sync()`). A forward
# pre-hook on the DDP module records that decision; the next traced backward consumes it. A DDP
# module found only at the backward (its forward ran before the trace saw it) falls back to the
# flag's current value.

# NOTE [unused parameters]
# With find_unused_parameters=False the reducer waits for a gradient for every parameter it manages
# before it all-reduces. A synchronising backward that reaches none of a parameter leaves that
# reduction unfinished, and the NEXT forward raises "Expected to have finished reduction in the
# prior iteration before starting a new one", naming parameter indices only. The ledger knows at
# the end of that backward which managed parameters got no part, so the finding comes one forward
# earlier, with names, DDP's indices (the order of DDP's _build_params_for_reducer), and the loss
# that did not reach them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gradprobe.ledger.stats import norms
from gradprobe.capture.sites import frame_locals, user_frame
from gradprobe.findings import Finding
from gradprobe.hookspecs import hookimpl
from gradprobe._format import number

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.hooks import RemovableHandle

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.ledger.ledger import BackwardRecord, LeafState
    from gradprobe.api.trace import Trace

__all__ = ["DdpPlugin", "ddp_parameters"]

UNUSED = "GP721"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ddp_parameters(ddp: DistributedDataParallel) -> list[tuple[str, torch.Tensor]]:
    """The parameters DDP's reducer manages, as (qualified name, parameter), in the reducer's index order."""
    ignore = getattr(ddp, "parameters_to_ignore", set())
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for module_name, module in ddp.module.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            qual = f"{module_name}.{param_name}" if module_name else param_name
            if param.requires_grad and f"{module_name}.{param_name}" not in ignore and id(param) not in seen:
                seen.add(id(param))
                found.append((qual, param))
    return found


class _Watched:
    """One DDP module seen by the trace."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        self.ref = weakref.ref(ddp)
        self.params = ddp_parameters(ddp)
        self.sync: bool | None = None  # decision of the last forward (None: no forward seen)


class DdpPlugin:
    """Marks all-reduced `.grad` for the breakdown, adds a DDP section, flags parameters DDP waits for."""

    gradprobe_name = "ddp"

    def __init__(self) -> None:
        self.watched: dict[int, _Watched] = {}
        self.rank = 0
        self.world = 1
        self._handles: list[RemovableHandle] = []
        self._hooked: set[int] = set()  # id(LeafState) with a post-accumulate hook of ours
        self._local: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}  # id(state) -> (record, ‖L‖, L)
        self._current: int | None = None

    # -- finding DDP modules -----------------------------------------------------------------

    def _scan(self, frame: Any) -> None:
        if frame is None or not _distributed():
            return
        from torch.nn.parallel import DistributedDataParallel

        for scope in (frame_locals(frame), frame.f_globals):
            for value in list(scope.values()):
                if isinstance(value, DistributedDataParallel) and id(value) not in self.watched:
                    watched = _Watched(value)
                    self.watched[id(value)] = watched
                    self._handles.append(value.register_forward_pre_hook(self._pre_forward_hook(watched)))
        if self.watched:
            self.rank = torch.distributed.get_rank()
            self.world = torch.distributed.get_world_size()

    @staticmethod
    def _pre_forward_hook(watched: _Watched) -> Any:
        def hook(module: Any, args: Any) -> None:  # NOTE [does this backward synchronise?]
            watched.sync = torch.is_grad_enabled() and bool(module.require_backward_grad_sync)

        return hook

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        if _distributed():
            self._scan(user_frame(2))

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # -- per backward ------------------------------------------------------------------------

    def _state(self, trace: Trace, param: torch.Tensor) -> LeafState | None:
        state = trace._by_id.get(id(param))
        return state if state is not None and state.leaf.tensor is param else None

    def _hook_local(self, trace: Trace, state: LeafState, param: torch.Tensor) -> None:
        keep = trace.keep == "tensors"

        def on_local(p: torch.Tensor) -> None:  # runs before DDP's reducer reads .grad
            if trace._muted or p.grad is None or self._current is None:
                return
            with torch.no_grad():
                g = p.grad.detach()
                self._local[id(state)] = (self._current, norms(g)[0], g.clone() if keep else None)

        self._handles.append(param.register_post_accumulate_grad_hook(on_local))
        self._hooked.add(id(state))

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        self._current = None
        if call.kind != "backward" or not _distributed():
            return
        self._scan(call.frame)
        if not self.watched:
            return
        self._current = call.index
        for watched in self.watched.values():
            for _, param in watched.params:
                state = self._state(trace, param)
                if state is not None and id(state) not in self._hooked:
                    self._hook_local(trace, state, param)

    @hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: BackwardRecord, error: BaseException | None) -> None:
        current, self._current = self._current, None
        if current is None or error is not None:
            return
        for watched in list(self.watched.values()):
            ddp = watched.ref()
            if ddp is None:
                continue
            sync = watched.sync if watched.sync is not None else bool(ddp.require_backward_grad_sync)
            watched.sync = None
            if not sync:
                continue
            reached, unused = [], []
            for index, (qual, param) in enumerate(watched.params):
                state = self._state(trace, param)
                if state is None:
                    continue
                if state.parts and state.parts[-1].record == record.index:
                    reached.append(state)
                else:
                    unused.append((index, qual, state))
            if unused and not ddp.find_unused_parameters and not getattr(ddp, "static_graph", False):
                # the all-reduce never finishes: .grad stays local on every rank (NOTE [unused parameters])
                self._local.clear()
                trace.emit(self._unused_finding(trace, record, ddp, unused))
                continue
            for state in reached:
                local = self._local.pop(id(state), None)
                if local is not None and local[0] == record.index:
                    trace._ledger.on_reduced(
                        state, record, local[1], local[2], self.world, shared_version=bool(ddp.gradient_as_bucket_view)
                    )

    def _unused_finding(
        self, trace: Trace, record: BackwardRecord, ddp: DistributedDataParallel, unused: list[tuple[int, str, Any]]
    ) -> Finding:
        names = [state.leaf.name for _, _, state in unused]
        indices = [index for index, _, _ in unused]
        modules = sorted({state.leaf.module for _, _, state in unused if state.leaf.module})
        shown = ", ".join(f"{n} (#{i})" for n, i in list(zip(names, indices))[:6])
        if len(names) > 6:
            shown += f" and {len(names) - 6} more"
        branch = f" (module{'s' * (len(modules) > 1)} {', '.join(modules)})" if modules else ""
        return Finding(
            code=UNUSED,
            kind="ddp_unused_parameters",
            severity="error",
            message=(
                f"rank {self.rank}: `{record.name}` reached no gradient for {len(names)} parameter"
                f"{'s' * (len(names) != 1)} that DistributedDataParallel waits for: {shown}{branch}; "
                "DDP (find_unused_parameters=False) cannot finish this iteration's all-reduce, so the next "
                "forward raises \"Expected to have finished reduction in the prior iteration\" "
                f"(parameter indices {' '.join(map(str, indices))})"
            ),
            site=record.site,
            fix=(
                f"make `{record.name}` depend on those parameters (add the skipped branch's loss), "
                "freeze them with requires_grad_(False) before wrapping the model in DDP, or construct "
                "DistributedDataParallel(..., find_unused_parameters=True)"
            ),
            plugin="ddp",
            data={"rank": self.rank, "parameters": names, "indices": indices, "loss": record.name},
        )

    # -- report ------------------------------------------------------------------------------

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any] | None:
        if not self.watched:
            return None
        title = Text(f"DDP · rank {self.rank} of {self.world}", style="bold")
        note = Text(
            "the breakdown's parts are this rank's LOCAL gradients (before the all-reduce) and add up to the "
            "local .grad; ‖.grad‖ is the all-reduced AVERAGE over ranks. t.gather() compares the ranks.",
            style="italic",
        )
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("leaf", style="bold")
        table.add_column("local ‖.grad‖\nbefore all-reduce", justify="right")
        table.add_column("‖.grad‖\naverage", justify="right")
        rows = [row for row in trace.breakdown() if row.world is not None]
        for row in rows[:12]:
            table.add_row(row.leaf.name, number(row.local_norm), number(row.grad_norm))
        parts: list[Any] = [title, note]
        if rows:
            parts.append(table)
            if len(rows) > 12:
                parts.append(Text(f"… {len(rows) - 12} more leaves (t.breakdown() has all)", style="dim"))
        return [Group(*parts)]
