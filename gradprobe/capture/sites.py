"""Where in the user's code something happened, and what the user called it.

Every finding and record points at *the user's* line: the first frame on the stack that belongs
neither to torch nor to gradprobe (nor to a handful of stdlib plumbing modules).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
import threading
from types import FrameType
from typing import Any

import torch

from gradprobe.findings import Site

__all__ = [
    "TORCH_DIR",
    "Site",
    "caller_outside_libraries",
    "expression_at",
    "frame_locals",
    "library_of",
    "name_in_frame",
    "site_of",
    "user_frame",
    "user_site",
]

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # torch's own frames are never the user's
_GRADPROBE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # the whole package
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_STDLIB_PLUMBING = tuple(
    _STDLIB_DIR + name for name in ("contextlib.py", "threading.py", "functools.py", "runpy.py")
)


@functools.lru_cache(maxsize=4096)
def _is_internal(filename: str) -> bool:
    if filename.startswith((TORCH_DIR, _GRADPROBE_DIR)):
        return True
    return filename.startswith(("<frozen", *_STDLIB_PLUMBING))


def user_frame(depth: int = 1) -> FrameType | None:
    """Return the innermost frame of user code, skipping torch, gradprobe and stdlib plumbing."""
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


# NOTE [library call sites]
# Training stacks call `loss.backward()` for the user (Lightning's `manual_backward`, accelerate's
# `accelerator.backward`, the HF Trainer): the first frame outside torch is the library's line,
# which tells the user nothing. A backward call's site is then the first frame further up that is
# outside these libraries: the script line that called `trainer.fit()` / `trainer.train()`. The
# call keeps its name from the library's line (`loss`), and detectors keep the library frame for
# its locals. The moved site says where the call really was: `Site.library` ("accelerate"), shown
# as `train.py:40 (inside accelerate)` in the calls table, findings and `to_dict()`
# ("site_library"). Only the libraries below are skipped: a user's own package in site-packages is code
# they can change.
_TRAINING_LIBRARIES = frozenset(
    {
        "accelerate",
        "composer",
        "deepspeed",
        "fastai",
        "ignite",
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",
        "transformers",
    }
)
_PACKAGES_DIR = re.compile(r"[\\/](?:site|dist)-packages[\\/]([^\\/]+)")


@functools.lru_cache(maxsize=1024)
def library_of(filename: str) -> str | None:
    """The training library (``"accelerate"``, ``"lightning"`` ...) a file belongs to, if any."""
    match = _PACKAGES_DIR.search(filename)
    if match is None:
        return None
    name = match.group(1).split(".")[0]
    return name if name in _TRAINING_LIBRARIES else None


def caller_outside_libraries(frame: FrameType | None) -> FrameType | None:
    """The first frame from ``frame`` up that is neither internal nor in a training library (NOTE above)."""
    while frame is not None and (_is_internal(frame.f_code.co_filename) or library_of(frame.f_code.co_filename)):
        frame = frame.f_back
    return frame


def site_of(frame: FrameType | None) -> Site | None:
    """The :class:`Site` a frame is at now (``None`` for no frame)."""
    if frame is None:
        return None
    return Site(frame.f_code.co_filename, frame.f_lineno)


def user_site(depth: int = 1) -> Site | None:
    """Return the :class:`Site` of the innermost user frame (``None`` on a thread with no user frame)."""
    return site_of(user_frame(depth + 1))


# NOTE [f_locals snapshots]
# Before Python 3.13, reading `frame.f_locals` of a function frame copies the fast locals into a
# dict cached on the frame, and that dict keeps every value alive until the frame re-syncs it or
# returns: naming a loss would keep the user's model (or last graph) alive after `del model`. So
# gradprobe takes a copy and empties the cached dict again, unless someone else holds it (a
# `locals()` result, a debugger). Emptying is safe: CPython writes the dict back to the fast locals
# only for keys present in it. From 3.13 on `f_locals` is a write-through proxy: never clear it.
_CO_OPTIMIZED = 0x0001
_RELEASE_SNAPSHOTS = sys.version_info < (3, 13)


def frame_locals(frame: FrameType) -> dict[str, Any]:
    """A copy of ``frame``'s local variables that leaves no strong references behind on the frame."""
    snapshot = frame.f_locals
    values = dict(snapshot)
    if _RELEASE_SNAPSHOTS and frame.f_code.co_flags & _CO_OPTIMIZED and type(snapshot) is dict:
        # references: the frame's cache, `snapshot`, and getrefcount's argument
        if sys.getrefcount(snapshot) <= 3:
            snapshot.clear()
    return values


def name_in_frame(frame: FrameType | None, obj: Any) -> str | None:
    """Return the name a local (or, at module level, global) variable of ``frame`` binds to ``obj``."""
    if frame is None:
        return None
    for name, value in frame_locals(frame).items():
        if value is obj and not name.startswith("_"):
            return name
    return None


# `a.backward(` / `torch.autograd.backward(` / `autograd.grad(` as written on the user's line.
_METHOD_CALL = re.compile(r"(?P<expr>[\w\.\[\]\"'\(\) +\-*/]+?)\s*\.\s*backward\s*\(")
_FUNCTION_CALL = re.compile(r"(?:torch\.)?(?:autograd\.)?(?P<fn>backward|grad)\s*\(\s*(?P<arg>[^,=]+?)\s*[,)]")


def expression_at(site: Site | None, kind: str) -> str | None:
    """Return the expression a backward/grad call on ``site``'s line was made on, if it reads cleanly.

    ``loss_cls.backward(retain_graph=True)`` gives ``loss_cls``, ``(l1 + l2).backward()`` gives
    ``l1 + l2`` and ``torch.autograd.grad(loss, params)`` gives ``loss``.
    """
    if site is None:
        return None
    line = site.source
    if not line:
        return None
    if kind == "method":
        match = _METHOD_CALL.search(line)
        expr = match.group("expr") if match else None
    else:
        fmatch = _FUNCTION_CALL.search(line)
        expr = fmatch.group("arg") if fmatch else None
    if not expr:
        return None
    expr = expr.strip()
    if "=" in expr:  # `total = l1 + l2).backward(` never happens, but `x = y.backward()` does
        expr = expr.rsplit("=", 1)[1].strip()
    while expr.startswith("(") and expr.endswith(")") and _balanced(expr[1:-1]):
        expr = expr[1:-1].strip()
    if not expr or not _balanced(expr):
        return None
    return expr


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def thread_name() -> str:
    """Name of the running thread (the engine's device thread when on one)."""
    return threading.current_thread().name
