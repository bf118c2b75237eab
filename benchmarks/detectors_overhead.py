"""Overhead of gradprobe's mistake detectors on small training steps.

    python benchmarks/detectors_overhead.py [--repeats 15] [--steps 10]

Times one training step (forward, loss, backward, optimizer step, zero_grad) of a small MLP, CNN,
LSTM and transformer, inside one `gradprobe.trace(model)` around the steps (`--scope loop`, the
default) or a new trace per step (`--scope step`, which adds the cost of entering and leaving a
trace), with: no trace; the trace core only (`detect=[]`); the default detectors; every
detector (`detect="all"`); and `torch.autograd.detect_anomaly()` (no trace). Modes are interleaved
within each repeat and the median per-step time is reported, with ratios to the untraced step and to
anomaly mode. A standalone script, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


def mlp() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    return model, lambda m: F.cross_entropy(m(x), y)


def cnn() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return model, lambda m: F.cross_entropy(m(x), y)


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    x, y = torch.randn(8, 20, 16), torch.randn(8, 1)
    return LSTMModel(), lambda m: F.mse_loss(m(x), y)


class Transformer(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def transformer() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    tokens = torch.randint(0, 100, (8, 32))
    return Transformer(), lambda m: F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())


MODELS = {"mlp": mlp, "cnn": cnn, "lstm": lstm, "transformer": transformer}


def context(mode: str, model: nn.Module) -> Any:
    if mode == "untraced":
        return contextlib.nullcontext()
    if mode == "anomaly":
        return torch.autograd.detect_anomaly(check_nan=True)
    detect: Any = {"core": [], "default": "default", "all": "all"}[mode]
    return gradprobe.trace(model, detect=detect, on_finding="record")


def step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: torch.optim.Optimizer) -> None:
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    opt.zero_grad()


def run(model: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer, mode: str, steps: int, scope: str) -> None:
    if scope == "loop":  # one trace around all the steps
        with context(mode, model):
            for _ in range(steps):
                step(model, loss_fn, opt)
        return
    for _ in range(steps):  # a trace per step
        with context(mode, model):
            step(model, loss_fn, opt)


MODES = ["untraced", "core", "default", "all", "anomaly"]


def measure(name: str, repeats: int, steps: int, scope: str, modes: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    model, loss_fn = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {m: [] for m in modes}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode announces itself
        for mode in modes:  # warm up
            run(model, loss_fn, opt, mode, 2, scope)
        for _ in range(repeats):
            for mode in modes:
                start = time.perf_counter()
                run(model, loss_fn, opt, mode, steps, scope)
                times[mode].append((time.perf_counter() - start) / steps)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES, help="untraced is always timed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    parser.add_argument(
        "--scope", choices=["step", "loop"], default="loop",
        help="loop: one trace around --steps steps (the detectors' own cost); step: a new trace every step",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} x {args.steps} steps, "
        f"scope={args.scope}"
    )
    modes = ["untraced"] + [m for m in args.modes if m != "untraced"]
    compare = "all" in modes and "anomaly" in modes
    print(f"{'model':12} {'untraced':>9} " + " ".join(f"{m:>8}" for m in modes[1:]) + ("   all vs anomaly" if compare else ""))
    for name in args.models:
        med = measure(name, args.repeats, args.steps, args.scope, modes)
        base = med["untraced"]
        ratios = " ".join(f"{med[m] / base:7.2f}x" for m in modes[1:])
        tail = f"   {med['anomaly'] / med['all']:.1f}x cheaper" if compare else ""
        print(f"{name:12} {base * 1e3:7.2f}ms {ratios}{tail}")


if __name__ == "__main__":
    main()
