"""What does splitting one backward into k per-loss parts cost?

    python benchmarks/decompose.py [--repeats 7] [--steps 6] [--device cpu]

For k = 2, 4, 8 losses on a small CNN (conv + BatchNorm trunk, k 1x1-conv heads) and a transformer
block (one TransformerEncoderLayer, k linear heads), per training step (backward only; the forward
is not timed):
  plain       the sum of the k losses, .backward(), untraced
  decomposed  the same backward under gradprobe.trace(model, decompose=True)  (steady state: the
              first step of each trace, which times both strategies, is left out)
  naive       k separate torch.autograd.grad(loss_i, params, retain_graph=True) calls
Blocks of steps are interleaved (plain, decomposed, naive, plain, ...) and medians are reported.
Targets: decomposed <= k x plain, and decomposed < naive for k >= 4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


class CNN(nn.Module):
    def __init__(self, k: int, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Conv2d(width, 4, 1) for _ in range(k))
        self.x = torch.randn(8, 3, 32, 32)

    def losses(self) -> list[torch.Tensor]:
        h = self.trunk(self.x)
        return [F.mse_loss(head(h), torch.full((1,), float(i)).expand(8, 4, 16, 16)) for i, head in enumerate(self.heads)]


class Block(nn.Module):
    def __init__(self, k: int, d: int = 256) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(d, 16) for _ in range(k))
        self.x = torch.randn(8, 64, d)
        self.y = torch.randint(0, 16, (8 * 64,))

    def losses(self) -> list[torch.Tensor]:
        h = self.layer(self.x)
        return [F.cross_entropy(head(h).reshape(-1, 16), (self.y + i) % 16) for i, head in enumerate(self.heads)]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_block(model: nn.Module, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        total = sum(model.losses())
        out.append(_time(total.backward))
    return out


def decomposed_block(model: nn.Module, steps: int) -> tuple[list[float], str]:
    out = []
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        for _ in range(steps + 1):
            model.zero_grad(set_to_none=True)
            losses = model.losses()  # one call site for all heads: name them, or they count as one loss
            total = sum(t.losses({f"head{i}": loss for i, loss in enumerate(losses)}).values())
            out.append(_time(total.backward))
    splits = [s for s in t.splits() if s.kind == "decomposed"]
    assert splits and splits[0].check, "decomposition did not check out"
    return out[1:], splits[-1].strategy.split(",")[0]


def naive_block(model: nn.Module, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for _ in range(steps):
        losses = model.losses()
        out.append(_time(lambda: [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--models", nargs="+", default=["CNN", "Block"], choices=["CNN", "Block"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} x {args.steps} steps")
    print(f"{'model':12} {'k':>2} {'plain ms':>9} {'decomp ms':>10} {'naive ms':>9} "
          f"{'decomp/plain':>13} {'naive/plain':>12} {'decomp/naive':>13}  strategy  targets")
    for make in [{"CNN": CNN, "Block": Block}[name] for name in args.models]:
        for k in args.ks:
            model = make(k)
            plain_block(model, 2)  # warm up
            naive_block(model, 2)
            p, d, n = [], [], []
            strategy = "?"
            for _ in range(args.repeats):
                p += plain_block(model, args.steps)
                times, strategy = decomposed_block(model, args.steps)
                d += times
                n += naive_block(model, args.steps)
            mp, md, mn = (statistics.median(x) * 1e3 for x in (p, d, n))
            ok_k = md <= k * mp
            ok_naive = md < mn if k >= 4 else True
            best = min(d) / min(p), min(d) / min(n)
            verdict = ("≤k×plain ✓" if ok_k else "≤k×plain ✗") + ("" if k < 4 else (", <naive ✓" if ok_naive else ", <naive ✗"))
            print(f"{make.__name__:12} {k:>2} {mp:9.2f} {md:10.2f} {mn:9.2f} {md / mp:13.2f} {mn / mp:12.2f} "
                  f"{md / mn:13.2f}  {strategy:8}  {verdict}   (best-of: {best[0]:.2f}, {best[1]:.2f})")


if __name__ == "__main__":
    main()
