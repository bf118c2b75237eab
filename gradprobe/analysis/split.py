"""Splits of gradients by loss: shares, pairwise cosines, checks, grouped by module.

A :class:`Split` is one gradient broken into per-loss parts, either the parts of one decomposed
backward (``trace(..., decompose=True)``) or the parts separate backward calls added to ``.grad``.
Everything here is computed from each leaf's Gram matrix of parts, ``G[i][j] = <part_i, part_j>``:
norms are ``sqrt(G[i][i])``, the projection share of loss i in the sum T is ``sum_j G[i][j] / sum G``
(the shares add up to 100%), and Gram matrices of leaves add up to the Gram matrix of their module.

# NOTE [tolerance]
# The parts, summed, differ from what the backward added by float round-off. A purely relative
# tolerance per parameter fails where the true gradient is ~0 (BatchNorm biases before another norm,
# attention key biases), so the bound is rtol * max(|g|_max of the leaf, FLOOR * |g|_max of the model):
# ``rtol = 1e-5`` per parameter, with a floor scaled by the model's largest gradient. Round-off
# scales with the summands, so |g|_max of the leaf also covers its parts (losses that cancel give
# parts larger than their sum). FLOOR = 0.1: the bias of a conv before BatchNorm has a true gradient
# of 0 and a float32 one of ~4e-8 * the model's largest; its parts then sum to within ~7e-8 * that
# (a CNN with four heads), 0.07 of this bound; every other leaf of the test models is under 0.01.

# NOTE [round-off]
# "≈0" means: this part is within the round-off bound of its leaf, so neither its size nor its
# direction can be read. The bound is estimated from the leaf's size and dtype and the backward's
# scale: ROUNDOFF_FACTOR * eps(dtype) * sqrt(numel) * A, where A is the largest |element| of any
# gradient (or part) of that backward. A gradient that is exactly zero in exact arithmetic but is a
# float sum of terms that cancel (the bias of a conv before BatchNorm) comes out at ~0.3 eps * A per
# element on the test models, well inside; a real gradient must be ~1e-6 * A (float32) per element
# to be called round-off. Dividing by the model's largest *part norm* instead (the old rule,
# 1e-4 of it) hid real gradients of small modules 1e6x above their round-off. A derived part
# (total - sum of the computed parts) also carries the round-off of that subtraction,
# eps * k * (||total|| + sum_i ||part_i||), read off the Gram matrix. Norms and Gram matrices are accumulated in
# float64, so the bound is about the gradients, not about the reductions. Exact zeros (a loss that
# reaches the leaf but adds exactly 0, or a derived loss that does not reach it) show as zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gradprobe.capture.targets import matching_names

if TYPE_CHECKING:
    import torch

    from gradprobe.ledger.ledger import Leaf
    from gradprobe.capture.sites import Site

__all__ = [
    "CONFLICT_COSINE",
    "FLOOR",
    "NEGLIGIBLE",
    "ROUNDOFF_FACTOR",
    "RTOL",
    "GramView",
    "LeafSplit",
    "ModuleSplit",
    "Split",
    "roundoff_bound",
]

RTOL = 1e-5
FLOOR = 0.1
CONFLICT_COSINE = -0.5  # "strongly negative": the two losses pull against each other
_MIN_RATIO = 0.1  # ...and the weaker pulls with at least this fraction of the stronger's norm
NEGLIGIBLE = 1e-4  # fallback only, for views without a round-off bound (see NOTE [round-off])
ROUNDOFF_FACTOR = 8.0


def roundoff_bound(numel: int, dtype: torch.dtype, scale: float) -> float:
    """Norm below which a part of a leaf of ``numel`` elements of ``dtype`` is round-off (NOTE [round-off])."""
    import torch

    eps = torch.finfo(dtype).eps if dtype.is_floating_point or dtype.is_complex else 0.0
    return ROUNDOFF_FACTOR * eps * math.sqrt(max(numel, 1)) * scale


class GramView:
    """Norms, shares and cosines read from a Gram matrix of per-loss parts (None: not knowable)."""

    gram: tuple[tuple[float, ...], ...] | None
    reached: tuple[bool, ...]
    roundoff: tuple[float, ...] | None  # per part: norm bound of round-off (NOTE [round-off])

    @property
    def norms(self) -> tuple[float | None, ...]:
        if self.gram is None:
            return tuple(None for _ in self.reached)
        return tuple(math.sqrt(max(self.gram[i][i], 0.0)) for i in range(len(self.gram)))

    @property
    def total_norm(self) -> float | None:
        if self.gram is None:
            return None
        return math.sqrt(max(sum(map(sum, self.gram)), 0.0))

    @property
    def shares(self) -> tuple[float | None, ...]:
        """Projection share of each loss in the summed gradient (they add up to 1)."""
        if self.gram is None:
            return tuple(None for _ in self.reached)
        t2 = sum(map(sum, self.gram))
        if not t2 > 0 or not math.isfinite(t2):
            return tuple(None for _ in self.gram)
        return tuple(sum(row) / t2 for row in self.gram)

    def cosine(self, i: int, j: int) -> float | None:
        if self.gram is None:
            return None
        d = math.sqrt(max(self.gram[i][i], 0.0) * max(self.gram[j][j], 0.0))
        if not d > 0 or not math.isfinite(d):
            return None
        return max(-1.0, min(1.0, self.gram[i][j] / d))

    def zero(self, i: int) -> bool:
        """Reached by loss ``i``, but its part is exactly zero."""
        return self.reached[i] and self.gram is not None and self.gram[i][i] == 0.0

    def negligible(self, i: int, scale: float = 0.0) -> bool:
        """Part ``i`` is non-zero but within round-off: no size or direction to read (shown "≈0").

        Without a round-off bound (old data), ``scale`` (the model's largest part norm) gives the
        fallback rule ``NEGLIGIBLE * scale``.
        """
        norm = self.norms[i]
        if norm is None or norm == 0.0:
            return False
        if self.roundoff is not None:
            return norm <= self.roundoff[i]
        return norm <= NEGLIGIBLE * scale

    @property
    def largest(self) -> float:
        """The norm of the largest part (0 when unknown)."""
        return max((n for n in self.norms if n is not None), default=0.0)

    def conflicts(self, scale: float = 0.0) -> list[tuple[int, int, float]]:
        """Pairs of losses whose parts point strongly against each other here.

        Parts within round-off are ignored (``scale``: fallback for views without a bound).
        """
        out = []
        norms = self.norms
        for i in range(len(self.reached)):
            for j in range(i + 1, len(self.reached)):
                if self.negligible(i, scale) or self.negligible(j, scale):
                    continue
                cos = self.cosine(i, j)
                ni, nj = norms[i] or 0.0, norms[j] or 0.0
                if cos is not None and cos <= CONFLICT_COSINE and min(ni, nj) >= _MIN_RATIO * max(ni, nj):
                    out.append((i, j, cos))
        return out


@dataclass(frozen=True)
class LeafSplit(GramView):
    """One leaf's gradient (of one backward, or its final ``.grad``) split by loss."""

    leaf: Leaf
    gram: tuple[tuple[float, ...], ...] | None
    reached: tuple[bool, ...]
    error: float | None = None  # max |sum of parts - what the backward added|
    tolerance: float | None = None
    parts: tuple[torch.Tensor, ...] | None = None  # keep="tensors" only
    verified: bool | None = None  # per-backward splits: the ledger's own check of the parts vs .grad
    roundoff: tuple[float, ...] | None = None
    derived: bool = False  # one part is the backward's gradient minus the others: "derived: not checked"

    @property
    def check(self) -> bool | None:
        """The parts add up to what the backward added (None: nothing independent to check)."""
        if self.error is None or self.tolerance is None:
            return self.verified
        return self.error <= self.tolerance


@dataclass(frozen=True)
class ModuleSplit(GramView):
    """The leaves of one module, their Gram matrices summed (exact for the concatenated gradient)."""

    name: str
    leaves: tuple[LeafSplit, ...]
    gram: tuple[tuple[float, ...], ...] | None
    reached: tuple[bool, ...]
    roundoff: tuple[float, ...] | None = None

    @property
    def check(self) -> bool | None:
        checks = [leaf.check for leaf in self.leaves if leaf.check is not None]
        return all(checks) if checks else None


def _module_of(leaf: Leaf) -> str:
    return leaf.module or leaf.name


def _group(name: str, leaves: list[LeafSplit], k: int) -> ModuleSplit:
    reached = tuple(any(leaf.reached[i] for leaf in leaves) for i in range(k))
    gram: tuple[tuple[float, ...], ...] | None = None
    if leaves and all(leaf.gram is not None for leaf in leaves):
        gram = tuple(
            tuple(sum(leaf.gram[i][j] for leaf in leaves) for j in range(k))  # type: ignore[index]
            for i in range(k)
        )
    roundoff = None
    if leaves and all(leaf.roundoff is not None for leaf in leaves):
        # the bound of a concatenation: the root of the sum of squares
        roundoff = tuple(math.sqrt(sum(leaf.roundoff[i] ** 2 for leaf in leaves)) for i in range(k))  # type: ignore[index]
    return ModuleSplit(name, tuple(leaves), gram, reached, roundoff)


@dataclass(frozen=True)
class Split:
    """A gradient split into per-loss parts, for every leaf it reached.

    Attributes:
        title: what was split (the backward call, or "the final .grad").
        kind: ``"decomposed"`` (one backward of a combined loss) or ``"per-backward"``.
        record: the backward record's index (decomposed only).
        site: the user's line of that backward.
        losses: the name of each part, in order (``"(rest)"`` for terms outside the named losses).
        weights: ``d root / d loss`` per loss, as text (decomposed only).
        leaves: one :class:`LeafSplit` per leaf.
        strategy: how the parts were computed, in words.
        notes: anything the reader must know (fallbacks, what is not exact).
        derived: the part computed as the backward's gradient minus the others, if any.
        cost: what computing the split cost next to the user's backward, in words (decomposed only).
    """

    title: str
    kind: Literal["decomposed", "per-backward"]
    record: int | None
    site: Site | None
    losses: tuple[str, ...]
    weights: tuple[str, ...] | None
    leaves: tuple[LeafSplit, ...]
    strategy: str
    notes: tuple[str, ...] = ()
    derived: str | None = None
    cost: str = ""

    def modules(self) -> list[ModuleSplit]:
        """Leaves grouped by the module that owns them, in first-seen order."""
        groups: dict[str, list[LeafSplit]] = {}
        for leaf in self.leaves:
            groups.setdefault(_module_of(leaf.leaf), []).append(leaf)
        return [_group(name, leaves, len(self.losses)) for name, leaves in groups.items()]

    def model(self) -> ModuleSplit:
        """All leaves together."""
        return _group("(all)", list(self.leaves), len(self.losses))

    @property
    def check(self) -> bool | None:
        checks = [leaf.check for leaf in self.leaves if leaf.check is not None]
        return all(checks) if checks else None

    @property
    def check_text(self) -> str:
        """The Σ check of the whole split in words: checked, failed, or "derived: not checked"."""
        checked = [leaf.check for leaf in self.leaves if leaf.check is not None]
        derived = sum(1 for leaf in self.leaves if leaf.derived)
        bad = sum(1 for c in checked if c is False)
        parts = []
        if checked:
            parts.append(
                f"Σ ✗ on {bad} of {len(checked)} checked leaves" if bad else f"Σ ✓ on {len(checked)} checked leaves"
            )
        if derived:
            who = f"{self.derived} = your backward's gradient minus the other parts" if self.derived else "derived part"
            parts.append(f"derived: not checked on {derived} leaves ({who})")
        return "; ".join(parts) or "Σ: nothing to check"

    def leaf(self, name: str) -> LeafSplit:
        """The leaf called ``name``: its full name or a dotted tail of it (``fc1.weight`` for ``model.fc1.weight``)."""
        found = matching_names((x.leaf.name for x in self.leaves), name)
        if len(found) == 1:
            return next(x for x in self.leaves if x.leaf.name == found[0])
        if found:
            raise KeyError(f"{name!r} is ambiguous in this split, it ends {found}; use the full name")
        raise KeyError(f"no leaf named {name!r} in this split; leaves: {[x.leaf.name for x in self.leaves]}")

    def to_dict(self) -> dict[str, object]:
        return {
            "title": self.title,
            "kind": self.kind,
            "record": self.record,
            "losses": list(self.losses),
            "weights": list(self.weights) if self.weights else None,
            "strategy": self.strategy,
            "cost": self.cost,
            "notes": list(self.notes),
            "derived": self.derived,
            "check": self.check,
            "check_text": self.check_text,
            "leaves": [
                {
                    "leaf": x.leaf.name,
                    "norms": list(x.norms),
                    "shares": list(x.shares),
                    "reached": list(x.reached),
                    "error": x.error,
                    "tolerance": x.tolerance,
                    "check": x.check,
                    "derived": x.derived,
                    "roundoff": list(x.roundoff) if x.roundoff is not None else None,
                }
                for x in self.leaves
            ],
        }
