"""Reductions of one gradient part: 2-norm, abs-max and dot products, launched on its device.

Place in the flow: the ledger calls these from inside leaf hooks (so they must stay cheap and never
sync the host); the analysis layer and the DDP plugin reuse them for what they measure later.

# NOTE [batched statistics]
# On the CPU, `torch._foreach_norm` is a loop of one kernel per tensor: ~4.5 µs per small tensor for
# the 2-norm and as much again for the abs-max, most of a 1,000-tensor model's per-backward cost.
# Small gradients of one shape (a transformer's per-layer biases and norms, a deep MLP's layers)
# are instead stacked into one (k, n) tensor and reduced along rows: one stack, one 2-norm, one
# abs-max per group, several times less per tensor. Each stacked copy (and its abs) holds at most
# STACK_CHUNK elements, so the extra memory is ~32 KB on any model; a group of one joins the fused
# per-tensor call of the large tensors, where the data, not the dispatch, is the cost. A contiguous
# row is reduced by the same kernel as a whole tensor, so each row is bitwise the tensor's own norm
# (tests/test_hot_path.py checks against PyTorch).
# NOTE [foreach dtype]
# `torch._foreach_norm(..., dtype=torch.float32)` on float32 tensors takes a slow path (3.4x slower
# on 1,000 small CPU tensors, torch 2.13): pass `dtype` only when it upcasts (half, bfloat16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradprobe.ledger.records import StatRef

__all__ = ["STACK_BELOW", "STACK_CHUNK", "stack_groups", "absmax", "dot", "foreach_norms", "norms", "read_floats", "stacked_norms", "two_norms"]

_ACC = {torch.float32: torch.float32, torch.float64: torch.float64}
_INF = float("inf")
_vector_norm = torch.linalg.vector_norm


def norms(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2-norm, abs-max) accumulated in float32 (float64 for float64); callers run it without grad."""
    acc = _ACC.get(g.dtype)
    if acc is None or g.layout != torch.strided:  # the common float32/float64 dense case skips all this
        if g.is_sparse:
            g = g.coalesce().values()
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        if g.is_complex():
            g = g.abs()
    return _vector_norm(g, dtype=acc), absmax(g, acc)


# NOTE [abs-max on the CPU]
# On the CPU, vector_norm(ord=inf) runs ~25x slower than the 2-norm (no vectorized kernel: 2.8 ms
# per million floats against 0.11 ms). max|x| = max(max x, -min x) exactly (negation and max never
# round, NaN propagates), and aminmax is vectorized: large CPU tensors take that path. Small ones keep
# the single inf-norm call (fewer dispatches); both give the same bits.
_AMINMAX_FROM = 2048


def absmax(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if g.numel() >= _AMINMAX_FROM and g.device.type == "cpu" and not g.is_complex():
        lo, hi = torch.aminmax(g)
        return torch.maximum(hi, lo.neg()).to(acc)
    return _vector_norm(g, ord=_INF, dtype=acc)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = _ACC.get(a.dtype)
    if acc is not None and b.dtype == a.dtype and a.layout == torch.strided and b.layout == torch.strided:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    if a.is_sparse or b.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.reshape(-1)
    b = b.reshape(-1)
    if a.dtype != acc:
        a, b = a.to(acc), b.to(acc)
    if a.is_complex():
        return torch.vdot(a, b).real
    return torch.dot(a, b)


def foreach_norms(grads: list[torch.Tensor], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``norms`` of many same-device, same-``dtype`` dense tensors, with fused ``_foreach_norm`` calls."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upcast = acc if dtype != acc else None  # NOTE [foreach dtype]
    two = torch._foreach_norm(grads, 2, dtype=upcast)
    small = [i for i, g in enumerate(grads) if g.device.type != "cpu" or g.numel() < _AMINMAX_FROM]
    tops: list[torch.Tensor | None] = [None] * len(grads)
    if small:  # one fused call (NOTE [abs-max on the CPU] for the large CPU ones)
        for i, top in zip(small, torch._foreach_norm([grads[i] for i in small], _INF, dtype=upcast)):
            tops[i] = top
    return [(n, top if top is not None else absmax(g, acc)) for n, top, g in zip(two, tops, grads)]


STACK_BELOW = 2048  # elements: smaller dense tensors are measured stacked (NOTE [batched statistics])
STACK_CHUNK = 4096  # elements per stacked copy: the extra memory stays ~32 KB whatever the model


def stack_groups(grads: list[torch.Tensor]) -> tuple[list[list[int]], list[int]]:
    """Positions of ``grads`` to measure stacked (same shape, at most STACK_CHUNK elements a group,
    two or more tensors), and the rest, for the fused per-tensor call."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    alone: list[int] = []
    for i, grad in enumerate(grads):
        if grad.numel() < STACK_BELOW:
            by_shape.setdefault(tuple(grad.shape), []).append(i)
        else:
            alone.append(i)
    groups: list[list[int]] = []
    for rows in by_shape.values():
        per = max(1, STACK_CHUNK // max(1, grads[rows[0]].numel()))
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            if len(chunk) > 1:
                groups.append(chunk)
            else:
                alone += chunk
    return groups, alone


def stacked_norms(grads: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2-norm, abs-max) rows of same-shaped, same-device, same-``dtype`` dense real tensors.

    Accumulated as :func:`norms` does (float32, float64 for float64): each row is bitwise the norm
    of that tensor alone (a contiguous row is reduced with the same kernel as a whole tensor).
    """
    rows = torch.stack(grads).reshape(len(grads), grads[0].numel())  # (k, 0) for empty tensors too
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    two = _vector_norm(rows, dim=1, dtype=acc if dtype != acc else None)  # NOTE [foreach dtype]
    if rows.shape[1] == 0:
        return two, two.new_zeros(len(grads))
    return two, rows.abs().amax(dim=1).to(acc)


def two_norms(grads: list[torch.Tensor], dtype: torch.dtype) -> list[StatRef]:
    """2-norms of same-device, same-``dtype`` dense real tensors, as read-back references: small
    ones stacked per shape, large ones with one fused call (NOTE [batched statistics])."""
    out: list[StatRef | None] = [None] * len(grads)
    groups, large = stack_groups(grads)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upcast = acc if dtype != acc else None  # NOTE [foreach dtype]
    for rows in groups:
        stacked = torch.stack([grads[i] for i in rows]).reshape(len(rows), grads[rows[0]].numel())
        batch = _vector_norm(stacked, dim=1, dtype=upcast)
        for row, i in enumerate(rows):
            out[i] = (batch, row)
    if large:
        for i, norm in zip(large, torch._foreach_norm([grads[i] for i in large], 2, dtype=upcast)):
            out[i] = norm
    return out  # type: ignore[return-value]


def read_floats(tensors: list[StatRef]) -> list[float]:
    """Statistics as Python floats: one transfer per device, no per-tensor casts.

    Each item is a 0-d device tensor or ``(a batch's 1-d tensor, row)``; every distinct batch tensor
    is read once. On an accelerator, everything of one device goes in one transfer (casting each 0-d
    tensor there would sync once per value); CPU values are read directly.
    """
    out = [0.0] * len(tensors)
    scalars: dict[torch.device, list[int]] = {}
    batches: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
    cpu_batches: dict[int, list[float]] = {}
    with torch._C.DisableTorchFunction(), torch.no_grad():  # gradprobe's own read, not the user's ops
        for i, t in enumerate(tensors):
            if type(t) is tuple:
                base, row = t
                if base.device.type == "cpu":  # no transfer to save: read each batch once, directly
                    values = cpu_batches.get(id(base))
                    if values is None:
                        values = cpu_batches[id(base)] = base.tolist()
                    out[i] = values[row]
                    continue
                entry = batches.get(id(base))
                if entry is None:
                    entry = batches[id(base)] = (base, [])
                entry[1].append((i, row))
            elif t.device.type == "cpu":  # type: ignore[union-attr]
                out[i] = t.item()  # type: ignore[union-attr]
            else:
                scalars.setdefault(t.device, []).append(i)  # type: ignore[union-attr]
        devices = set(scalars) | {base.device for base, _ in batches.values()}
        for device in devices:
            chunks: list[torch.Tensor] = []
            positions = scalars.get(device, [])
            if positions:
                group = [tensors[i] for i in positions]
                chunks.append(torch.stack([t.double() for t in group]) if any(
                    t.dtype != group[0].dtype for t in group) else torch.stack(group).double())  # type: ignore[misc]
            mine = [(base, rows) for base, rows in batches.values() if base.device == device]
            chunks += [base.double() for base, _ in mine]
            values = torch.cat(chunks).tolist() if len(chunks) > 1 else chunks[0].tolist()
            for i, value in zip(positions, values):
                out[i] = value
            offset = len(positions)
            for base, rows in mine:
                for i, row in rows:
                    out[i] = values[offset + row]
                offset += base.shape[0]
    return out
