"""Per-loss parts of one backward of a combined loss: weights from the graph, parts by autograd.grad.

# NOTE [weights]
# For a root r built from component losses l_1..l_k (any differentiable combination), the chain
# rule over the cut the components form gives d r / d p = sum_i (d r / d l_i) * d l_i / d p. The
# weights w_i = d r / d l_i come from one cheap autograd.grad(r, [l_1..l_k]) (it only runs the few
# nodes above the losses), so losses used twice or scaled by a tensor are handled exactly.

# NOTE [strategy]
# The parts w_i * g_i come from one vectorized autograd.grad over the k losses (is_grads_batched=True,
# grad_outputs = rows of a weighted identity) or from one autograd.grad per loss, each asked only for
# the leaves that loss reaches. Which one is chosen from the graph, never by timing both on the
# user's step (NOTE [strategy from the graph] in analysis/strategy.py). The first decomposed
# backward of a graph in the process computes all k parts and checks their sum against what the
# backward really added; later ones (in this trace or any later trace of the same graph) compute
# k-1 and derive the last one (the loss whose graph is largest, i.e. the most expensive pass) from
# the backward's own gradient: k-1 extra passes, and "derived: not checked" where that loss reaches.
# The extra passes run with the side effects of NOTE [no hidden side effects] switched off.

# NOTE [memory]
# The computed parts are held from before the user's backward until that backward's tensor hook on
# the leaf, which copies them (and, when a part is derived, the backward's gradient) into one float64
# matrix and reduces it to a Gram matrix (norms, dots, hence shares and cosines) and the check.
# Only with keep="tensors" are the parts themselves kept. Holding k-1 gradient copies until the
# backward reaches each leaf is the price of exact per-parameter parts in one user backward: the
# Gram of a derived part needs the backward's own gradient, which exists only then.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Literal, Optional

import torch

if TYPE_CHECKING:
    from gradprobe.ledger.ledger import LeafState
    from gradprobe.analysis.losses import Component

__all__ = ["LeafReduction", "compute_rows", "derived_gram", "reduce_rows", "weights_of"]

Strategy = Literal["batched", "loop"]


@dataclass(eq=False)
class LeafReduction:
    """Device-side statistics of one leaf's per-loss parts (not read back until asked)."""

    state: LeafState
    reached: tuple[bool, ...]  # per loss: its graph reaches the leaf
    gram: torch.Tensor | None = None  # k x k <part_i, part_j>
    error: torch.Tensor | None = None  # max |sum of parts - what the backward added|
    total_absmax: torch.Tensor | None = None  # max |.| of the backward's gradient and of the parts
    parts: torch.Tensor | None = None  # keep="tensors": (k, *shape)
    derived: int | None = None  # position of the part that is the backward's gradient minus the others;
    # then ``gram`` is the Gram matrix of [computed parts; the backward's gradient] (see derived_gram)
    rows: list[torch.Tensor | None] | None = field(default=None, repr=False)  # pending computed parts, until reduced


def weights_of(root: torch.Tensor, components: list[Component]) -> list[list[torch.Tensor]]:
    """``d root / d loss`` for every tensor of every component (one small autograd.grad call)."""
    flat = [e for c in components for e in c.edges]
    grads = torch.autograd.grad(root, flat, retain_graph=True, allow_unused=True)
    out: list[list[torch.Tensor]] = []
    it = iter(grads)
    for c in components:
        out.append([g if g is not None else root.new_zeros(s) for s, g in zip(c.shapes, it)])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Rows = List[Optional[torch.Tensor]]  # per computed loss: its part of one leaf (None: it does not reach it)


def _batched(
    components: list[Component], weights: list[list[torch.Tensor]], leaves: list[torch.Tensor]
) -> tuple[list[Rows | None], str]:
    k = len(components)
    outputs, grad_outputs = [], []
    for b, (comp, ws) in enumerate(zip(components, weights)):
        for e, w in zip(comp.edges, ws):
            go = w.new_zeros((k, *w.shape))
            go[b] = w
            outputs.append(e)
            grad_outputs.append(go)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(
            outputs, leaves, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    slow = sorted({_op_of(str(w.message)) for w in caught if "performance drop" in str(w.message)})
    note = f"vmap had no batching rule for {', '.join(slow)} (ran a per-row fallback)" if slow else ""
    rows: list[Rows | None] = []
    for leaf, g in zip(leaves, got):
        if g is None:
            rows.append(None)
        else:
            rows.append([None if id(leaf) not in c.leaves else r for c, r in zip(components, g.unbind(0))])
    return rows, note


def _op_of(message: str) -> str:
    marker = "batching rule for "
    i = message.find(marker)
    return message[i + len(marker) :].split(".")[0].split(" ")[0] if i >= 0 else "some op"


def _looped(
    components: list[Component], weights: list[list[torch.Tensor]], leaves: list[torch.Tensor]
) -> list[Rows | None]:
    """One ``autograd.grad`` per loss, each asked only for the leaves that loss reaches."""
    rows: list[Rows | None] = [None] * len(leaves)
    for i, (c, ws) in enumerate(zip(components, weights)):
        wanted = [j for j, leaf in enumerate(leaves) if id(leaf) in c.leaves]
        if not wanted:
            continue
        got = torch.autograd.grad(
            list(c.edges), [leaves[j] for j in wanted], list(ws), retain_graph=True, allow_unused=True
        )
        for j, g in zip(wanted, got):
            if g is None:
                continue
            row = rows[j]
            if row is None:
                row = rows[j] = [None] * len(components)
            row[i] = g
    return rows


def compute_rows(
    components: list[Component],
    weights: list[list[torch.Tensor]],
    leaves: list[torch.Tensor],
    strategy: Strategy,
) -> tuple[list[Rows | None], Strategy, str, float]:
    """Parts ``w_i * g_i`` per leaf (None: no computed loss reaches the leaf), by ``strategy``.

    Returns (rows, strategy used, note, seconds the passes took). A vmap that cannot run at all
    falls back to the loop, and the note says so.
    """
    device = leaves[0].device
    note = ""
    if len(components) == 1:
        strategy = "loop"  # one row: nothing to vectorize
    _sync(device)
    start = time.perf_counter()
    rows: list[Rows | None] | None = None
    if strategy == "batched":
        try:
            rows, note = _batched(components, weights, leaves)
        except RuntimeError as exc:  # an op vmap cannot run at all
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            note = f"vmap failed ({first[:120]}); used one autograd.grad call per loss"
            strategy = "loop"
    if rows is None:
        rows = _looped(components, weights, leaves)
    _sync(device)
    return rows, strategy, note, time.perf_counter() - start


def derived_gram(raw: list[list[float]], derived: int) -> tuple[tuple[float, ...], ...]:
    """The k x k Gram matrix of the parts, from the Gram of [computed parts; total] (float64 on the host).

    With d = total - sum_j c_j: <c_i, d> = <c_i, total> - sum_j <c_i, c_j> and
    <d, d> = <total, total> - 2 sum_i <c_i, total> + sum_ij <c_i, c_j> (clamped at 0).
    """
    c = len(raw) - 1
    gc = [row[:c] for row in raw[:c]]
    ct = [raw[i][c] for i in range(c)]
    cross = [ct[i] - sum(gc[i]) for i in range(c)]
    dd = max(raw[c][c] - 2 * sum(ct) + sum(map(sum, gc)), 0.0)
    order = list(range(c))
    order.insert(derived, c)  # the derived part goes to its place among the computed ones
    full = [row + [x] for row, x in zip(gc, cross)] + [cross + [dd]]
    return tuple(tuple(full[i][j] for j in order) for i in order)


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| (aminmax: one vectorized pass; vector_norm(ord=inf) is ~15x slower on CPU in torch 2.13)."""
    if t.is_floating_point():
        low, high = torch.aminmax(t)
        return torch.maximum(high, -low)
    return t.abs().max()


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def reduce_rows(
    entry: LeafReduction,
    total: torch.Tensor | None,
    derived: int | None,
    keep_tensors: bool,
) -> None:
    """Reduce a leaf's pending parts to its Gram matrix and check, against the backward's ``total``.

    ``derived``: position of the part not computed, which is ``total`` minus the computed ones; when
    that loss does not reach this leaf its part is exactly zero instead, and the computed parts are
    checked against ``total``. The parts are copied once, into float64, and every sum and dot
    product is taken there (NOTE [round-off] in analysis/split.py). Runs inside the user's backward
    (a tensor hook): no host read-back here.
    """
    with torch.no_grad():
        rows = entry.rows
        entry.rows = None
        leaf = entry.state.leaf
        n = 1
        for s in leaf.shape:
            n *= s
        k = len(entry.reached)
        computed = k - (1 if derived is not None else 0)
        f64 = torch.float64
        if total is not None:
            total = _dense(total).detach().reshape(n)
            entry.total_absmax = _absmax(total) if n else total.new_zeros(())
        zero_row: int | None = None
        if derived is not None and not entry.reached[derived]:
            zero_row, derived = derived, None  # the derived loss does not reach this leaf: exactly zero there
        present = [(i, r) for i, r in enumerate(rows or ()) if r is not None]
        with_total = derived is not None and total is not None
        # one float64 matrix: the computed parts (and the backward's gradient when a part is derived)
        acc = torch.empty((computed + with_total, n), dtype=f64, device=leaf.device)
        filled = {i for i, _ in present}
        for i, r in present:
            acc[i].copy_(_dense(r).reshape(n))
        for i in range(computed):
            if i not in filled:
                acc[i].zero_()
        del rows, present
        if with_total:
            acc[computed].copy_(total)  # type: ignore[arg-type]
        if derived is not None:
            if total is None:
                return  # the backward never reached this leaf: nothing to derive from
            # the Gram of [c; total] in float64; <c_i, d> and <d, d> for d = total - sum(c) follow from it
            # on the host (derived_gram): the cancellation in <d, d> is ~1e-16 |total|^2, far below
            # the float32 round-off bound of d
            entry.gram = acc @ acc.T
            entry.derived = derived
            if keep_tensors:
                last = acc[computed] - acc[:computed].sum(0)
                acc = torch.cat([acc[:derived], last[None], acc[derived:computed]])
        else:
            if zero_row is not None:
                acc = torch.cat([acc[:zero_row], acc.new_zeros((1, n)), acc[zero_row:]])
            if total is not None and n:
                entry.error = (acc.sum(0) - total).abs().max()
                # round-off scales with the summands, which can be larger than their sum (losses that cancel)
                entry.total_absmax = torch.maximum(entry.total_absmax, acc.abs().max().to(total.dtype))
            entry.gram = acc @ acc.T
        if keep_tensors:
            entry.parts = acc.to(leaf.dtype).reshape(k, *leaf.shape)
