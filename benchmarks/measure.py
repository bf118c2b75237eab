"""Timing and memory measurement: interleaved runs, medians, min–max, and peak allocated bytes.

# NOTE [peak memory on CPU]
# torch has no CPU allocator statistics (torch.cpu has no max_memory_allocated), and peak RSS of a
# process is dominated by the torch import and never goes down, so a ratio of RSS would hide
# everything. The profiler's memory events (profile_memory=True) see every allocation and free that
# goes through c10's CPU allocator, with its size and time; replaying them in time order gives the
# peak of live tensor bytes during the step. Peak = bytes alive before the step (parameters, buffers,
# inputs) + that peak, the same quantity torch.cuda.max_memory_allocated reports on a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Callable, ContextManager

import torch

__all__ = ["CLOCKS", "Sample", "interleaved", "peak_bytes", "use_clock"]

Variant = Callable[[], ContextManager[Any]]


@dataclass
class Sample:
    """Step times of one variant (seconds) and its per-round ratio to the baseline."""

    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def to_dict(self) -> dict[str, float]:
        return {
            "median_ms": self.median * 1e3,
            "min_ms": min(self.times) * 1e3,
            "max_ms": max(self.times) * 1e3,
            "ratio": self.ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
        }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def _once(step: Callable[[], None], variant: Variant, device: str) -> float:
    _sync(device)
    start = clock()
    with variant():
        step()
    _sync(device)
    return clock() - start


def use_clock(name: str) -> None:
    """``"wall"`` (what a user waits for) or ``"cpu"`` (process CPU time: steadier on a shared machine)."""
    global clock
    clock = CLOCKS[name]


def interleaved(
    step: Callable[[], None], variants: dict[str, Variant], rounds: int, device: str = "cpu", warmup: int = 1, seed: int = 0
) -> dict[str, Sample]:
    """Run every variant once per round, in a shuffled order; the first variant is the baseline."""
    names = list(variants)
    baseline = names[0]
    for _ in range(warmup):
        for name in names:
            _once(step, variants[name], device)
    gc.collect()
    rng = random.Random(seed)
    samples = {name: Sample() for name in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        took = {name: _once(step, variants[name], device) for name in order}
        for name in names:
            samples[name].times.append(took[name])
            samples[name].ratios.append(took[name] / took[baseline])
    return samples


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop lines (written to fd 2, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(
    step: Callable[[], None], variant: Variant, resident: int, device: str = "cpu", reset: Callable[[], None] = lambda: None
) -> int:
    """Peak bytes allocated during one step under ``variant``, counting what was alive before it.

    ``reset`` frees what the previous step left (the gradients) before measuring: the profiler knows
    the size of blocks it saw allocated in an earlier profiled step, so freeing those inside the
    measured step would count against it and the baseline would depend on the order of the runs.
    """
    reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with variant():
            step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with variant():
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return resident + peak
