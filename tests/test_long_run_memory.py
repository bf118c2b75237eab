"""One trace around N and 10×N training steps keeps the same number of objects: what grows with the run
is folded into bounded aggregates (NOTE [window] in analysis/run.py). Counts objects, never time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.analysis.run_tables import SERIES_BUCKETS

WINDOW = 4
N = 40  # steps; the long run is 10 × N. Both are multiples of the window: the same point of the fold cycle


def _counts(t: gradprobe.Trace) -> dict[str, int]:
    ledger, run = t._ledger, t._run
    series = [s for m in run.modules.values()
              for s in (m.grad_trend, m.conflict_trend, *m.share_trend.values(), *m.cos_trend.values())]
    return {
        "records": len(ledger.records.kept),
        "parts": sum(len(s.parts) for s in ledger.leaves),
        "epochs": sum(len(s.epochs) for s in ledger.leaves),
        "kept tensors": sum(isinstance(p.tensor, torch.Tensor) for s in ledger.leaves for p in s.parts),
        "leaves": len(ledger.leaves),
        "findings": len(t._findings),
        "losses": len(run.losses),
        "leaf losses": len(run.leaf_losses),
        "modules": len(run.modules),
        "series": len(series),
        "largest series": max((len(s.buckets) for s in series), default=0),
    }


def _train(steps: int, loop: str, keep: str) -> tuple[gradprobe.Trace, list[dict[str, int]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    after_step = []
    with gradprobe.trace(model, window=WINDOW, keep=keep, on_finding="raise") as t:
        for _ in range(steps):
            model.zero_grad()
            out = model(x)
            (out - y).square().mean().backward(retain_graph=True)  # two losses, one backward call each
            (1e-2 * out.abs().mean()).backward()
            if loop == "optimizer":
                opt.step()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.01 * p.grad
                t.step()
            after_step.append(_counts(t))
    return t, after_step


@pytest.mark.parametrize(("loop", "keep"), [("optimizer", "stats"), ("manual", "stats"), ("optimizer", "tensors")])
def test_ten_times_the_steps_keep_no_more_objects(loop, keep):
    short_trace, short = _train(N, loop, keep)
    long_trace, long = _train(10 * N, loop, keep)
    assert short_trace.current_step == N and long_trace.current_step == 10 * N
    assert long[N - 1] == short[N - 1]  # the same run, the same counts at step N
    bounded = {"largest series"}  # fills up to SERIES_BUCKETS, then halves: bounded, not constant
    assert {k: v for k, v in long[-1].items() if k not in bounded} == {k: v for k, v in short[-1].items() if k not in bounded}
    # over a whole fold cycle, late in the run, the kept objects stay within what they were early on
    for key in ("records", "parts", "epochs", "kept tensors"):
        early = [c[key] for c in long[N // 2:N]]
        late = [c[key] for c in long[-N // 2:]]
        assert max(late) == max(early) and min(late) == min(early), key
    per_step = 2  # backward calls a step
    assert max(c["records"] for c in long) <= per_step * 2 * WINDOW
    assert max(c["parts"] for c in long) <= max(c["records"] for c in long) * long[-1]["leaves"]
    if keep == "stats":
        assert max(c["kept tensors"] for c in long) == 0
    else:
        assert long[-1]["kept tensors"] > 0
    assert long[-1]["losses"] == 2 and long[-1]["leaf losses"] == 2 * 4 and long[-1]["findings"] == 0
    assert long[-1]["largest series"] <= SERIES_BUCKETS < 10 * N


def test_the_folded_run_still_counts_every_step():
    """Bounded memory, yet the aggregates cover all 10 × N steps."""
    t, _ = _train(10 * N, "optimizer", "stats")
    run = t.run()
    assert run.folded_steps >= 10 * N - 2 * WINDOW
    assert {info.calls.n for info in run.losses.values()} == {10 * N}
    whole = run.modules[""]
    assert whole.grad_norm.n >= 10 * N - 1  # the last step's .grad has not been reset yet
    assert whole.compared_steps == 10 * N and whole.conflict_trend.points()[-1][1] == 10 * N - 1
