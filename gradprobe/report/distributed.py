"""Merging the traces of all ranks of a torch.distributed job on one rank (``Trace.gather``).

# NOTE [merging ranks]
# Every rank sends a small, picklable summary of its trace (records by name, per leaf the norm of
# each part, the local and averaged `.grad` norms, the Σ check, the findings) with
# `torch.distributed.gather_object`; no tensors travel. Ranks run the same code, so records are
# matched by position and leaves by name. Parts are local, so they may differ between ranks (each
# rank has its own batch): the merged report shows their spread. The all-reduced `.grad` must not
# differ: its norm is computed the same way on identical tensors, so ranks whose ‖.grad‖ differ
# ran out of sync (a rank wrote `.grad` after the all-reduce, or skipped the synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.text import Text

from gradprobe.capture.targets import matching_names
from gradprobe.findings import Finding
from gradprobe.report.layout import Column, fitted_table
from gradprobe._format import check_cell, number

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

    from gradprobe.api.trace import Trace

__all__ = ["LeafAcrossRanks", "MergedTrace", "gather_trace", "summarize"]

DESYNC = "GP722"


def summarize(trace: Trace, rank: int, world: int) -> dict[str, Any]:
    """One rank's trace as a small picklable dict (what ``gather`` sends)."""
    return {
        "rank": rank,
        "world": world,
        "records": [r.name for r in trace.records],
        "leaves": [
            {
                "name": row.leaf.name,
                "shape": list(row.leaf.shape),
                "parts": {p.record: p.norm for p in row.parts},
                "grad_norm": row.grad_norm,
                "local_norm": row.local_norm,
                "check": row.check,
            }
            for row in trace.breakdown()
        ],
        "findings": trace.findings,
    }


@dataclass(frozen=True)
class LeafAcrossRanks:
    """One leaf over all ranks: its part norms per record, and its ‖.grad‖, rank by rank."""

    name: str
    parts: dict[int, list[float | None]]  # record -> ‖part‖ per rank (None: not reached there)
    grad_norms: list[float | None]
    local_norms: list[float | None]
    checks: list[bool | None]

    def spread(self, record: int) -> float | None:
        """(max − min) / max of the ranks' ‖part‖ for ``record`` (None when a rank lacks it)."""
        norms = self.parts.get(record, [])
        if not norms or any(n is None for n in norms):
            return None
        high, low = max(norms), min(norms)  # type: ignore[type-var]
        return 0.0 if high == 0 else (high - low) / high  # type: ignore[operator]

    @property
    def in_sync(self) -> bool:
        """Every rank holds the same ‖.grad‖ (after an all-reduce they hold identical tensors)."""
        return len(set(self.grad_norms)) <= 1


class MergedTrace:
    """All ranks' traces, gathered on one rank. Print it with ``.report()`` (or rich's ``print``)."""

    def __init__(self, summaries: list[dict[str, Any]]) -> None:
        self.summaries = sorted(summaries, key=lambda s: s["rank"])
        self.world = len(self.summaries)
        self.records: list[str] = self.summaries[0]["records"] if self.summaries else []
        self.leaves = self._merge()
        self.findings = self._findings()

    def _merge(self) -> list[LeafAcrossRanks]:
        by_name: dict[str, list[dict[str, Any] | None]] = {}
        for r, summary in enumerate(self.summaries):
            for leaf in summary["leaves"]:
                by_name.setdefault(leaf["name"], [None] * self.world)[r] = leaf
        merged = []
        for name, rows in by_name.items():
            parts = {
                i: [None if row is None else row["parts"].get(i) for row in rows] for i in range(len(self.records))
            }
            merged.append(
                LeafAcrossRanks(
                    name=name,
                    parts={i: norms for i, norms in parts.items() if any(n is not None for n in norms)},
                    grad_norms=[None if row is None else row["grad_norm"] for row in rows],
                    local_norms=[None if row is None else row["local_norm"] for row in rows],
                    checks=[None if row is None else row["check"] for row in rows],
                )
            )
        return merged

    def _findings(self) -> list[tuple[int, Finding]]:
        found = [(s["rank"], f) for s in self.summaries for f in s["findings"]]
        desync = [leaf for leaf in self.leaves if not leaf.in_sync]
        unfinished = any(f.code == "GP721" for _, f in found)
        if desync and unfinished:
            found.append(
                (
                    -1,
                    Finding(
                        code=DESYNC,
                        kind="ddp_grad_desync",
                        severity="info",
                        message=(
                            f"the ranks hold different .grad for {len(desync)} lea{'ves' if len(desync) != 1 else 'f'}, as "
                            "expected after GP721: that backward never finished DDP's all-reduce, so .grad holds "
                            "each rank's local gradient"
                        ),
                        plugin="ddp",
                        data={"leaves": [leaf.name for leaf in desync]},
                    ),
                )
            )
        elif desync:
            names = ", ".join(leaf.name for leaf in desync[:6]) + (" …" if len(desync) > 6 else "")
            found.append(
                (
                    -1,
                    Finding(
                        code=DESYNC,
                        kind="ddp_grad_desync",
                        severity="error",
                        message=(
                            f"the ranks hold different .grad for {len(desync)} lea{'ves' if len(desync) != 1 else 'f'} "
                            f"({names}); after DDP's all-reduce every rank holds the same average, so some rank "
                            "skipped the synchronisation (no_sync on one rank only) or changed .grad after it"
                        ),
                        fix="run the same no_sync / backward sequence on every rank, and modify .grad (clipping, "
                        "scaling) identically on all ranks",
                        plugin="ddp",
                        data={"leaves": [leaf.name for leaf in desync]},
                    ),
                )
            )
        return found

    @property
    def disagreements(self) -> list[LeafAcrossRanks]:
        """Leaves whose averaged `.grad` differs between ranks."""
        return [leaf for leaf in self.leaves if not leaf.in_sync]

    def leaf(self, name: str) -> LeafAcrossRanks:
        """The leaf called ``name``: its full name or a dotted tail of it (``fc1.weight`` for ``model.fc1.weight``)."""
        found = matching_names((leaf.name for leaf in self.leaves), name)
        if len(found) == 1:
            return next(leaf for leaf in self.leaves if leaf.name == found[0])
        if found:
            raise KeyError(f"{name!r} is ambiguous in the merged trace, it ends {found}; use the full name")
        raise KeyError(f"no leaf named {name!r} in the merged trace; leaves: {[leaf.name for leaf in self.leaves]}")

    def report(self, console: Console | None = None) -> None:
        import rich

        (console or rich.get_console()).print(self)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        title = f"gradprobe · merged over {self.world} ranks · ‖part‖ per rank (local, before the all-reduce)"
        shown = list(range(min(len(self.records), 6)))
        columns = [Column("leaf", [Text(leaf.name, style="bold") for leaf in self.leaves], justify="left", shrink=12)]
        for i in shown:
            cells = []
            for leaf in self.leaves:
                norms = leaf.parts.get(i)
                if norms is None:
                    cells.append(Text("·", style="dim"))
                    continue
                present = [n for n in norms if n is not None]
                spread = leaf.spread(i)
                text = Text(f"{number(min(present))}–{number(max(present))}")
                if spread is None:
                    text.append(f" {sum(n is None for n in norms)}×·", style="yellow")
                else:
                    text.append(f" {spread:.0%}", style="yellow" if spread > 0.5 else "dim")
                cells.append(text)
            header = f"{self.records[i]}\nmin–max spread"
            columns.append(Column(header, cells, drop=20 + len(shown) - i if i else 0, dropped=f"#{i} {self.records[i]}"))
        grads = []
        for leaf in self.leaves:
            if leaf.in_sync:
                grads.append(Text(f"{number(next(iter(set(leaf.grad_norms))))} ✓"))
            else:
                grads.append(Text(" / ".join(number(n) for n in leaf.grad_norms) + " ✗", style="bold red"))
        columns.append(Column("‖.grad‖\nper rank", grads))
        checks = []
        for leaf in self.leaves:
            known = [c for c in leaf.checks if c is not None]
            checks.append(check_cell(all(known) if known else None))
        columns.append(Column("Σ local", checks, justify="center"))
        table, dropped = fitted_table(columns, options.max_width)
        yield Text(title, style="bold")
        yield table
        if dropped:
            yield Text("left out at this width: " + ", ".join(dropped), style="dim")
        yield Text(
            "spread = (max − min) / max over ranks: each rank's part comes from its own batch · "
            "✓ / ✗: the all-reduced .grad agrees / differs across ranks · Σ local: on every rank the parts add up to "
            "the local .grad before the all-reduce",
            style="dim",
        )
        if self.findings:
            lines = [Text("Findings", style="bold")]
            for rank, finding in self.findings:
                where = "all ranks" if rank < 0 else f"rank {rank}"
                lines.append(Text(f"[{where}] {finding.format()}", style="red" if finding.severity == "error" else ""))
            yield Group(*lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "records": self.records,
            "leaves": [
                {"name": leaf.name, "parts": leaf.parts, "grad_norms": leaf.grad_norms, "local_norms": leaf.local_norms}
                for leaf in self.leaves
            ],
            "findings": [{"rank": rank, **f.to_dict()} for rank, f in self.findings],
        }


def gather_trace(trace: Trace, dst: int = 0, group: Any = None) -> MergedTrace | None:
    """Collect every rank's summary on ``dst`` (a collective: every rank of ``group`` must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "Trace.gather() merges the traces of a torch.distributed job, but no process group is initialized; "
            "call torch.distributed.init_process_group(...) first, or use t.report() for a single process"
        )
    world = dist.get_world_size(group)
    summary = summarize(trace, dist.get_rank(), world)
    out: list[Any] | None = [None] * world if dist.get_rank() == dst else None
    dist.gather_object(summary, out, dst=dst, group=group)
    return MergedTrace(out) if out is not None else None
