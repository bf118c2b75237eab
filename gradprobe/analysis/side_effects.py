"""Keeping gradprobe's extra autograd passes (decomposition) free of side effects on the user's program.

# NOTE [no hidden side effects]
# Splitting a backward runs parts of the user's graph again (``autograd.grad`` per loss, before the
# user's own backward). Everything in that graph that is not a pure function of its inputs would
# then run more often than without the trace:
# - the global RNG: a backward that draws random numbers would shift the user's stream. The passes
#   run under ``torch.random.fork_rng`` over the CPU and every CUDA device of the leaves and root.
# - user tensor hooks (``t.register_hook``) on tensors in the graph: each hook dict is emptied while
#   the passes run and refilled (same dict, same order, same handle ids) before the user's backward.
#   The C++ side keeps a reference to that very dict, so an emptied dict is a hook that runs nothing.
#   Hooks on non-leaf tensors are seen when registered inside the trace (the interceptor watches
#   ``Tensor.register_hook``); hooks on traced leaves are read off the leaf. A hook may change the
#   gradient, so a backward with suppressed hooks always computes every part: the Σ check then says
#   whether the parts (taken without the hooks) add up to what the backward really added.
# - ``retain_grad()`` tensors: their hook writes ``.grad`` in every pass; the ``.grad`` each had
#   before the passes is put back afterwards (the hook replaces ``.grad``, never writes into it).
# - custom ``autograd.Function`` nodes: their backward may keep state, free ``ctx`` buffers (the
#   user's real backward would then crash), talk to other ranks, or call ``backward()`` itself
#   (reentrant checkpointing accumulates into ``.grad``). gradprobe cannot tell (torch.compile's
#   AOTAutograd Function excepted: a functional graph of saved tensors), so a backward whose
#   graph holds one is not split, with one info finding (GP410) naming the Function and its line,
#   unless the class says its backward is pure: ``gradprobe_pure_backward = True`` on the class (or
#   the class is in ``PURE_BACKWARD_FUNCTIONS``, which plugins may extend).
# - module backward hooks (``register_full_backward_hook``) run as hooks on a torch-internal
#   Function node, where nothing can switch them off: such a backward is not split (GP410).
# Not seen: hooks registered on non-leaf tensors before the trace started, hooks registered on
# graph nodes directly (``t.grad_fn.register_hook``), and saved-tensor hooks (activation
# checkpointing unpacks, and so recomputes, once more per pass). The README says so.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from gradprobe.capture.sites import user_site

__all__ = ["PURE_BACKWARD_FUNCTIONS", "Hazards", "HookBook", "quiet_passes", "scan"]

# Function classes whose backward is known to be a pure function of (ctx, grad_outputs).
PURE_BACKWARD_FUNCTIONS: set[type] = set()

_GRADPROBE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep


class HookBook:
    """Tensor hooks and ``retain_grad`` calls seen inside a decomposing trace, keyed by ``grad_fn``.

    Holds graph nodes (not tensors) like :class:`~gradprobe.analysis.losses.LossBook`, and is
    released with it (after a backward that frees its graph, and at the end of the trace).
    """

    def __init__(self) -> None:
        self.hooks: dict[Any, list[tuple[Any, str]]] = {}  # grad_fn -> [(hook dict, where registered)]
        self.retained: dict[Any, list[weakref.ref[torch.Tensor]]] = {}

    def on_register_hook(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
            hooks = tensor._backward_hooks
            if hooks is not None:
                site = user_site(2)
                where = f"tensor hook registered at {site}" if site is not None else "tensor hook"
                entries = self.hooks.setdefault(tensor.grad_fn, [])
                if all(h is not hooks for h, _ in entries):
                    entries.append((hooks, where))
        return out

    def on_retain_grad(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
            self.retained.setdefault(tensor.grad_fn, []).append(weakref.ref(tensor))
        return out

    def release(self) -> None:
        self.hooks.clear()
        self.retained.clear()


@dataclass
class Hazards:
    """What in one backward's graph the extra passes must not run, or must run quietly."""

    blocking: list[str] = field(default_factory=list)  # reasons not to split this backward
    hook_dicts: list[Any] = field(default_factory=list)  # tensor hook dicts to empty during the passes
    hook_names: list[str] = field(default_factory=list)  # the user's hooks among them, for the note
    retained: list[torch.Tensor] = field(default_factory=list)  # retain_grad tensors whose .grad to restore


def _function_where(cls: type) -> str:
    backward = getattr(cls, "backward", None)
    target = getattr(backward, "__func__", backward)
    try:
        filename = inspect.getsourcefile(target) or inspect.getfile(cls)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(target)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return f"custom autograd.Function {cls.__qualname__}"
    return f"custom autograd.Function {cls.__qualname__} ({os.path.basename(filename)}:{line})"


def _compiled(cls: type) -> bool:
    """torch.compile's AOTAutograd Function: its backward is a functional graph of saved tensors
    (random masks saved from the forward), run again under retain_graph as any built-in node."""
    return cls.__name__ == "CompiledFunction" and cls.__module__.startswith("torch._functorch.")


def _user_hook_names(hooks: Any) -> list[str]:
    """Names of the hooks in a tensor's hook dict that are not gradprobe's own."""
    out = []
    for fn in list(hooks.values()):
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None and code.co_filename.startswith(_GRADPROBE_DIR):
            continue
        out.append(getattr(fn, "__qualname__", None) or type(fn).__name__)
    return out


def scan(nodes: Any, leaves: list[torch.Tensor], book: HookBook) -> Hazards:
    """Look through the nodes the passes will run (and the leaves they end at) for side effects."""
    from torch.nn.modules._functions import BackwardHookFunction

    out = Hazards()
    seen_cls: set[type] = set()
    for node in nodes:
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls not in seen_cls:
            seen_cls.add(cls)
            if cls is BackwardHookFunction:
                out.blocking.append(
                    "a module backward hook (register_full_backward_hook / register_full_backward_pre_hook) "
                    "runs in this backward, and gradprobe cannot keep it from running in its extra passes"
                )
            elif not (getattr(cls, "gradprobe_pure_backward", False) or cls in PURE_BACKWARD_FUNCTIONS or _compiled(cls)):
                out.blocking.append(
                    f"the {_function_where(cls)} may not be safe to run twice (state, freed ctx buffers); "
                    "if its backward is a pure function of ctx and its inputs, set "
                    "`gradprobe_pure_backward = True` on the class"
                )
        entries = book.hooks.get(node)
        if entries:
            for hooks, where in entries:
                names = _user_hook_names(hooks)
                if names:
                    out.hook_dicts.append(hooks)
                    out.hook_names.append(f"{', '.join(names)} ({where})")
        for ref in book.retained.get(node, ()):
            tensor = ref()
            if tensor is not None:
                out.retained.append(tensor)
    for leaf in leaves:
        hooks = leaf._backward_hooks
        if hooks:
            out.hook_dicts.append(hooks)  # gradprobe's own leaf hooks are muted anyway
            names = _user_hook_names(hooks)
            if names:
                out.hook_names.append(f"{', '.join(names)} (hook on leaf)")
    return out


def _cuda_devices(tensors: list[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def quiet_passes(hazards: Hazards, tensors: list[torch.Tensor]) -> Iterator[None]:
    """Run gradprobe's passes with the RNG forked, user hooks emptied and retained ``.grad`` restored.

    ``tensors``: the root and the leaves (their devices are the RNG streams to fork).
    """
    saved_hooks = [(d, list(d.items())) for d in hazards.hook_dicts]
    saved_grads = [(t, t.grad) for t in hazards.retained]
    devices = _cuda_devices(tensors)
    try:
        for d, _ in saved_hooks:
            d.clear()
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        for d, items in saved_hooks:
            d.clear()
            d.update(items)
        for t, grad in saved_grads:
            t.grad = grad
