"""Renderables for per-loss splits: a table grouped by module, with shares, cosines and the check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text

from gradprobe.analysis.split import CONFLICT_COSINE, ModuleSplit
from gradprobe.hookspecs import hookimpl
from gradprobe._format import check_cell, number, share
from gradprobe.report.layout import Column, fitted_table
from gradprobe.report.tree import MAX_ROWS

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult

    from gradprobe.analysis.split import GramView, LeafSplit, Split
    from gradprobe.report.tree import Depth
    from gradprobe.api.trace import Trace

__all__ = ["DecompositionSection", "split_table"]

_MAX_SPLITS = 3


def _part(view: GramView, i: int, scale: float = 0.0) -> Text:
    if not view.reached[i]:
        return Text("·", style="dim")
    norm = view.norms[i]
    if norm is None:
        return Text("?", style="dim")
    if view.zero(i):
        return Text("zero", style="magenta")
    if view.negligible(i, scale):
        return Text("≈0", style="dim")  # within its round-off bound: neither size nor direction to read
    text = Text(number(norm))
    s = view.shares[i]
    if s is not None:
        text.append(f" {share(s)}", style="bold" if s >= 0.5 else "")
    return text


def _cos(view: GramView, k: int, names: tuple[str, ...], scale: float) -> Text:
    live = [i for i in range(k) if view.reached[i] and not view.zero(i) and not view.negligible(i, scale)]
    if view.gram is not None and len(live) < 2 and any(view.negligible(i, scale) for i in range(k)):
        return Text("≈0", style="dim")  # round-off-sized parts: no direction to read
    worst: tuple[float, int, int] | None = None
    for i in live:
        for j in live:
            if j <= i:
                continue
            c = view.cosine(i, j)
            if c is not None and (worst is None or c < worst[0]):
                worst = (c, i, j)
    if worst is None:
        return Text("—" if view.gram is None else "", style="dim")
    c, i, j = worst
    text = Text(f"{c:+.2f}", style="bold red" if c <= CONFLICT_COSINE else ("yellow" if c < 0 else ""))
    if k > 2:
        text.append(f" {names[i]}·{names[j]}", style="dim")
    return text


def split_table(split: Split, max_leaf_rows: int = 24, depth: Depth = "auto") -> RenderableType:
    """One row per module (and per leaf, when there are few): each loss's ‖part‖ and share, cosine, Σ.

    ``depth=None`` shows every module and leaf; otherwise a big model shows its ``MAX_ROWS``
    largest modules and one "… N more" row (NOTE [folding] in ``report/tree.py``).
    """
    return _SplitTable(split, max_leaf_rows, depth)


def _together(name: str, leaves: list[LeafSplit], k: int) -> ModuleSplit:
    """Several leaves as one row (their Gram matrices summed, as :meth:`Split.modules` does)."""
    reached = tuple(any(leaf.reached[i] for leaf in leaves) for i in range(k))
    gram = None
    if leaves and all(leaf.gram is not None for leaf in leaves):
        gram = tuple(tuple(sum(leaf.gram[i][j] for leaf in leaves) for j in range(k)) for i in range(k))  # type: ignore[index]
    return ModuleSplit(name, tuple(leaves), gram, reached)


class _SplitTable:
    """A split laid out for the console's width (NOTE [one line per row] in ``report/layout.py``)."""

    def __init__(self, split: Split, max_leaf_rows: int, depth: Depth) -> None:
        self.split, self.max_leaf_rows, self.depth = split, max_leaf_rows, depth

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        split = self.split
        k = len(split.losses)
        if split.kind == "decomposed":
            where = f" at {split.site}" if split.site else ""
            title = f"Per-loss split of one backward · {split.title}{where}"
        else:
            title = "Per-loss split of the final .grad · one part per backward call"
        everything = self.depth is None
        show_leaves = everything or len(split.leaves) <= self.max_leaf_rows
        scale = max((leaf.largest for leaf in split.leaves), default=0.0)
        modules = split.modules()
        hidden: list[ModuleSplit] = []
        if not everything and len(modules) > MAX_ROWS:
            ranked = sorted(modules, key=lambda m: -(m.total_norm or 0.0))
            keep = {id(m) for m in ranked[:MAX_ROWS]}
            hidden = [m for m in modules if id(m) not in keep]
            modules = [m for m in modules if id(m) in keep]
            modules.sort(key=lambda m: -(m.total_norm or 0.0))
        labels: list[Text] = []
        indents: list[int] = []
        values: list[tuple[GramView, float]] = []
        for module in modules:
            lone = len(module.leaves) == 1 and module.leaves[0].leaf.name == module.name
            labels.append(Text(module.name, style="bold"))
            indents.append(0)
            values.append((module, scale))
            if show_leaves and not lone:
                for leaf in module.leaves:
                    name = leaf.leaf.name
                    label = name[len(module.name) + 1 :] if name.startswith(module.name + ".") else name
                    labels.append(Text("  " + label, style="dim"))
                    indents.append(2)
                    values.append((leaf, scale))
        if hidden:
            labels.append(Text(f"… {len(hidden)} more modules", style="dim"))
            indents.append(0)
            values.append((_together("more", [leaf for m in hidden for leaf in m.leaves], k), scale))
        labels.append(Text("(all)", style="bold"))
        indents.append(0)
        values.append((split.model(), 0.0))
        weights = split.weights or ()
        columns = [Column("module / leaf", labels, justify="left", shrink=12, indents=indents)]
        for i, name in enumerate(split.losses):
            header = Text(name, style="bold")
            if i < len(weights):
                header.append(f"\n× {weights[i]}", style="dim")
            elif name == "(rest)" or name == split.derived:
                header.append("\nderived", style="dim")
            cells = [_part(view, i, sc) for view, sc in values]
            columns.append(Column(header, cells, drop=20 + k - i if i else 0, dropped=f"loss {name}"))
        cos = [_cos(view, k, split.losses, scale) for view, _ in values]
        columns.append(Column("cos" if k == 2 else "lowest cos", cos, drop=10, dropped="cos"))
        columns.append(Column("Σ", [check_cell(getattr(view, "check", None)) for view, _ in values], justify="center"))
        table, dropped = fitted_table(columns, options.max_width, ends={len(values) - 2})
        notes = [f"computed: {split.strategy}"] + ([split.cost] if split.cost else []) + list(split.notes)
        if split.kind == "decomposed":
            notes.append(split.check_text)
        if dropped:
            notes.append("left out at this width: " + ", ".join(dropped) + "; Trace.splits() has everything")
        if hidden:
            notes.append(f"{len(hidden)} smaller modules in one row; t.report(depth=None) shows them all")
        elif not show_leaves:
            notes.append(f"{len(split.leaves)} leaves grouped by module; t.report(depth=None) shows every leaf")
        legend = (
            "‖part‖ share% (projection on the sum; the shares add up to 100%)   · not reached   "
            f"zero = reached, exactly 0   cos ≤ {CONFLICT_COSINE} (red): the losses pull against each other   "
            "≈0: within the part's round-off bound (size and dtype of the leaf), no size or direction to read"
            + (
                "   Σ: the parts add up to what the backward added (rtol 1e-5; blank where a part is derived: not checked)"
                if split.kind == "decomposed"
                else ""
            )
        )
        yield Text(title, style="bold")
        yield table
        for note in notes:
            yield Text(note, style="dim")
        yield Text(legend, style="dim")


class DecompositionSection:
    """The per-loss split tables (decomposed backwards, and the final .grad by backward call)."""

    @hookimpl
    def gradprobe_report_sections(self, trace: Trace) -> list[Any]:
        if trace._plugins.get_plugin("decompose") is None:
            return []
        splits = trace.splits()
        decomposed = [s for s in splits if s.kind == "decomposed"]
        out: list[Any] = []
        cost = getattr(trace._decomposer(), "cost", "")
        if len(decomposed) > 1 and cost:
            out.append(Text(f"Over all {len(decomposed)} decomposed backwards: {cost}", style="dim"))
        if len(decomposed) > _MAX_SPLITS:
            out.append(
                Text(
                    f"{len(decomposed)} backwards decomposed; showing the last {_MAX_SPLITS} (Trace.splits() has all)",
                    style="dim",
                )
            )
            decomposed = decomposed[-_MAX_SPLITS:]
        depth = getattr(trace, "_report_depth", "auto")
        out += [split_table(s, depth=depth) for s in decomposed]
        for s in splits:
            if s.kind == "decomposed":
                continue
            if not _any_shared_known(s):  # every leaf two losses reach has unknown shares: all "?"
                out.append(Text(
                    "Per-loss split of the final .grad: not shown, no leaf that several backward calls reach has "
                    "known shares (3+ parts in keep='stats'; trace(keep='tensors') has them)", style="dim",
                ))
                continue
            out.append(split_table(s, depth=depth))
        return out


def _any_shared_known(split: Any) -> bool:
    """Whether some leaf reached by two or more losses has its shares (a Gram matrix) known."""
    shared = [leaf for leaf in split.leaves if sum(leaf.reached) >= 2]
    return not shared or any(leaf.gram is not None for leaf in shared)
