"""Leaves hidden inside reentrant ``torch.utils.checkpoint`` regions.

# NOTE [reentrant checkpoint leaves]
# `checkpoint(fn, x, use_reentrant=True)` records one `CheckpointFunctionBackward` node whose graph
# has no edges to the parameters used inside `fn`: they are reached only by the nested backward
# the node runs after recomputing `fn`. A trace of every leaf discovers leaves by walking the
# root's graph, so it would never see them. The node is the autograd.Function's ctx and keeps
# `run_function`, so the modules `fn` uses are found from it: a module, a bound method of one, a
# functools.partial, or a function's closure cells, defaults and the globals its code names.
# (`use_reentrant=False` records ordinary edges to the parameters and needs none of this.)
# Parts are not affected either way: hooks of the nested backward carry a graph-task id nobody
# bound, and belong to the traced call running on that thread (NOTE [which backward a hook
# belongs to] in recorder.py), so a recomputation never adds a record or a second part.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

__all__ = ["checkpoint_leaves"]


def checkpoint_leaves(node: Any) -> list[torch.Tensor] | None:
    """Parameters used inside the reentrant checkpoint region ``node``; None when ``node`` is not one."""
    if type(node).__name__ != "CheckpointFunctionBackward":
        return None
    fn = getattr(node, "run_function", None)
    found: dict[int, torch.Tensor] = {}
    for module in _modules_of(fn, depth=2):
        for p in module.parameters():
            if p.requires_grad:
                found.setdefault(id(p), p)
    return list(found.values())


def _modules_of(fn: Any, depth: int) -> list[nn.Module]:
    if isinstance(fn, nn.Module):
        return [fn]
    if depth < 0 or fn is None:
        return []
    if isinstance(fn, functools.partial):
        objs = [fn.func, *fn.args, *fn.keywords.values()]
    elif hasattr(fn, "__self__") and hasattr(fn, "__func__"):  # bound method
        objs = [fn.__self__, fn.__func__]
    elif hasattr(fn, "__code__"):
        code = fn.__code__
        objs = [cell.cell_contents for cell in (fn.__closure__ or ()) if _filled(cell)]
        objs += list(fn.__defaults__ or ())
        globs = getattr(fn, "__globals__", {})
        objs += [globs[name] for name in code.co_names if name in globs]
    else:
        return []
    modules: list[nn.Module] = []
    for obj in objs:
        if isinstance(obj, nn.Module):
            modules.append(obj)
        elif isinstance(obj, (list, tuple)):
            modules += [o for o in obj if isinstance(o, nn.Module)]
        elif callable(obj) and not isinstance(obj, type):
            modules += _modules_of(obj, depth - 1)
    return modules


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True
