"""How long does rendering a report of a big model take? (issue 16: 5,000 leaves < 1 s)

    python benchmarks/render.py [--blocks 50] [--layers 50] [--calls 3] [--repeats 3] [--decompose]

Builds a model of ``blocks x layers`` small Linear layers (2 tensors each: 5,000 parameter tensors
by default, named like ``blocks.17.layers.31.weight``), runs ``--calls`` backward calls of it under
one trace, then times ``t.report()`` to a non-terminal ``Console(width=120)`` and rendering the report
to a string (``gradprobe.report.export.render(t).export_text()``). The first render also reads the
statistics back from the device and builds the breakdown (cached afterwards); it is printed apart.
Prints each time and its ratio to the 1 s target.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from rich.console import Console
from torch import nn

import gradprobe
from gradprobe.report.export import render

TARGET_S = 1.0


class Deep(nn.Module):
    """``blocks`` blocks of ``layers`` Linear(4, 4) layers each, applied in sequence."""

    def __init__(self, blocks: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Module() for _ in range(blocks)
        )
        for block in self.blocks:
            block.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            for layer in block.layers:
                x = x + 0.1 * torch.tanh(layer(x))
        return x


def build(blocks: int, layers: int, calls: int, decompose: bool) -> gradprobe.Trace:
    torch.manual_seed(0)
    model = Deep(blocks, layers)
    x = torch.randn(2, 4)
    with gradprobe.trace(model, decompose=decompose, on_finding="record") as t:
        out = model(x)
        losses = [out.pow(i + 1).mean() for i in range(calls)]
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < calls - 1)
    return t


def measure(
    blocks: int = 50, layers: int = 50, calls: int = 3, repeats: int = 3, decompose: bool = False,
    depth: int | str | None = "auto", echo: bool = False,
) -> dict[str, float]:
    """Seconds to render the report of a ``blocks`` x ``layers`` x 2-tensor trace (5,000 leaves by default):
    the first render (reads statistics back, builds the breakdown), later renders to a Console and to a string."""
    torch.set_num_threads(1)
    t = build(blocks, layers, calls, decompose)
    if echo:
        print(f"trace: {len(t.leaves)} leaves, {len(t.records)} backward calls, depth={depth!r}")

    def to_console() -> int:
        console = Console(file=io.StringIO(), width=120)
        t.report(console=console, depth=depth)
        return len(console.file.getvalue().splitlines())  # type: ignore[attr-defined]

    def to_string() -> int:
        t._report_depth = depth  # what t.report(depth=...) sets while it prints
        try:
            return len(render(t, width=120).export_text().splitlines())
        finally:
            t._report_depth = "auto"

    start = time.perf_counter()
    lines = to_console()
    first = time.perf_counter() - start
    out = {"leaves": float(len(t.leaves)), "first_s": first, "lines": float(lines)}
    if echo:
        print(f"first t.report() (reads statistics back, builds the breakdown): {first:.3f} s  ({first / TARGET_S:.2f}x the 1 s target), {lines} lines")
    for key, name, fn in (("console_s", "t.report() to Console(width=120)", to_console), ("string_s", "report to a string (export_text)", to_string)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            lines = fn()
            times.append(time.perf_counter() - start)
        out[key] = statistics.median(times)
        if echo:
            print(f"{name:36} {out[key]:.3f} s median of {repeats}  ({out[key] / TARGET_S:.2f}x the 1 s target), {lines} lines")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decompose", action="store_true", help="trace(decompose=True) (adds the per-backward split)")
    parser.add_argument("--depth", default="auto", help="report depth: auto, none, or a level")
    args = parser.parse_args()
    depth: int | str | None = None if args.depth == "none" else (args.depth if args.depth == "auto" else int(args.depth))
    measure(args.blocks, args.layers, args.calls, args.repeats, args.decompose, depth, echo=True)


if __name__ == "__main__":
    main()
