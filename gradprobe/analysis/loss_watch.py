"""A TorchFunctionMode that notices scalars made inside recognised loss functions (decompose only).

See NOTE [loss functions outside torch.nn.functional] in analysis/losses.py. The mode is entered
by the decomposer at the start of a decomposing trace (owned by the trace, so it leaves with it)
and only looks at outputs that are one-element tensors with a graph: for every other op it is a
Python call and a type check. For such a scalar it walks up past torch's own frames to the frame
that called the op, and when that frame's function is a registered loss name, the scalar becomes
a candidate component named after that function and the user's line that called it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from gradprobe.analysis.losses import LOSS_CODE_NAMES, LossBook
from gradprobe.capture.sites import TORCH_DIR, _is_internal

__all__ = ["LossWatch"]

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling  # Dynamo tracing a compiled region: frames are not the user's


class LossWatch(TorchFunctionMode):
    """Adds scalars computed directly in a registered loss function's frame to a :class:`LossBook`."""

    def __init__(self, book: LossBook) -> None:
        super().__init__()
        self.book = book

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, _Tensor) and not _is_compiling() and out.grad_fn is not None and out.numel() == 1:
            self._look(out)
        return out

    def _look(self, out: torch.Tensor) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        if frame is None or frame.f_code.co_name not in LOSS_CODE_NAMES:
            return
        caller = user_frame_of(frame.f_back)
        self.book.add(out, frame.f_code.co_name, caller, inner=(frame.f_code, frame.f_lasti))


def user_frame_of(frame: Any) -> Any:
    """The first frame from ``frame`` outwards that is the user's (not torch's or gradprobe's)."""
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame
