"""What the detectors share: naming graph nodes and tensors the way the user wrote them."""

from __future__ import annotations

import ast
import linecache
import math
import re
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.ledger.stats import read_floats
from gradprobe.capture.sites import Site

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

    from gradprobe.api.trace import Trace

__all__ = ["LedgerFacts", "TensorSet", "assignment_site", "ledger_facts", "op_name", "tensors_in_frame"]


class TensorSet:
    """Tensors by identity, held weakly. An id is reused once its tensor is freed, and a training loop
    makes new tensors every step: the dead entries are forgotten once 1,024 are kept."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ReferenceType[torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor) -> None:
        if len(self._refs) >= 1024:
            self._refs = {k: r for k, r in self._refs.items() if r() is not None}
        self._refs[id(tensor)] = weakref.ref(tensor)

    def __contains__(self, tensor: object) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor

    def __len__(self) -> int:
        return len(self._refs)

    def clear(self) -> None:
        self._refs.clear()

_FACTS: weakref.WeakKeyDictionary[Any, tuple[int, LedgerFacts]] = weakref.WeakKeyDictionary()


class LedgerFacts:
    """What the end-of-trace detectors need from the device, read back in one transfer.

    ``finite[leaf index]``: (record index, finite?) per part; ``carried[leaf index]``: the norm of
    the ``.grad`` a leaf already held when the trace started (only leaves where it did).
    """

    def __init__(self, finite: dict[int, list[tuple[int, bool]]], carried: dict[int, float]) -> None:
        self.finite = finite
        self.carried = carried


def ledger_facts(trace: Trace) -> LedgerFacts:
    """Part finiteness and carried-in norms of every leaf, cached per ledger state (not the full breakdown)."""
    version = trace._ledger.version
    cached = _FACTS.get(trace)
    if cached is not None and cached[0] == version:
        return cached[1]
    tensors: list[torch.Tensor] = []
    where: list[tuple[str, int, int]] = []
    for state in trace._ledger.leaves:
        for part in state.parts:
            tensors.append(part.norm_ref)  # type: ignore[arg-type]
            where.append(("part", state.leaf.index, part.record))
        first = state.epochs[0] if state.epochs else None
        if first is not None and first.reason == "trace_start" and first.norm is not None:
            tensors.append(first.norm)
            where.append(("carried", state.leaf.index, -1))
    values = read_floats(tensors)
    finite: dict[int, list[tuple[int, bool]]] = {}
    carried: dict[int, float] = {}
    for (kind, leaf, record), value in zip(where, values):
        if kind == "part":
            finite.setdefault(leaf, []).append((record, math.isfinite(value)))
        else:
            carried[leaf] = value
    facts = LedgerFacts(finite, carried)
    _FACTS[trace] = (version, facts)
    return facts


# grad_fn type name (without the Backward<N> suffix) -> what the user wrote
_OPS = {
    "Add": "+", "Sub": "-", "Mul": "*", "Div": "/", "Pow": "**", "Neg": "unary -", "Rsub": "-",
    "ToCopy": ".to() cast", "Clone": ".clone()", "View": ".view()", "Reshape": ".reshape()",
    "UnsafeView": ".reshape()", "T": ".t()", "Transpose": ".transpose()", "Permute": ".permute()",
    "Expand": ".expand()", "Select": "indexing", "Slice": "slicing", "Index": "indexing",
    "Addmm": "a Linear layer (addmm)", "Mm": "matmul", "Bmm": "batched matmul", "Sum": ".sum()",
    "Mean": ".mean()", "Squeeze": ".squeeze()", "Unsqueeze": ".unsqueeze()", "Cat": "torch.cat",
    "Stack": "torch.stack", "Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu", "Exp": "exp",
    "Log": "log", "Sqrt": "sqrt", "Convolution": "a convolution", "NativeLayerNorm": "layer norm",
    "NativeBatchNorm": "batch norm", "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "Embedding": "an embedding lookup", "AsStrided": "a strided view", "Alias": "an alias",
}
_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")


def op_name(node: Any) -> str:
    """A grad_fn node as the user wrote the op: ``MulBackward0`` -> ``MulBackward0 (*)``."""
    cls = type(node).__name__
    if cls.endswith("Backward") and hasattr(node, "_forward_cls"):  # a custom autograd.Function
        return f"{cls} (custom autograd.Function)"
    key = _BACKWARD_SUFFIX.sub("", cls)
    hint = _OPS.get(key)
    return f"{cls} ({hint})" if hint else cls


def tensors_in_frame(frame: FrameType | None) -> dict[str, torch.Tensor]:
    """The tensors bound to names in ``frame`` (its locals; at module level, its globals)."""
    if frame is None:
        return {}
    found = {}
    for name, value in list(frame.f_locals.items()):
        if isinstance(value, torch.Tensor) and not name.startswith("_"):
            found[name] = value
    return found


@lru_cache(maxsize=256)
def _assignments(filename: str, mtime_key: int) -> dict[str, list[int]]:
    source = "".join(linecache.getlines(filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return {}
    found: dict[str, list[int]] = {}

    def add(target: ast.AST, line: int) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                found.setdefault(node.id, []).append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                add(target, node.lineno)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            add(node.target, node.lineno)
        elif isinstance(node, (ast.For, ast.With)):
            targets = [node.target] if isinstance(node, ast.For) else [i.optional_vars for i in node.items]
            for target in targets:
                if target is not None:
                    add(target, node.lineno)
    return found


def assignment_site(frame: FrameType | None, name: str, before: int | None = None) -> Site | None:
    """The last line of ``frame``'s file before line ``before`` that assigns ``name`` (best effort)."""
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    lines = _assignments(filename, len(linecache.getlines(filename))).get(name)
    if not lines:
        return None
    limit = frame.f_lineno if before is None else before
    start = frame.f_code.co_firstlineno if frame.f_code.co_name != "<module>" else 0
    earlier = [line for line in lines if start <= line <= limit]
    if earlier:
        return Site(filename, max(earlier))
    later = [line for line in lines if line >= start]  # assigned later in a loop body
    return Site(filename, max(later)) if later else None


def is_augmented(frame: FrameType | None, name: str) -> bool:
    """Whether ``name`` is updated with ``+=`` (or another augmented assignment) in ``frame``'s file."""
    if frame is None:
        return False
    pattern = re.compile(rf"\b{re.escape(name)}\s*[-+*/]=")
    return any(pattern.search(line) for line in linecache.getlines(frame.f_code.co_filename))


def node_owner(
    frame: FrameType | None, node: Any, locals_: dict[str, torch.Tensor]
) -> tuple[str | None, Site | None]:
    """The local variable whose ``grad_fn`` is ``node`` (from ``locals_``), and the line that assigned it."""
    name = next((n for n, t in locals_.items() if t.grad_fn is node), None)
    return name, (assignment_site(frame, name) if name else None)


def call_text(name: str, kind: str) -> str:
    """A backward call as the user wrote it: ``loss.backward()``, ``(l1 + l2).backward()``, ``autograd.grad(loss, ...)``."""
    if kind != "backward":
        return f"`autograd.grad({name}, ...)`"
    return f"`{name}.backward()`" if _primary(name) else f"`({name}).backward()`"


def _primary(expr: str) -> bool:
    """Whether ``expr`` can take ``.backward()`` without parentheses (a name, attribute, call, subscript)."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return True  # not Python (``backward#3``): shown as it is
    return isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant))


def saved_tensors(nodes: Any) -> Iterator[torch.Tensor]:
    """The tensors the ``nodes`` still hold as saved tensors, parameters and other grad leaves left out.

    Freed slots give nothing, and slots under a saved-tensor hook are skipped (reading them would run
    the hook). Saved inputs come back as the tensors themselves; saved outputs as new tensor objects.
    """
    from gradprobe.capture.graph import saved_slots

    for node in nodes:
        slots = saved_slots(node)
        if not slots or slots == ("<custom>",):
            continue
        for name in slots:
            try:
                raw = getattr(node, "_raw_saved_" + name)
                items = raw if isinstance(raw, (list, tuple)) else (raw,)
                if any(i is not None and i.unpack_hook is not None for i in items):
                    continue
                value = getattr(node, "_saved_" + name)
            except Exception:  # freed, or a slot gradprobe cannot read: nothing held
                continue
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and not (tensor.requires_grad and tensor.grad_fn is None):
                    yield tensor


def saved_bytes(nodes: Any) -> int:
    """Bytes of the distinct storages the ``nodes`` still hold as saved tensors (see :func:`saved_tensors`)."""
    seen: dict[int, int] = {}
    for tensor in saved_tensors(nodes):
        try:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            continue
    return sum(seen.values())


def format_bytes(n: float) -> str:
    """``1.3 GB``, ``12 KB``, ``512 B`` (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def user_frames(frame: FrameType | None, limit: int = 3) -> list[FrameType]:
    """``frame`` and up to ``limit - 1`` of its callers that are user code (not torch, not gradprobe)."""
    from gradprobe.capture.sites import _is_internal

    found: list[FrameType] = []
    while frame is not None and len(found) < limit:
        if not _is_internal(frame.f_code.co_filename):
            found.append(frame)
        frame = frame.f_back
    return found
