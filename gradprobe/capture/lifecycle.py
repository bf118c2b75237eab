"""What a trace owns and takes off at its end: hook handles, entered contexts, and how they come off.

Place in the flow: capture. The :class:`~gradprobe.capture.recorder.Recorder` keeps one list of
owned removables (its own hooks, its interceptor mode, and whatever plugins hand it through
``trace.own(...)`` / ``trace.own_context(...)``) and takes them all off with :func:`remove_all` in the
trace's ``finally`` path, whether or not any plugin's ``gradprobe_trace_end`` ran.

# NOTE [interrupts during cleanup]
# A KeyboardInterrupt (or any signal handler that raises) can land between any two bytecodes of
# the main thread, including inside the cleanup itself. `remove_all` therefore removes the owned
# handles last-first, pops a handle only after its `remove()` returned, and when something raises
# in the middle it catches it, goes on with the rest (removal is idempotent, so the interrupted
# handle is simply removed again), and re-raises the first interruption once everything is off.
# Entered contexts are known to torch by identity (the function-mode stack, the saved-tensor hooks
# stack), so a handle is registered *before* its context is entered and its removal checks what is
# really on the stack: an interrupt between the push and the bookkeeping cannot leak the push.
# torch itself is not interrupt-safe in one place that matters here: `handle_torch_function` pops
# the running mode with a generator context manager (`_pop_mode_temporarily`) whose `finally`
# pushes it back. Interrupted inside, that generator is left suspended and pushes the mode back
# whenever it is garbage collected: after the trace removed it. `close_suspended_mode_pops` closes
# such generators found in the interrupt's traceback first, so the mode is back before it comes off.
# The trace calls `Recorder.remove` itself under `remove_all` (`Recorder.remove_retrying`), so an
# interrupt at the entry of `remove`, before any of its guards, only makes it run again.
# What pure Python cannot close: an interrupt raised at the very entry of `Trace.__exit__` (before
# its `try`), at the entry of the function its `finally` calls to remove everything
# (`Recorder.remove_retrying`, or `remove_all` itself, before their first bytecode: any call made
# from a `finally` has that window), inside the few bytecodes of `remove_all`'s own `except` clause, or between a
# `register_*_hook` call returning and its handle reaching `own()` (the recorder sweeps its own
# leaf hooks by identity after an interruption, which closes that window for the core). Blocking
# signals (`signal.pthread_sigmask`) would not help: it is per thread, and a signal delivered to any
# other thread still runs the Python handler on the main thread at its next bytecode; swapping the
# user's signal handlers on every trace is not a library's business.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol

import torch

__all__ = [
    "ContextEntry",
    "ModeEntry",
    "Removable",
    "SavedTensorsEntry",
    "TensorHookSweep",
    "close_suspended_mode_pops",
    "enter_context",
    "gc_paused",
    "remove_all",
]


# NOTE [no collections while hooking]
# Putting hooks on a model allocates a few small objects per tensor (a handle, its weak reference,
# the tensor's hook dict, gradprobe's per-leaf state), and each 700 allocations start a cyclic
# garbage collection; in a process that imported torch, with hundreds of thousands of objects
# tracked, some of those are full collections. On a 1,000-tensor model that made each hook
# registration cost ~45 µs instead of ~3 µs, and the per-part records made in the leaf hooks of a
# backward cost as much again. gradprobe creates no garbage cycles while it installs or removes
# hooks, runs a backward's hooks or closes a trace, so the collector is paused for those bulk steps
# and resumed afterwards in the state it was in; the allocations still count, so the collector runs
# once at its next chance instead of many times during the step. The only user code that runs
# paused is the backward pass itself (custom Functions' backward, user hooks): its garbage cycles,
# if any, are collected right after it instead of during it.


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bulk bookkeeping step (NOTE [no collections while hooking])."""
    enabled = gc.isenabled()
    try:
        if enabled:
            gc.disable()
        yield
    finally:
        if enabled:
            gc.enable()


class Removable(Protocol):
    """Anything with an idempotent ``remove()`` (``torch.utils.hooks.RemovableHandle`` is one)."""

    def remove(self) -> None: ...


def remove_all(handles: list[Any]) -> list[Exception]:
    """Remove every handle in ``handles`` (last first) and empty the list, whatever happens meanwhile.

    Args:
        handles: owned removables; emptied in place.

    Returns:
        The ordinary exceptions some ``remove()`` raised (that handle is dropped; the others still
        come off). An interruption (``KeyboardInterrupt``, ``SystemExit``) is re-raised once every
        handle is off (NOTE [interrupts during cleanup]).
    """
    interrupted: BaseException | None = None
    errors: list[Exception] = []
    while handles:
        try:
            while handles:
                handles[-1].remove()
                handles.pop()
        except Exception as exc:  # a broken remove(): drop that handle, go on with the rest
            if handles:
                handles.pop()
            errors.append(exc)
        except BaseException as exc:  # an interruption: retry the same handle (remove() is idempotent)
            if interrupted is None:
                interrupted = exc
    if interrupted is not None:
        raise interrupted
    return errors


class ModeEntry:
    """A ``TorchFunctionMode`` on the torch-function mode stack, removed by identity."""

    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def enter(self) -> Any:
        torch._C._push_on_torch_function_stack(self.mode)
        return self.mode

    def remove(self) -> None:
        mode = self.mode
        stack = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
        if not any(m is mode for m in stack):
            return  # never pushed, or already off
        above: list[Any] = []
        while True:  # normally one pop: ours is on top
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for other in reversed(above):  # a mode someone left above ours goes back where it was
            torch._C._push_on_torch_function_stack(other)


class SavedTensorsEntry:
    """A ``saved_tensors_hooks`` pair on autograd's default-hooks stack, removed by identity."""

    def __init__(self, hooks: torch.autograd.graph.saved_tensors_hooks) -> None:
        self.pair = (hooks.pack_hook, hooks.unpack_hook)

    def enter(self) -> None:
        torch._C._autograd._push_saved_tensors_default_hooks(*self.pair)

    def remove(self) -> None:
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        # Only the top pair can come off; one pushed after ours and never popped is not ours to pop.
        if top is not None and top[0] is self.pair[0] and top[1] is self.pair[1]:
            torch._C._autograd._pop_saved_tensors_default_hooks()


class ContextEntry:
    """Any other context manager: exited once, if its ``__enter__`` returned."""

    def __init__(self, context: Any) -> None:
        self.context: Any = context
        self.entered = False

    def enter(self) -> Any:
        value = self.context.__enter__()
        self.entered = True
        return value

    def remove(self) -> None:
        if self.entered:
            self.entered = False
            self.context.__exit__(None, None, None)


def enter_context(handles: list[Any], context: Any) -> tuple[Any, Any]:
    """Own ``context`` in ``handles`` first, then enter it; return ``(handle, what __enter__ gave)``.

    Function modes and saved-tensor hooks are pushed and popped by identity, so an interrupt
    between the push and the bookkeeping cannot leave them on torch's stacks.
    """
    entry: ModeEntry | SavedTensorsEntry | ContextEntry
    if isinstance(context, torch.overrides.TorchFunctionMode):
        entry = ModeEntry(context)
    elif isinstance(context, torch.autograd.graph.saved_tensors_hooks):
        entry = SavedTensorsEntry(context)
    else:
        entry = ContextEntry(context)
    handles.append(entry)
    return entry, entry.enter()


class TensorHookSweep:
    """Takes hooks for which ``ours(fn)`` holds off ``tensors`` (tensor and post-accumulate hooks).

    The fallback after an interruption: a hook registered just before the interrupt may have lost
    its handle on the way to the owned list (NOTE [interrupts during cleanup]). Costs a look at every
    hook of every tensor, so it runs only then.
    """

    def __init__(self, tensors: Iterable[torch.Tensor | None], ours: Callable[[Any], bool]) -> None:
        self.tensors = [t for t in tensors if t is not None]
        self.ours = ours

    def remove(self) -> None:
        for tensor in self.tensors:
            for hooks in (tensor._backward_hooks, getattr(tensor, "_post_accumulate_grad_hooks", None)):
                if hooks:
                    for key in [key for key, fn in list(hooks.items()) if self.ours(fn)]:
                        hooks.pop(key, None)


_POP_MODE_CODE = getattr(getattr(torch.overrides, "_pop_mode_temporarily", None), "__wrapped__", None)
_POP_MODE_CODE = getattr(_POP_MODE_CODE, "__code__", None)


def close_suspended_mode_pops(*tracebacks: TracebackType | None) -> None:
    """Close torch's ``_pop_mode_temporarily`` generators an interrupt left suspended in ``tracebacks``.

    Closing one runs its ``finally``: the mode it popped goes back on the stack now, where the
    trace's removal finds it, instead of whenever the generator is collected (NOTE [interrupts during cleanup]).
    """
    for tb in tracebacks:
        while tb is not None:
            manager = tb.tb_frame.f_locals.get("self")
            gen = getattr(manager, "gen", None)
            if (
                isinstance(manager, contextlib._GeneratorContextManager)
                and getattr(gen, "gi_code", None) is _POP_MODE_CODE
                and gen.gi_frame is not None
            ):
                gen.close()
            tb = tb.tb_next
