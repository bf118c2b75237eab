"""GP301 / GP302 / GP303 ``inplace_saved``: an in-place write to a tensor autograd saved for backward.

# NOTE [saved-tensor hooks must keep PyTorch's version check]
# While the trace is active, a `saved_tensors_hooks` pair records every tensor autograd saves:
# a detached alias (it shares the version counter and storage, and holds no grad_fn, so no
# reference cycle), the alias's `_version` at save time and the user's line. ANY saved-tensor hooks,
# even identity ones, switch off PyTorch's own "modified by an inplace operation" check, so the
# unpack hook redoes it and raises a RuntimeError (GP302) when the version moved: gradients must
# never go silently wrong because gradprobe is watching.
# At each in-place write the interceptor reports (gradprobe_inplace_write), the written tensor's
# storage is looked up among the saved ones. A write that moves the saved tensor's version counter
# is reported right there (GP301). A write through an alias autograd does not track (`x.data.add_()`,
# which PyTorch never notices) leaves the version alone; that is only knowable after the write, so it
# is checked at the next event (write, backward, end of trace) and reported as GP303.
# Only the innermost saved_tensors_hooks is active: inside torch.utils.checkpoint or
# save_on_cpu regions this detector sees nothing (and PyTorch's own check is theirs to keep).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from gradprobe.capture.sites import Site, name_in_frame, user_frame, user_site
from gradprobe.exceptions import GradProbeError
from gradprobe.findings import Finding, RelatedSite
from gradprobe.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gradprobe.capture.calls import BackwardCall
    from gradprobe.api.trace import Trace

__all__ = ["InplaceSaved"]

_OPTIMIZER_OPS = frozenset({"add_", "addcdiv_", "addcmul_", "lerp_", "mul_", "sub_", "copy_", "div_"})


class _Saved:
    """One tensor autograd saved: a detached alias, its version then, and where it was saved."""

    __slots__ = ("alias", "ref", "version", "site", "op", "written", "__weakref__")

    def __init__(self, alias: torch.Tensor, site: Site | None, op: str) -> None:
        self.alias = alias
        self.version = alias._version
        self.site = site
        self.op = op
        self.written: tuple[Site | None, str] | None = None


class InplaceSaved:
    """In-place writes to saved tensors, caught at the write (and re-checked at unpack)."""

    default = False  # saved-tensor hooks with a stack walk per saved tensor: see README "Overhead"
    gradprobe_name = "inplace_saved"

    def __init__(self) -> None:
        self._by_storage: dict[int, list[weakref.ReferenceType[_Saved]]] = {}
        self._hooks: Any = None
        self._trace: Trace | None = None
        self._pending: list[tuple[_Saved, int, Site | None, str]] = []
        self._reported: set[int] = set()
        self._packs = 0

    # -- saved-tensor hooks --------------------------------------------------------------------

    @hookimpl
    def gradprobe_trace_start(self, trace: Trace) -> None:
        if torch._C._are_functorch_transforms_active():
            return
        self._trace = trace
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    @hookimpl
    def gradprobe_trace_end(self, trace: Trace) -> None:
        self._resolve(trace)
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(None, None, None)
        self._by_storage.clear()

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        with torch._C.DisableTorchFunction():  # gradprobe's own calls skip the interceptor
            alias = tensor.detach()
            grad_fn = tensor.grad_fn
            key = _storage_key(alias)
        saved = _Saved(alias, user_site(2), type(grad_fn).__name__ if grad_fn is not None else "")
        saved.ref = weakref.ref(tensor)
        if key is not None:
            self._by_storage.setdefault(key, []).append(weakref.ref(saved))
        self._packs += 1
        if self._packs % 4096 == 0:
            self._sweep()
        return saved

    def _unpack(self, saved: _Saved) -> torch.Tensor:
        alias = saved.alias
        if alias._version != saved.version:
            raise self._version_error(saved)
        return alias

    def _version_error(self, saved: _Saved) -> RuntimeError:
        alias = saved.alias
        related = []
        if saved.site is not None:
            related.append(RelatedSite(saved.site.filename, saved.site.lineno, "saved the tensor for backward"))
        if saved.written is not None and saved.written[0] is not None:
            where, func = saved.written
            related.append(RelatedSite(where.filename, where.lineno, f"`{func}` wrote to it in place"))
        finding = Finding(
            code="GP302",
            kind="inplace_saved",
            severity="error",
            message=(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{alias.type()} {list(alias.shape)}] saved for backward at {saved.site or '?'} is at version "
                f"{alias._version}; expected version {saved.version} instead"
            ),
            site=user_site(3) or saved.site,
            related=tuple(related),
            fix="find the in-place write after that line (gradprobe reports it as GP301) and make it out-of-place, "
            "or .clone() the tensor before writing",
            plugin="inplace_saved",
        )
        if self._trace is not None:
            self._trace._add_finding(finding, "record")
        return GradProbeError(finding.format(), finding)

    def _sweep(self) -> None:
        for key in list(self._by_storage):
            alive = [ref for ref in self._by_storage[key] if ref() is not None]
            if alive:
                self._by_storage[key] = alive
            else:
                del self._by_storage[key]

    # -- writes --------------------------------------------------------------------------------

    @hookimpl
    def gradprobe_inplace_write(
        self, trace: Trace, tensors: Iterable[torch.Tensor], func: Callable[..., Any], site: Site | None
    ) -> None:
        if self._pending:
            self._resolve(trace)
        name = getattr(func, "__name__", str(func))
        for tensor in tensors:
            refs = self._by_storage.get(_storage_key(tensor))
            if not refs:
                continue
            for ref in refs:
                saved = ref()
                if saved is None or saved.alias._version != saved.version or id(saved) in self._reported:
                    continue
                if tensor is saved.ref() or _tracks_version(tensor):
                    self._reported.add(id(saved))
                    saved.written = (site, name)
                    trace.emit(self._write_finding(trace, tensor, saved, name, site))
                else:
                    self._pending.append((saved, saved.alias._version, site, name))

    @hookimpl
    def gradprobe_before_backward(self, trace: Trace, call: BackwardCall) -> None:
        if self._pending:
            self._resolve(trace)

    def _resolve(self, trace: Trace) -> None:
        pending, self._pending = self._pending, []
        sites = set()
        for saved, version, site, name in pending:
            if saved.alias._version == version and id(saved) not in self._reported:
                self._reported.add(id(saved))
                if (site, name) not in sites:
                    sites.add((site, name))
                    trace.emit(self._untracked_finding(saved, name, site))

    def _write_finding(
        self, trace: Trace, tensor: torch.Tensor, saved: _Saved, func: str, site: Site | None
    ) -> Finding:
        frame = user_frame(2)
        state = trace._by_id.get(id(tensor))
        name = state.leaf.name if state is not None and state.leaf.tensor is tensor else name_in_frame(frame, tensor)
        what = f"`{name}`" if name else f"a tensor of shape {list(tensor.shape)}"
        saver = f"{saved.op}'s output" if saved.op else "it"
        related = [RelatedSite(saved.site.filename, saved.site.lineno, f"saved {what} for backward")] if saved.site else []
        optimizer = tensor.is_leaf and tensor.requires_grad and (func in _OPTIMIZER_OPS or func.startswith("_foreach_"))
        if optimizer:
            return Finding(
                code="GP301",
                kind="inplace_saved",
                severity="warning",
                message=(
                    f"`{func}` (an optimizer step?) updates parameter {what} in place while a graph that saved it "
                    f"at {saved.site or '?'} is still alive: a backward through that graph will raise "
                    "\"modified by an inplace operation\""
                ),
                site=site,
                related=tuple(related),
                fix="run every backward through that graph before optimizer.step() (or add the losses and call "
                "backward once), or run the forward again after the step",
                plugin="inplace_saved",
                data={"func": func},
            )
        return Finding(
            code="GP301",
            kind="inplace_saved",
            severity="error",
            message=(
                f"`{func}` writes in place to {what}, which autograd saved for backward ({saver}) at "
                f"{saved.site or '?'}: the backward through it will raise \"modified by an inplace operation\""
            ),
            site=site,
            related=tuple(related),
            fix=f"use the out-of-place form (e.g. `x = x.{func.rstrip('_').strip('_')}(...)`, "
            "`nn.ReLU(inplace=False)`, `x = x + 1` instead of `x += 1`), or `.clone()` the tensor before writing",
            plugin="inplace_saved",
            data={"func": func},
        )

    def _untracked_finding(self, saved: _Saved, func: str, site: Site | None) -> Finding:
        related = [RelatedSite(saved.site.filename, saved.site.lineno, "saved the tensor for backward")] if saved.site else []
        return Finding(
            code="GP303",
            kind="inplace_saved",
            severity="warning",
            message=(
                f"`{func}` wrote into a tensor saved for backward through an alias autograd does not track "
                "(`.data`?): PyTorch will not notice, and the backward will silently use the new values"
            ),
            site=site,
            related=tuple(related),
            fix="write under `with torch.no_grad():` to the tensor itself (not `.data`) so PyTorch's version check "
            "sees it, or finish the backward before the write",
            plugin="inplace_saved",
            data={"func": func},
        )


def _storage_key(tensor: torch.Tensor) -> int | None:
    """Address of the memory a tensor lives in (None for sparse / nested tensors without one storage)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tracks_version(tensor: torch.Tensor) -> bool:
    """Whether a write to ``tensor`` moves the version counter autograd checks (not a `.data` alias)."""
    return tensor.requires_grad or tensor._base is not None
