"""What does splitting one backward into k per-loss parts cost?

    python benchmarks/decompose.py [--repeats 5] [--steps 3] [--models fpn transformer] [--ks 2 3 4 5]

Models (benchmarks/models.py): an FPN-style detector (conv + BatchNorm backbone, FPN, shared towers
with GroupNorm; 2-5 losses: cls, box, centerness, GIoU, segmentation) and a GPT-style decoder (pre-norm
blocks with LayerNorm and SDPA; 2-6 losses: LM, regression, auxiliary LM after blocks 3/2/1, z-loss).
Per model and k, the backward only (the forward is not timed), CPU time (time.process_time), one
torch thread, blocks of steps interleaved (plain, k separate, batched, decomposed, ...), medians:

  plain       sum(losses).backward(), untraced
  separate    k torch.autograd.grad(loss_i, params, retain_graph=True) calls
  batched     one torch.autograd.grad over the k losses with is_grads_batched=True
  decomposed  sum(losses).backward() under gradprobe.trace(model, decompose=True), steady state
              (later steps of a trace, one part derived from the backward itself)
  first/steady, cold: the first decomposed backward of the process for this model (all k parts
              computed and the sum checked) over the steady state
  first/steady, new trace: the first decomposed backward of a new trace once the process knows the
              graph (no probing, no second check) over the steady state

Targets (issue 14): decomposed / separate <= 1.0 on the conv detector; first / steady <= 1.2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradprobe  # noqa: E402
from gradprobe.analysis import strategy as _strategy  # noqa: E402
from models import DECOMPOSE_MODELS  # noqa: E402

Losses = Callable[[], "dict[str, torch.Tensor]"]


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def plain_block(model: torch.nn.Module, losses: Losses, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        total = sum(losses().values())
        out.append(_cpu(total.backward))  # type: ignore[union-attr]
    return out


def separate_block(model: torch.nn.Module, losses: Losses, steps: int) -> list[float]:
    params = _params(model)
    out = []
    for _ in range(steps):
        ls = list(losses().values())
        out.append(_cpu(lambda: [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in ls]))
    return out


def batched_block(model: torch.nn.Module, losses: Losses, steps: int) -> list[float]:
    params = _params(model)
    out = []
    for _ in range(steps):
        ls = torch.stack(list(losses().values()))
        eye = torch.eye(len(ls), device=ls.device)
        out.append(_cpu(lambda: torch.autograd.grad(ls, params, eye, allow_unused=True, is_grads_batched=True)))
    return out


def decomposed_block(model: torch.nn.Module, losses: Losses, steps: int, cold: bool) -> tuple[float, list[float], str, str]:
    """(first backward of the trace, later ones, strategy, check text of the first split)."""
    if cold:
        _strategy._GRAPHS.clear()
    times = []
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        for _ in range(steps + 1):
            model.zero_grad(set_to_none=True)
            named = t.losses(losses())  # held until the backward: names are kept by weak reference
            total = sum(named.values())
            times.append(_cpu(total.backward))  # type: ignore[union-attr]
            del named
    splits = [s for s in t.splits() if s.kind == "decomposed"]
    assert len(splits) == steps + 1, "not every backward was decomposed"
    assert splits[0].check is not False, "decomposition did not check out"
    return times[0], times[1:], splits[-1].strategy, splits[0].check_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(DECOMPOSE_MODELS), choices=list(DECOMPOSE_MODELS))
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of losses (default: each model's range)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU time, backward only, "
        f"medians of {args.repeats} interleaved blocks x {args.steps} steps"
    )
    head = (
        f"{'model':12} {'k':>2} {'plain':>8} {'separate':>9} {'batched':>8} {'decomp':>8} | "
        f"{'dec/plain':>9} {'dec/sep':>8} {'dec/batch':>9} {'first/steady':>12} {'new trace':>9}  strategy"
    )
    print(head)
    print("-" * len(head))
    for name in args.models:
        make, ks = DECOMPOSE_MODELS[name]
        for k in args.ks or list(ks):
            if k not in ks:
                continue
            model, losses = make(k, "cpu")
            plain_block(model, losses, 1)  # warm up
            separate_block(model, losses, 1)
            p, s, b, d, cold, warm = [], [], [], [], [], []
            how = ""
            for rep in range(args.repeats):
                p += plain_block(model, losses, args.steps)
                s += separate_block(model, losses, args.steps)
                b += batched_block(model, losses, max(1, args.steps // 2))
                first, later, how, _ = decomposed_block(model, losses, args.steps, cold=rep % 2 == 0)
                (cold if rep % 2 == 0 else warm).append(first)
                d += later
            mp, ms, mb, md = (statistics.median(x) * 1e3 for x in (p, s, b, d))
            mc = statistics.median(cold) * 1e3
            mw = statistics.median(warm) * 1e3 if warm else float("nan")
            print(
                f"{name:12} {k:>2} {mp:7.1f}ms {ms:8.1f}ms {mb:7.1f}ms {md:7.1f}ms | "
                f"{md / mp:9.2f} {md / ms:8.2f} {md / mb:9.2f} {mc / md:12.2f} {mw / md:9.2f}  {how.split(';')[0]})"
            )
    print(
        "dec/sep <= 1.00 and first/steady <= 1.20 are the targets; 'first/steady' is the process's first "
        "decomposed backward of the model (all k parts, sum checked), 'new trace' a later trace's first."
    )


if __name__ == "__main__":
    main()
