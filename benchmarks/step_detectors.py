"""What the step-aware detectors of issue 12 cost, per optimizer step and per backward.

    python benchmarks/step_detectors.py [--models mlp cnn lstm transformer]

Whole-step ratios on a shared machine hide costs of a few microseconds, so this calls the detectors'
own hooks directly, inside a trace of the models of ``benchmarks/detectors_overhead.py``, and prints
the best of 5 rounds of 3,000 calls: the optimizer-step hooks with every default step callback
(``optimizer``, ``kept_graph``, ``amp``), ``unreached``'s GP505 check and ``retained_graph`` per
backward, and the opt-in ``frozen_update`` per step on a model with 1,000 parameter tensors.
A standalone script, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
from torch import nn

import gradprobe
from detectors_overhead import MODELS, step
from gradprobe.detectors._steps import StepEvent, steps_of


class _Grab:
    """Keeps the last backward call a trace saw (its graph walk is cached on it)."""

    gradprobe_name = "grab"
    call: Any = None

    @gradprobe.hookimpl
    def gradprobe_before_backward(self, trace: gradprobe.Trace, call: Any) -> None:
        self.call = call


def best(fn: Callable[[], None], n: int = 3000, rounds: int = 5) -> float:
    """Best per-call time of ``fn`` in microseconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n)
    return min(times) * 1e6


def per_model(name: str) -> str:
    torch.manual_seed(0)
    model, loss_fn = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grab = _Grab()
    with gradprobe.trace(model, on_finding="record", plugins=[grab]) as t:
        for _ in range(3):  # the first steps decide the optimizer check
            step(model, loss_fn, opt)
        loss = loss_fn(model)
        loss.backward(retain_graph=True)
        call, steps = grab.call, steps_of(t)
        unreached, retained = t._plugins.get_plugin("unreached"), t._plugins.get_plugin("retained_graph")

        def step_hooks() -> None:
            steps._pre(opt, (), {})
            steps._post(opt, (), {})

        per_step = best(step_hooks)
        cut = best(lambda: unreached._cut_inside(t, call))
        retained._decided.add(call.site)  # as after its line's first decision
        ret = best(lambda: retained.gradprobe_before_backward(t, call))
    tensors = sum(1 for _ in model.parameters())
    return (
        f"{name:12} {tensors:3d} tensors   per optimizer step {per_step:5.1f} us   per backward: "
        f"GP505 check {cut:4.1f} us, retained_graph {ret:4.1f} us"
    )


def frozen_update() -> str:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(500)])  # 1,000 parameter tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.trace(model, detect=["frozen_update"], on_finding="record") as t:
        plugin = t._plugins.get_plugin("frozen_update")
        event = StepEvent(opt, 0)

        def hooks() -> None:
            plugin._before(t, event)
            plugin._after(t, event)

        with torch._C.DisableTorchFunction():  # as inside the step hooks
            cost = best(hooks, n=200)
    return f"frozen_update (opt-in), 1,000 parameter tensors: {cost:.0f} us per optimizer step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); best of 5 rounds")
    for name in args.models:
        print(per_model(name))
    print(frozen_update())


if __name__ == "__main__":
    main()
