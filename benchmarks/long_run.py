"""One trace around a whole training run: memory, report render time and step-time ratio (issue 11).

    python benchmarks/long_run.py                 # 10,000 steps, then the CNN and transformer ratios
    python benchmarks/long_run.py --quick         # 2,000 steps, fewer rounds (about 2 minutes on 2 cores)
    python benchmarks/long_run.py --steps 50000 --no-ratio

1. Memory: a small three-loss model (two backward calls, Adam, ``zero_grad``) trained for
   ``--steps`` steps under ONE ``gradprobe.trace``. At step ``steps // 10`` and at the end: the
   process's resident memory (``/proc/self/statm``), the Python objects alive (``tracemalloc``,
   started before the loop) and what the trace keeps (records, parts and epochs in the ledger; the
   run aggregates' entries and series buckets). The same loop untraced gives the baseline growth.
   Target: no growth beyond the window, at most 1 MB (NOTE [window] in gradprobe/analysis/run.py).
2. Report render time at the end: ``t.report()`` to a non-terminal console (a string). Target < 0.5 s.
3. Step-time ratio of a long-lived trace on the benchmark CNN and transformer (benchmarks/models.py):
   blocks of ``--block`` training steps, one block under one trace (so the per-trace set-up and the end
   checks are paid once per block, and the window folds in every block) against one block untraced,
   alternated in a shuffled order (benchmarks/measure.py ``interleaved``); the ratio is the median of
   the per-round ratios. Target ≤ 1.05×.

On a shared CPU, ``--clock cpu --threads 1`` (the default on CPU) is far steadier than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradprobe  # noqa: E402
from measure import CLOCKS, interleaved, use_clock  # noqa: E402
from models import build  # noqa: E402

from gradprobe.analysis.run_tables import SERIES_BUCKETS  # noqa: E402

TARGETS = {"memory_mb": 1.0, "render_s": 0.5, "ratio": 1.05}
MB = 2**20


# -- the small multi-loss model -----------------------------------------------------------------


class ThreeHeads(nn.Module):
    """A shared trunk and two heads: classification, box regression, and a small feature penalty."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.cls = nn.Linear(64, 10)
        self.box = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.box(h), h


class Trainer:
    """One training step of :class:`ThreeHeads`: three losses in two backward calls, Adam.

    Two calls, not three: with ``keep="stats"`` the run aggregates know per-loss shares of a ``.grad``
    that two contributions made (from the statistics), not of three or more (that needs
    ``keep="tensors"``), and this benchmark should pay for the shares.
    """

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        torch.manual_seed(seed)
        self.model = ThreeHeads().to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def step(self) -> None:
        x = torch.randn(32, 32, generator=self.gen, device=self.device)
        y = torch.randint(0, 10, (32,), generator=self.gen, device=self.device)
        boxes = torch.randn(32, 4, generator=self.gen, device=self.device)
        self.opt.zero_grad()
        logits, box, h = self.model(x)
        F.cross_entropy(logits, y).backward(retain_graph=True)
        (F.smooth_l1_loss(box, boxes) + 1e-3 * h.square().mean()).backward()
        self.opt.step()


# -- memory ---------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``; peak RSS where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024)


def kept(t: gradprobe.Trace | None) -> dict[str, int]:
    """What a trace holds: records, parts and epochs kept in full, and the run aggregates' size."""
    if t is None:
        return {}
    ledger = t._ledger
    agg = t._run
    series = [
        s for m in agg.modules.values() for s in (m.grad_trend, m.conflict_trend, *m.share_trend.values(), *m.cos_trend.values())
    ]
    return {
        "records": len(ledger.records.kept),
        "parts": sum(len(s.parts) for s in ledger.leaves),
        "epochs": sum(len(s.epochs) for s in ledger.leaves),
        "findings": len(t._findings),
        "losses": len(agg.losses),
        "leaf_losses": len(agg.leaf_losses),
        "series": len(series),
        "buckets_per_series_max": max((len(s.buckets) for s in series), default=0),  # bounded, not constant
    }


def _point(t: gradprobe.Trace | None, step: int) -> dict[str, Any]:
    gc.collect()
    own = tracemalloc.get_tracemalloc_memory()  # tracemalloc's own tables are in the RSS: taken out
    return {"step": step, "rss": rss_bytes() - own, "python": tracemalloc.get_traced_memory()[0], "kept": kept(t)}


def memory_run(steps: int, traced: bool, device: str) -> dict[str, Any]:
    """``steps`` steps of the three-loss model, under one trace or none; measures at steps // 10 and at the end.

    tracemalloc (which slows Python down 2–3×) starts ``4 × window`` steps before the first point, so
    that everything the trace keeps then was allocated under it: the growth between the two points
    is then what the run added, not the window's turnover.
    """
    trainer = Trainer(device=device)
    early = max(steps // 10, 1)
    ctx = gradprobe.trace(trainer.model, on_finding="record") if traced else contextlib.nullcontext()
    window = ctx.window or 0 if isinstance(ctx, gradprobe.Trace) else 16
    start_at = max(early - 4 * window, 0)
    started = time.perf_counter()
    points: dict[str, Any] = {"window": window}
    try:
        with ctx as t:
            for i in range(1, steps + 1):
                if i == start_at + 1:
                    gc.collect()
                    tracemalloc.start()
                trainer.step()
                if i == early:
                    points["early"] = _point(t, i)
            points["end"] = _point(t, steps)
    finally:
        tracemalloc.stop()
    points["seconds"] = time.perf_counter() - started
    if t is not None:
        points["current_step"] = t.current_step
        points["render"] = render_times(t)  # without tracemalloc, which slows Python down
    return points


def render_times(t: gradprobe.Trace, repeats: int = 3) -> dict[str, Any]:
    """Seconds to render the report to a string (the first render, and the median of ``repeats``)."""
    from rich.console import Console

    times, lines = [], 0
    for _ in range(repeats):
        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        start = time.perf_counter()
        t.report(console=console)
        times.append(time.perf_counter() - start)
        lines = buf.getvalue().count("\n")
    return {"first_s": times[0], "median_s": statistics.median(times), "lines": lines}


# -- step-time ratio ------------------------------------------------------------------------------


def ratio_run(name: str, device: str, rounds: int, block: int) -> dict[str, Any]:
    """A trace around ``block`` steps against ``block`` steps untraced, alternated ``rounds`` times."""
    work = build(name, device)

    def many() -> None:
        for _ in range(block):
            work.step()

    def traced() -> Any:
        return gradprobe.trace(work.model, on_finding="record")

    with traced() as t:  # the steps this benchmark times do fold the window
        many()
        folded = t._run.folded_steps
    samples = interleaved(many, {"untraced": contextlib.nullcontext, "trace()": traced}, rounds, device)
    base, tr = samples["untraced"], samples["trace()"]
    return {
        "model": work.name,
        "tensors": work.tensors,
        "block": block,
        "folded_steps_per_block": folded,
        "untraced_ms_per_step": base.median * 1e3 / block,
        "traced_ms_per_step": tr.median * 1e3 / block,
        "ratio": tr.ratio,
        "ratios": tr.ratios,
    }


# -- output ---------------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / MB:+.2f} MB"


def report(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the measurements next to the targets; returns the target rows."""
    rows: list[dict[str, Any]] = []

    def target(what: str, value: float | None, limit: float, unit: str) -> None:
        met = None if value is None else value <= limit
        rows.append({"target": what, "value": value, "limit": limit, "met": met})
        shown = "n/a" if value is None else f"{value:.3f}{unit}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[met]
        print(f"  {what:<58} {shown:>12}   target ≤ {limit}{unit}   {verdict}")

    m = result["memory"]
    print(f"\n{result['machine']}")
    if m:
        tr, un = m["traced"], m["untraced"]
        e, z = tr["early"], tr["end"]
        print(f"\nmemory: {result['steps']:,} steps of a 3-loss model ({tr['params']} tensors, 2 backward calls a step), "
              f"one trace (window={tr['window']}); {tr['seconds']:.1f} s traced, {un['seconds']:.1f} s untraced")
        print(f"  {'':<38}{'step ' + format(e['step'], ','):>16}{'step ' + format(z['step'], ','):>16}{'growth':>14}")
        for label, key, base in (("RSS (less tracemalloc's own), traced", "rss", tr), ("RSS, untraced (same loop)", "rss", un),
                                 ("Python objects (tracemalloc), traced", "python", tr),
                                 ("Python objects, untraced", "python", un)):
            a, b = base["early"][key], base["end"][key]
            print(f"  {label:<38}{a / MB:>13.2f} MB{b / MB:>13.2f} MB{_mb(b - a):>14}")
        for key in e["kept"]:
            print(f"  kept: {key:<32}{e['kept'][key]:>16,}{z['kept'][key]:>16,}{z['kept'][key] - e['kept'][key]:>+14,}")
        r = tr["render"]
        print(f"\nreport at step {tr['current_step']:,}: {r['lines']} lines, first render {r['first_s'] * 1e3:.0f} ms, "
              f"median of 3 {r['median_s'] * 1e3:.0f} ms")
    if result["ratios"]:
        print(f"\nstep time, one trace around {result['block']} steps vs {result['block']} steps untraced, "
              f"{result['rounds']} rounds alternated ({result['clock']} clock):")
        for r in result["ratios"].values():
            spread = f"[{min(r['ratios']):.3f}–{max(r['ratios']):.3f}]"
            print(f"  {r['model']:<18} {r['tensors']:>4} tensors  {r['untraced_ms_per_step']:8.2f} ms → "
                  f"{r['traced_ms_per_step']:8.2f} ms a step   ratio {r['ratio']:.3f}× {spread}, "
                  f"{r['folded_steps_per_block']} steps folded a block")
    print("\ntargets:")
    if m:
        tr = m["traced"]
        growth = max(tr["end"]["rss"] - tr["early"]["rss"], 0) / MB
        target(f"RSS growth, step {tr['early']['step']:,} → {tr['end']['step']:,}", growth, TARGETS["memory_mb"], " MB")
        py = max(tr["end"]["python"] - tr["early"]["python"], 0) / MB
        target("Python objects growth (tracemalloc)", py, TARGETS["memory_mb"], " MB")
        grew = {k: v for k, v in tr["end"]["kept"].items() if v > tr["early"]["kept"][k] and not k.startswith("buckets")}
        if tr["end"]["kept"]["buckets_per_series_max"] > SERIES_BUCKETS:
            grew["buckets_per_series_max"] = tr["end"]["kept"]["buckets_per_series_max"]
        rows.append({"target": "kept objects do not grow", "value": None, "limit": None, "met": not grew})
        shown = "none grew" if not grew else "grew: " + ", ".join(f"{k} +{v - tr['early']['kept'][k]}" for k, v in grew.items())
        print(f"  {'kept records, parts, epochs, aggregates: no growth':<58} {shown:>12}   {'met' if not grew else 'MISSED'}")
        target("report render at the end", tr["render"]["first_s"], TARGETS["render_s"], " s")
    for r in result["ratios"].values():
        target(f"step-time ratio, long-lived trace, {r['model']}", r["ratio"], TARGETS["ratio"], "×")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps under one trace (default 10,000; --quick 2,000)")
    parser.add_argument("--quick", action="store_true", help="2,000 steps, 3 rounds of 48-step blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, help="ratio rounds (default 5; --quick 3)")
    parser.add_argument("--block", type=int, help="steps per timed block (default 64; --quick 48)")
    parser.add_argument("--models", nargs="*", default=["cnn", "transformer"], help="benchmark models for the ratio")
    parser.add_argument("--clock", choices=list(CLOCKS), help="cpu (default on CPU: steadier on a shared machine) or wall")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default 1 on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the long run")
    parser.add_argument("--no-ratio", action="store_true", help="skip the step-time ratios")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cpu = not args.device.startswith("cuda")
    clock = args.clock or ("cpu" if cpu else "wall")
    use_clock(clock)
    threads = args.threads or (1 if cpu else None)
    if threads:
        torch.set_num_threads(threads)
    steps = args.steps or (2_000 if args.quick else 10_000)
    rounds = args.rounds or (3 if args.quick else 5)
    block = args.block or (48 if args.quick else 64)  # 48: one fold a block (window 16)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    label = torch.cuda.get_device_name() if not cpu else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads"
    result: dict[str, Any] = {
        "steps": steps, "rounds": rounds, "block": block, "clock": clock, "memory": {}, "ratios": {},
        "machine": f"{label}, load {load:.1f}; torch {torch.__version__}, gradprobe {gradprobe.__version__}",
    }
    started = time.perf_counter()
    if not args.no_memory:
        traced = memory_run(steps, True, args.device)
        traced["params"] = sum(1 for _ in ThreeHeads().parameters())
        print(f"  long run traced: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        untraced = memory_run(steps, False, args.device)
        print(f"  long run untraced: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        result["memory"] = {"traced": traced, "untraced": untraced}
    if not args.no_ratio:
        for name in args.models:
            result["ratios"][name] = ratio_run(name, args.device, rounds, block)
            print(f"  {name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    result["targets"] = report(result)
    result["seconds"] = time.perf_counter() - started
    print(f"\n({result['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
