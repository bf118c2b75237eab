"""gradprobe's overhead, measured side by side in one process.

    python benchmarks/run.py --quick          # < 3 minutes on a 2-core CPU
    python benchmarks/run.py --full           # more rounds, steadier medians
    python benchmarks/run.py --quick --json out.json

Every variant of a step runs once per round, in a shuffled order, so that machine noise hits all of
them alike; a ratio is the median of per-round ratios to the untraced step (min–max beside it).
Results go to benchmarks/results/<mode>.json unless ``--json`` names another file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradprobe  # noqa: E402
from measure import CLOCKS, interleaved, peak_bytes, use_clock  # noqa: E402
from models import MODELS, Workload, build, multi_backward, wide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

TARGETS = {
    "trace_cnn": 1.10,
    "trace_transformer": 1.10,
    "detect_all": 1.5,
    "anomaly_vs_detect_all": 3.0,
    "per_leaf_us": 10.0,
    "peak_memory": 1.05,
    "fixed_ms": 0.3,
    "render_s": 1.0,
    "pytest_cpu": 1.3,
    "pytest_rss": 1.1,
}


# -- variants ----------------------------------------------------------------------------------


class _PassThrough:
    """Stands in for a Recorder behind gradprobe's own interceptor: backward calls just run."""

    host = None
    subject = None

    @staticmethod
    def run_backward(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _gradprobe_trace(model: torch.nn.Module, **options: Any) -> Callable[[], ContextManager[Any]] | None:
    """A variant that traces ``model`` with ``options``; None when this gradprobe lacks one of them."""
    try:
        gradprobe.trace(model, on_finding="record", **options)
    except TypeError:  # an option this version does not know yet (detect=, decompose=)
        return None
    return lambda: gradprobe.trace(model, on_finding="record", **options)


@contextlib.contextmanager
def _anomaly() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled ..." at every enter
        with torch.autograd.detect_anomaly():
            yield


def _mode_only() -> ContextManager[Any]:
    from gradprobe.capture.intercept import Interceptor

    return Interceptor(_PassThrough())  # type: ignore[arg-type]


def variants(model: torch.nn.Module) -> dict[str, Callable[[], ContextManager[Any]] | None]:
    return {
        "untraced": contextlib.nullcontext,
        "trace()": _gradprobe_trace(model),
        'detect="all"': _gradprobe_trace(model, detect="all"),
        "decompose=True": _gradprobe_trace(model, decompose=True),
        "detect_anomaly()": _anomaly,
        "mode only": _mode_only,
    }


def mode_cost_per_op(calls: int = 20000, rounds: int = 7) -> float:
    """µs the interceptor adds to one torch call (a tiny ``add``), measured apart from any model."""
    a, b = torch.ones(()), torch.ones(())

    def many() -> None:
        for _ in range(calls):
            torch.add(a, b)

    samples = interleaved(many, {"plain": contextlib.nullcontext, "mode": _mode_only}, rounds)
    return (samples["mode"].median - samples["plain"].median) * 1e6 / calls


def ops_per_step(work: Workload) -> int:
    counter = _Counter()
    with counter:
        work.step()
    return counter.calls


# -- the runs ----------------------------------------------------------------------------------


def bench_model(name: str, device: str, rounds: int) -> dict[str, Any]:
    work = build(name, device)
    available = variants(work.model)
    usable = {k: v for k, v in available.items() if v is not None}
    samples = interleaved(work.step, usable, rounds, device)  # type: ignore[arg-type]
    base_peak = None
    out: dict[str, Any] = {"model": work.name, "tensors": work.tensors, "ops": ops_per_step(work), "variants": {}}
    for variant, factory in available.items():
        if factory is None:
            out["variants"][variant] = None
            continue
        peak = peak_bytes(work.step, factory, work.resident_bytes, device, reset=work.reset)
        base_peak = base_peak or peak
        out["variants"][variant] = {**samples[variant].to_dict(), "peak_bytes": peak, "peak_ratio": peak / base_peak}
    return out


def _overhead(work: Workload, device: str, rounds: int) -> dict[str, float]:
    traced = _gradprobe_trace(work.model)
    assert traced is not None
    samples = interleaved(work.step, {"untraced": contextlib.nullcontext, "trace()": traced}, rounds, device)
    base, tr = samples["untraced"], samples["trace()"]
    extra = tr.median - base.median
    return {
        "tensors": work.tensors,
        "backwards": work.backwards,
        "untraced_ms": base.median * 1e3,
        "traced_ms": tr.median * 1e3,
        "ratio": tr.ratio,
        "overhead_ms": extra * 1e3,
        "us_per_tensor_per_backward": extra * 1e6 / (work.tensors * work.backwards),
    }


def _long_trace(work: Workload, device: str, rounds: int, steps: int = 4) -> dict[str, float]:
    """One trace around ``steps`` training steps (gradients reset each step): no per-trace setup."""

    def many() -> None:
        for _ in range(steps):
            work.step()

    traced = _gradprobe_trace(work.model)
    assert traced is not None
    samples = interleaved(many, {"untraced": contextlib.nullcontext, "trace()": traced}, rounds, device)
    extra = samples["trace()"].median - samples["untraced"].median
    return {
        "tensors": work.tensors,
        "steps": steps,
        "ratio": samples["trace()"].ratio,
        "overhead_ms": extra * 1e3,
        "us_per_tensor_per_backward": extra * 1e6 / (work.tensors * work.backwards * steps),
    }


def fixed_cost(device: str, rounds: int, repeats: int = 50) -> dict[str, float]:
    """ms a trace adds around the smallest step: a 3-layer MLP of 4 tensors, one backward.

    What a test suite under ``pytest --gradprobe`` or a per-step callback pays per trace, apart
    from any per-tensor work: building the trace and its plugins, entering, exiting, the end checks.
    """
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(device)
    x = torch.randn(2, 4, device=device)

    def steps() -> None:
        for _ in range(repeats):
            for p in model.parameters():
                p.grad = None
            model(x).sum().backward()

    def traced_steps() -> None:
        for _ in range(repeats):
            with gradprobe.trace(model, on_finding="record"):
                for p in model.parameters():
                    p.grad = None
                model(x).sum().backward()

    samples = interleaved(
        lambda: None, {"untraced": lambda: _Run(steps), "trace()": lambda: _Run(traced_steps)}, rounds * 3, device
    )
    base, traced = samples["untraced"].median / repeats, samples["trace()"].median / repeats
    return {"untraced_ms": base * 1e3, "traced_ms": traced * 1e3, "fixed_ms": (traced - base) * 1e3}


class _Run(contextlib.AbstractContextManager):  # type: ignore[type-arg]
    """Runs ``fn`` on entering: lets `interleaved` time a whole loop as one variant."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __enter__(self) -> None:
        self.fn()

    def __exit__(self, *exc: object) -> None:
        return None


def scaling(device: str, rounds: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    calls = [_overhead(multi_backward(device, k), device, rounds) for k in (1, 2, 4, 8)]
    leaves = [_overhead(wide(device, n), device, rounds) for n in sizes]
    return {
        "backward_calls": calls,
        "tensors": leaves,
        "long_trace": _long_trace(wide(device), device, rounds),
        "fixed": fixed_cost(device, rounds),
    }


def _exponent(rows: list[dict[str, float]], key: str) -> float | None:
    """Growth exponent of the overhead from the first to the last point (1: linear, 2: quadratic)."""
    first, last = rows[0], rows[-1]
    if first["overhead_ms"] <= 0 or last["overhead_ms"] <= 0:
        return None
    return math.log(last["overhead_ms"] / first["overhead_ms"]) / math.log(last[key] / first[key])


def targets(models: dict[str, Any], scale: dict[str, Any], extras: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    extras = extras or {}
    def ratio(model: str, variant: str) -> float | None:
        entry = models.get(model, {}).get("variants", {}).get(variant)
        return None if entry is None else entry["ratio"]

    rows: list[dict[str, Any]] = []

    def add(what: str, value: float | None, limit: float, met: bool | None = None) -> None:
        if met is None and value is not None:
            met = value <= limit if what != "detect_anomaly() / detect=all" else value >= limit
        rows.append({"target": what, "value": value, "limit": limit, "met": met})

    add("trace() on the CNN", ratio("cnn", "trace()"), TARGETS["trace_cnn"])
    add("trace() on the transformer", ratio("transformer", "trace()"), TARGETS["trace_transformer"])
    worst = [ratio(m, 'detect="all"') for m in models]
    add('detect="all", worst model', max(worst) if worst and None not in worst else None, TARGETS["detect_all"])
    speedups = []
    for m in models:
        a, d = ratio(m, "detect_anomaly()"), ratio(m, 'detect="all"')
        if a is not None and d is not None:
            # how many times more anomaly mode adds to a step than detect="all" does (a detect="all"
            # within noise of untraced counts as infinitely cheaper)
            speedups.append((a - 1.0) / (d - 1.0) if d > 1.0 else math.inf)
    add(
        "overhead of detect_anomaly() / overhead of detect=all, worst model",
        min(speedups) if speedups else None,
        TARGETS["anomaly_vs_detect_all"],
        None if not speedups else min(speedups) >= TARGETS["anomaly_vs_detect_all"],
    )
    fixed = scale.get("fixed")
    if fixed:
        add("ms a trace adds around a tiny step (open, close, end checks)", fixed["fixed_ms"], TARGETS["fixed_ms"])
    if extras.get("render"):
        add("s to render the report of a 5,000-tensor trace (first render)", extras["render"]["first_s"], TARGETS["render_s"])
    suite = extras.get("pytest_suite")
    if suite:
        add(f"CPU time, pytest --gradprobe / plain ({int(suite['tests'])} small tests)", suite["cpu_ratio"], TARGETS["pytest_cpu"])
        add("peak RSS, pytest --gradprobe / plain", suite["rss_ratio"], TARGETS["pytest_rss"])
    per_leaf = next((r for r in scale.get("tensors", []) if r["tensors"] == 1000), None)
    add(
        "µs per tensor, whole 1-backward step incl. trace setup/exit (1,000 tensors)",
        per_leaf and per_leaf["us_per_tensor_per_backward"],
        TARGETS["per_leaf_us"],
    )
    long = scale.get("long_trace")
    if long:
        add(
            f"µs per tensor per backward, one trace around {long['steps']} steps (1,000 tensors)",
            long["us_per_tensor_per_backward"],
            TARGETS["per_leaf_us"],
        )
    calls = scale.get("backward_calls")
    if calls:
        first, last = calls[0], calls[-1]
        slope = (last["overhead_ms"] - first["overhead_ms"]) * 1e3 / ((last["backwards"] - first["backwards"]) * last["tensors"])
        add("µs per tensor per extra backward into existing .grad (slope 1→8 calls)", slope, TARGETS["per_leaf_us"])
    peaks = [v["variants"]["trace()"]["peak_ratio"] for v in models.values() if v["variants"].get("trace()")]
    add("peak memory, trace() (worst model)", max(peaks) if peaks else None, TARGETS["peak_memory"])
    if scale:
        add("growth exponent in backward calls 1→8 (1 linear, 2 quadratic)", _exponent(scale["backward_calls"], "backwards"), 1.25)
        add("growth exponent in tensors 100→5,000", _exponent(scale["tensors"], "tensors"), 1.25)
    return rows


# -- output ------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    names = list(next(iter(result["models"].values()))["variants"]) if result["models"] else []
    m = result["machine"]
    load = f", load {m['load_average_1min']:.1f}" if m.get("load_average_1min") is not None else ""
    table = Table(
        title=f"gradprobe overhead: step time vs untraced, median [min–max] ({m['label']}{load}, "
        f"{result['clock']} clock, {result['rounds']} rounds)"
    )
    table.add_column("model")
    table.add_column("tensors", justify="right")
    table.add_column("untraced", justify="right")
    for name in names[1:]:
        table.add_column(name, justify="right")
    table.add_column("torch calls / step", justify="right")
    for model in result["models"].values():
        base = model["variants"]["untraced"]
        cells = [model["model"], str(model["tensors"]), f"{base['median_ms']:.1f} ms"]
        for name in names[1:]:
            v = model["variants"][name]
            cells.append("n/a" if v is None else f"{v['ratio']:.2f}× [{v['ratio_min']:.2f}–{v['ratio_max']:.2f}]")
        cells.append(str(model["ops"]))
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"interceptor (TorchFunctionMode) cost: {result['mode_us_per_op']:.2f} µs per torch call "
        "(\"mode only\" = the interceptor alone, no hooks)\n"
    )

    mem = Table(title="peak memory during a step (allocated bytes, incl. parameters and inputs)")
    mem.add_column("model")
    mem.add_column("untraced", justify="right")
    for name in names[1:]:
        mem.add_column(name, justify="right")
    for model in result["models"].values():
        base = model["variants"]["untraced"]
        cells = [model["model"], f"{base['peak_bytes'] / 2**20:.1f} MiB"]
        for name in names[1:]:
            v = model["variants"][name]
            cells.append("n/a" if v is None else f"{v['peak_ratio']:.3f}×")
        mem.add_row(*cells)
    console.print(mem)

    scale = result.get("scaling")
    if scale:
        sc = Table(title="growth: trace() overhead on the wide model")
        for col in ("case", "untraced", "trace()", "ratio", "overhead", "µs / tensor / backward"):
            sc.add_column(col, justify="right")
        for key, label in (("backward_calls", "{backwards} backward, {tensors} tensors"), ("tensors", "{tensors} tensors, 1 backward")):
            for row in scale[key]:
                sc.add_row(
                    label.format(**row), f"{row['untraced_ms']:.1f} ms", f"{row['traced_ms']:.1f} ms",
                    f"{row['ratio']:.2f}×", f"{row['overhead_ms']:.1f} ms", f"{row['us_per_tensor_per_backward']:.1f}",
                )
        long = scale["long_trace"]
        sc.add_row(
            f"{long['tensors']} tensors, 1 trace around {long['steps']} steps", "", "", f"{long['ratio']:.2f}×",
            f"{long['overhead_ms']:.1f} ms", f"{long['us_per_tensor_per_backward']:.1f}",
        )
        console.print(sc)

    tg = Table(title="targets")
    for col in ("target", "measured", "limit", "met"):
        tg.add_column(col)
    for row in result["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}"
        met = {True: "[green]met[/]", False: "[red]missed[/]", None: "n/a"}[row["met"]]
        limit = "" if not row["limit"] else (f"≥ {row['limit']}" if "anomaly" in row["target"] else f"≤ {row['limit']}")
        tg.add_row(row["target"], value, limit, met)
    console.print(tg)


def machine(device: str) -> dict[str, Any]:
    if device.startswith("cuda"):
        label = torch.cuda.get_device_name()
    else:
        label = f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "label": label,
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradprobe": gradprobe.__version__,
        "load_average_1min": load if not device.startswith("cuda") else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="few rounds (default)")
    mode.add_argument("--full", action="store_true", help="more rounds and a 5,000-tensor point")
    parser.add_argument("--json", type=Path, help="write results here (default benchmarks/results/<mode>.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall",
        help="wall time (default), or process CPU time: steadier on a busy machine, use with --threads 1",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own; 1 with --clock cpu)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the growth runs")
    parser.add_argument(
        "--extras", action=argparse.BooleanOptionalAction, default=None,
        help="also time the 5,000-tensor report render and a generated suite under pytest --gradprobe "
        "(on by default with --full; several minutes)",
    )
    args = parser.parse_args(argv)
    label = "full" if args.full else "quick"
    use_clock(args.clock)
    threads = args.threads or (1 if args.clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    rounds = args.rounds or (25 if args.full else 5)
    started = time.perf_counter()
    models = {}
    for name in args.models:
        models[name] = bench_model(name, args.device, rounds)
        print(f"  {name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    scale = {} if args.no_scaling else scaling(args.device, rounds, (100, 1000, 5000))
    result = {
        "mode": label,
        "rounds": rounds,
        "clock": args.clock,
        "machine": machine(args.device),
        "models": models,
        "scaling": scale,
        "mode_us_per_op": mode_cost_per_op(),
        "seconds": 0.0,
    }
    extras: dict[str, Any] = {}
    if args.extras if args.extras is not None else args.full:
        import pytest_suite
        import render as render_bench

        extras["render"] = render_bench.measure()
        print(f"  report render: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        extras["pytest_suite"] = pytest_suite.measure()
        print(f"  pytest suite: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    result["extras"] = extras
    result["targets"] = targets(models, scale, extras)
    result["seconds"] = time.perf_counter() - started
    render(result)
    path = args.json or RESULTS / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
