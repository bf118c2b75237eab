"""Renderables for per-loss splits: a table grouped by module, with shares, cosines and the check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.text import Text

from gradprobe.analysis.split import CONFLICT_COSINE
from gradprobe.hookspecs import hookimpl
from gradprobe._format import check_cell, number, share

if TYPE_CHECKING:
    from rich.console import RenderableType

    from gradprobe.analysis.split import GramView, Split
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


def split_table(split: Split, max_leaf_rows: int = 24) -> RenderableType:
    """One row per module (and per leaf, when there are few): each loss's ‖part‖ and share, cosine, Σ."""
    k = len(split.losses)
    if split.kind == "decomposed":
        where = f" at {split.site}" if split.site else ""
        title = f"Per-loss split of one backward · {split.title}{where}"
    else:
        title = "Per-loss split of the final .grad · one part per backward call"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("module / leaf", no_wrap=True, overflow="ellipsis", min_width=12)
    weights = split.weights or ()
    for i, name in enumerate(split.losses):
        header = Text(name, style="bold")
        if i < len(weights):
            header.append(f"\n× {weights[i]}", style="dim")
        elif name == "(rest)" or name == split.derived:
            header.append("\nderived", style="dim")
        table.add_column(header, justify="right")
    table.add_column("cos" if k == 2 else "lowest cos", justify="right")
    table.add_column("Σ", justify="center")
    show_leaves = len(split.leaves) <= max_leaf_rows
    scale = max((leaf.largest for leaf in split.leaves), default=0.0)
    for module in split.modules():
        lone = len(module.leaves) == 1 and module.leaves[0].leaf.name == module.name
        cells: list[Any] = [Text(module.name, style="bold")]
        cells += [_part(module, i, scale) for i in range(k)]
        table.add_row(*cells, _cos(module, k, split.losses, scale), check_cell(module.check))
        if show_leaves and not lone:
            for leaf in module.leaves:
                label = leaf.leaf.name[len(module.name) + 1 :] if leaf.leaf.name.startswith(module.name + ".") else leaf.leaf.name
                cells = [Text("  " + label, style="dim")] + [_part(leaf, i, scale) for i in range(k)]
                table.add_row(*cells, _cos(leaf, k, split.losses, scale), check_cell(leaf.check))
    model = split.model()
    table.add_row(
        Text("(all)", style="bold"),
        *[_part(model, i) for i in range(k)],
        _cos(model, k, split.losses, scale),
        check_cell(split.check),
        end_section=True,
    )
    captions = [f"computed: {split.strategy}"] + ([split.cost] if split.cost else []) + list(split.notes)
    if split.kind == "decomposed":
        captions.append(split.check_text)
    if not show_leaves:
        captions.append(f"{len(split.leaves)} leaves grouped by module; Trace.splits() has every leaf")
    captions.append(
        "‖part‖ share% (projection on the sum; the shares add up to 100%)   · not reached   "
        f"zero = reached, exactly 0   cos ≤ {CONFLICT_COSINE} (red): the losses pull against each other   "
        "≈0: within the part's round-off bound (size and dtype of the leaf), no size or direction to read"
        + (
            "   Σ: the parts add up to what the backward added (rtol 1e-5; blank where a part is derived: not checked)"
            if split.kind == "decomposed"
            else ""
        )
    )
    table.caption = "\n".join(captions)
    table.caption_justify = "left"
    return table


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
        out += [split_table(s) for s in decomposed]
        out += [split_table(s) for s in splits if s.kind != "decomposed"]
        return out
