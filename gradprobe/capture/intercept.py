"""A TorchFunctionMode that sees backward / autograd.grad calls, `.grad` reads and in-place writes.

# NOTE [fast path]
# Every torch call made while a trace is active passes through `__torch_function__`, so the
# common case (an op nobody watches) is one dict lookup and a call. In-place writes are only
# classified when some plugin implements `gradprobe_inplace_write`, and the classification of each
# function is cached. Functions a plugin watches (backward calls; loss functions while decomposing)
# sit in one dispatch table, `Interceptor.table`.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from gradprobe.capture.calls import BACKWARD_FUNCTIONS
from gradprobe.capture.sites import user_frame, user_site

if TYPE_CHECKING:
    from gradprobe.capture.recorder import Recorder

__all__ = ["Backward", "Interceptor", "written_tensors"]

_GRAD_GET = torch.Tensor.grad.__get__
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # torch < 2.3
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul")
) | {"__setitem__"}
# Trailing-underscore methods that do not write tensor data.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "rename_", "refine_names_", "record_stream_"})


def _writes_in_place(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES


def _inplace_flag_index(func: Callable[..., Any]) -> int | None:
    """Position of an ``inplace`` parameter (``F.relu(x, inplace=True)``, ``F.dropout``), if any."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _classify(func: Callable[..., Any]) -> int:
    """_ALWAYS, _NEVER, or the position of the function's ``inplace`` flag."""
    if _writes_in_place(func):
        return _ALWAYS
    index = _inplace_flag_index(func)
    return _NEVER if index is None else index


_ALWAYS, _NEVER = -1, -2  # small ints (cached objects): compared with `is` on the fast path
# func -> _classify(func), shared by every trace of the process (functions are global objects, and
# classifying one reads its signature: ~0.1 ms, too much to repeat in every new trace).
_WRITES: dict[Any, int] = {}


def written_tensors(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], in_place: bool | None = None
) -> list[torch.Tensor]:
    """The tensors ``func(*args, **kwargs)`` writes in place (empty when it writes none).

    ``in_place`` is ``_writes_in_place(func)`` when the caller already knows it.
    """
    out = kwargs.get("out")
    written: list[torch.Tensor] = []
    if in_place is None:
        kind = _classify(func)
        in_place = kind == _ALWAYS
        if kind >= 0 and _flag(kind, args, kwargs) and args and isinstance(args[0], torch.Tensor):
            written.append(args[0])
    if out is not None:
        written += [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    if args and in_place:
        first = args[0]
        if isinstance(first, torch.Tensor):
            written.append(first)
        elif isinstance(first, (list, tuple)):  # torch._foreach_*_
            written += [t for t in first if isinstance(t, torch.Tensor)]
    return written


def _flag(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    value = kwargs.get("inplace", args[index] if len(args) > index else False)
    return value is True


class Backward:
    """The interceptor's handler of backward calls: hands them to the recorder (held weakly, NOTE [no cycles])."""

    __slots__ = ("recorder",)

    def __init__(self, recorder: weakref.ReferenceType[Recorder]) -> None:
        self.recorder = recorder

    def __call__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        recorder = self.recorder()
        if recorder is None:
            return func(*args, **kwargs)
        return recorder.run_backward(func, args, kwargs)


def _TO_RECORDER(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:  # noqa: N802
    """Marks the backward functions in ``Interceptor.table``; never called (the mode calls the recorder)."""
    raise AssertionError("gradprobe: the backward marker is not a handler")


def _ON_GRAD_READ(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:  # noqa: N802
    """Marks ``Tensor.grad``'s getter in ``Interceptor.table``; never called (the mode runs ``_grad_get``)."""
    raise AssertionError("gradprobe: the .grad marker is not a handler")


class Interceptor(TorchFunctionMode):
    """Routes the few torch calls a trace cares about to it; passes everything else straight on."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = weakref.ref(recorder)  # the recorder owns this mode (NOTE [no cycles] in recorder.py)
        self.watch_grad_reads = False
        self.watch_writes = False
        self._writes_paused = False  # NOTE [writes inside an optimizer step] in steps.py
        # func -> handler(func, args, kwargs): the only per-call lookup for functions nobody watches
        # (backward calls map to _TO_RECORDER: run inline below, one frame less in the user's tracebacks)
        self.table: dict[Any, Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]] = dict.fromkeys(
            BACKWARD_FUNCTIONS, _TO_RECORDER
        )
        self.table[_GRAD_GET] = _ON_GRAD_READ  # handled inline too: a bound method here would be a cycle

    def pause_writes(self) -> None:
        """Stop watching in-place writes until :meth:`resume_writes` (NOTE [writes inside an optimizer step])."""
        if self.watch_writes:
            self.watch_writes = False
            self._writes_paused = True

    def resume_writes(self) -> None:
        if self._writes_paused:
            self._writes_paused = False
            self.watch_writes = True

    def _grad_get(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``tensor.grad``: PyTorch's non-leaf warning points at the user's line, as without a trace."""
        if not args or args[0].is_leaf or _is_compiling():
            return func(*args, **kwargs)
        if self.watch_grad_reads:
            self._call("gradprobe_grad_read", tensor=args[0], site=user_site())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = func(*args, **kwargs)
        frame = user_frame(2)
        for w in caught:
            if frame is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            else:
                module = frame.f_globals.get("__name__", "<string>")
                registry = frame.f_globals.setdefault("__warningregistry__", {})
                warnings.warn_explicit(w.message, w.category, frame.f_code.co_filename, frame.f_lineno, module, registry)
        return result

    def _call(self, hook_name: str, **kwargs: Any) -> None:
        recorder = self._recorder()
        if recorder is not None and recorder.host is not None:
            recorder.host.call(hook_name, trace=recorder.subject, **kwargs)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        handler = self.table.get(func)
        if handler is not None:
            if handler is _TO_RECORDER:
                recorder = self._recorder()
                if recorder is None:
                    return func(*args, **kwargs)
                return recorder.run_backward(func, args, kwargs)
            if handler is _ON_GRAD_READ:
                return self._grad_get(func, args, kwargs)
            return handler(func, args, kwargs)
        kind = _WRITES.get(func)
        if kind is _NEVER and "out" not in kwargs:  # NOTE [fast path]: most calls end here
            return func(*args, **kwargs)
        if kind is None:
            kind = _WRITES[func] = _classify(func)
        if (self.watch_grad_reads or self.watch_writes) and _is_compiling():
            pass  # Dynamo is tracing a compiled region: see NOTE [torch.compile] in transforms.py
        elif self.watch_writes:
            in_place = kind == _ALWAYS or (kind >= 0 and _flag(kind, args, kwargs))
            # any function may take out=; only in-place ones write through args[0]
            written = written_tensors(func, args, kwargs, in_place) if (in_place or "out" in kwargs) else []
            if written:
                self._call("gradprobe_inplace_write", tensors=written, func=func, site=user_site())
        return func(*args, **kwargs)
