"""How to compute the per-loss parts of a graph: chosen from the graph, refined by timings, cached.

# NOTE [strategy from the graph]
# Two ways give the k parts: one vectorized ``autograd.grad(..., is_grads_batched=True)`` ("batched")
# or one ``autograd.grad`` per loss ("loop"). vmap runs some backward formulas through a slow per-row
# fallback (convolution, batch norm, layer/group norm, RoIAlign, scaled-dot-product attention) or
# cannot run them at all (custom Functions), and there the loop wins; elsewhere (matmuls,
# elementwise ops) batching can win. The first decomposed backward of a graph takes the choice from
# the graph's node names, never by timing both on the user's step (that cost 9.5-20x a backward).
# Graphs without slow ops start batched and, on a later sampled backward, try the loop once; the
# faster per pass is kept. Timings of every sampled backward (the passes and the user's own
# backward) are kept for the report ("split cost 1.4x your backward, measured on steps ...").
#
# NOTE [graph signature cache]
# A new trace of the same model must not pay again for what the process already learnt. Facts are
# cached per process by a graph signature: the node class names of the graph (with counts), the
# shapes/dtypes/devices of the leaves, and the number and size of the component losses. The
# cache holds only these plain facts (strategy, whether the sum of the parts was checked on this
# graph, pass timings), never tensors, nodes or user objects; it is bounded (oldest dropped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Literal

if TYPE_CHECKING:
    import torch

    from gradprobe.analysis.losses import Component

__all__ = ["SLOW_UNDER_VMAP", "GraphFacts", "facts_for", "next_strategy", "record_passes", "signature", "slow_ops"]

Strategy = Literal["batched", "loop"]

# Substrings of backward node class names whose formulas vmap runs through a per-row fallback (or
# cannot run): checked on torch 2.13 from the "performance drop" warnings of is_grads_batched.
SLOW_UNDER_VMAP = (
    "Convolution",
    "Conv",
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RoiAlign",
    "RoIAlign",
    "ScaledDotProduct",
    "EfficientAttention",
    "FlashAttention",
    "Cudnn",
    "Mkldnn",
)
_MAX_GRAPHS = 256


@dataclass
class GraphFacts:
    """What the process knows about decomposing one graph signature."""

    strategy: Strategy
    slow: tuple[str, ...]  # the node names that decided "loop" (empty: batched was possible)
    checked: bool = False  # the sum of all k computed parts was checked against a backward of it
    tried: set[str] = field(default_factory=set)  # strategies timed so far
    per_pass: dict[str, float] = field(default_factory=dict)  # best seconds per extra pass, per strategy


_GRAPHS: dict[Hashable, GraphFacts] = {}


def slow_ops(names: Counter[str]) -> tuple[str, ...]:
    """Node class names in the graph that make vmap slow (custom Functions included)."""
    out = []
    for name in names:
        if any(s in name for s in SLOW_UNDER_VMAP):
            out.append(name)
    return tuple(sorted(out))


def signature(nodes: Any, leaves: list[torch.Tensor], components: list[Component], rest: bool) -> tuple[Hashable, Counter[str]]:
    """The graph signature (NOTE [graph signature cache]) and the node class names counted."""
    names = Counter(type(node).__name__ for node in nodes)
    custom = any(getattr(node, "_forward_cls", None) is not None for node in nodes)
    sig = (
        frozenset(names.items()),
        tuple((tuple(t.shape), t.dtype, t.device) for t in leaves),
        tuple(sorted((c.name, len(c.edges), c.size) for c in components)),
        rest,
        custom,
    )
    if custom:
        names["(custom autograd.Function)"] += 1
    return sig, names


def facts_for(sig: Hashable, names: Counter[str]) -> tuple[GraphFacts, bool]:
    """The cached facts of a signature (made from the graph if new); and whether they were new."""
    facts = _GRAPHS.get(sig)
    if facts is not None:
        return facts, False
    slow = slow_ops(names)
    if "(custom autograd.Function)" in names:
        slow = slow + ("(custom autograd.Function)",)
    facts = GraphFacts("loop" if slow else "batched", slow)
    if len(_GRAPHS) >= _MAX_GRAPHS:
        _GRAPHS.pop(next(iter(_GRAPHS)))
    _GRAPHS[sig] = facts
    return facts, True


def next_strategy(facts: GraphFacts) -> Strategy:
    """The strategy for this sampled backward: the known best, or the untried one when it may win."""
    if not facts.slow and facts.tried == {"batched"}:
        return "loop"  # refine once: a graph vmap handles may still be faster one loss at a time
    if len(facts.per_pass) == 2:
        return min(facts.per_pass, key=facts.per_pass.__getitem__)  # type: ignore[return-value]
    return facts.strategy


def record_passes(facts: GraphFacts, strategy: Strategy, seconds: float, passes: int) -> None:
    """Keep the best seconds per pass of ``strategy``, and the winner as the graph's strategy."""
    facts.tried.add(strategy)
    per = seconds / max(passes, 1)
    facts.per_pass[strategy] = min(per, facts.per_pass.get(strategy, per))
    if len(facts.per_pass) == 2:
        facts.strategy = min(facts.per_pass, key=facts.per_pass.__getitem__)  # type: ignore[assignment]
