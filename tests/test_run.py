"""One trace over a training run: steps, the window of kept steps, the run's aggregates, the run report."""

from __future__ import annotations

import collections
import io
import math
import re

import pytest
import torch
from rich.console import Console

import gradprobe
from gradprobe.analysis.run import loss_key
from gradprobe.analysis.run_tables import SeriesTable
from gradprobe.detectors._common import TensorSet
from gradprobe.exceptions import GradProbeError


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(6, 8)
        self.a = torch.nn.Linear(8, 3)
        self.b = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.a(h).pow(2).mean(), (self.b(h) - 1.0).pow(2).mean()


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g) for _ in range(n)]


def _train(model: TwoHeads, batches: list[torch.Tensor], **kwargs: object) -> gradprobe.Trace:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradprobe.trace(model, on_finding="record", **kwargs) as t:
        for x in batches:
            opt.zero_grad()
            la, lb = model(x)
            la.backward(retain_graph=True)
            lb.backward()
            opt.step()
    return t


def _render(t: gradprobe.Trace, width: int = 120) -> str:
    out = io.StringIO()
    t.report(console=Console(file=out, width=width, force_terminal=False, color_system=None))
    return out.getvalue()


# -- steps --------------------------------------------------------------------------------------


def test_records_carry_the_step_of_each_optimizer_step():
    torch.manual_seed(0)
    t = _train(TwoHeads(), _batches(5), window=None)
    assert [r.step for r in t.records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert t.current_step == 5
    assert t.to_dict()["records"][-1]["step"] == 4


def test_manual_steps_without_an_optimizer():
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        for _ in range(3):
            (w * 2).sum().backward()
            (w * w).sum().backward()
            t.step()
    assert [r.step for r in t.records] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(GradProbeError, match="inside the `with"):
        t.step()


@pytest.mark.parametrize("reset", ["none", "zero_", "zero_grad"])
def test_a_hand_written_loop_gets_steps_from_grad_resets(reset):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with gradprobe.trace(model) as t:
        for _ in range(4):
            x = torch.randn(2, 4)
            model(x).sum().backward()
            model(x).pow(2).sum().backward()  # a second loss of the same step: no reset in between
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    if reset == "none":
                        p.grad = None
                    elif reset == "zero_":
                        p.grad.zero_()
            if reset == "zero_grad":
                model.zero_grad()
    assert [r.step for r in t.records] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_gradient_accumulation_is_one_step_per_optimizer_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.trace(model) as t:
        for step in range(3):
            for _ in range(4):
                model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert [r.step for r in t.records] == [s for s in range(3) for _ in range(4)]


def test_a_step_gradscaler_skips_still_ends():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    skipped = []
    with gradprobe.trace(model, on_finding="record") as t:
        for step in range(4):
            opt.zero_grad()
            loss = model(torch.randn(2, 4)).sum()
            if step == 1:
                loss = loss * float("inf")  # inf gradients: the scaler skips opt.step()
            scaler.scale(loss).backward()
            before = model.weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            skipped.append(torch.equal(before, model.weight))
    assert skipped == [False, True, False, False]
    assert [r.step for r in t.records] == [0, 1, 2, 3]


# -- the window: bounded memory -----------------------------------------------------------------


def _kept(t: gradprobe.Trace) -> tuple[int, int, int]:
    ledger = t._ledger
    return (
        len(ledger.records.kept),
        max(len(s.parts) for s in ledger.leaves),
        max(len(s.epochs) for s in ledger.leaves),
    )


def test_memory_does_not_grow_past_the_window():
    torch.manual_seed(0)
    short = _train(TwoHeads(), _batches(30), window=3)
    long = _train(TwoHeads(), _batches(300), window=3)
    assert _kept(long) == _kept(short)
    records, parts, epochs = _kept(long)
    assert records <= 2 * 3 * 2 and parts <= 2 * 3 * 2 and epochs <= 2 * 3 + 1
    assert len(long._ledger.records) == 600  # every call counted
    assert len(long._run.losses) == 2  # the same two lines: two losses, not 600 columns
    assert len(long._run.leaf_losses) == len(short._run.leaf_losses)
    assert sum(len(s.buckets) for m in long._run.modules.values() for s in m.share_trend.values()) <= 64 * 2 * 4


def test_repeated_findings_and_unmeasured_records_stay_bounded():
    x = torch.randn(3, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.0)
    with gradprobe.trace(x, on_finding="record", window=2, every=2) as t:
        for _ in range(200):
            y = x * 2
            y.sum().backward()
            _ = y.grad  # a non-leaf .grad read: GP202 ahead of each backward
            opt.step()
            opt.zero_grad()
    counts = t.finding_counts()
    (key, (count, first, last)), = counts.items()  # one non-leaf .grad finding, on one line
    assert key[0] == "GP202" and (count, first, last) == (200, 0, 199)  # reported before each backward
    # the list keeps the first of each and those of the steps still kept in full (at most 2 × window + 1)
    assert len(t.findings) <= 1 + 2 * 2 + 1
    assert t.findings[0].step == first and t.findings[-1].step == last
    assert len(t._recorder._quiet_records) <= 2 * 2
    text = _render(t)
    assert f"×{count} in steps {first}–{last}" in text


def test_window_none_keeps_everything_and_bad_windows_are_refused():
    torch.manual_seed(0)
    t = _train(TwoHeads(), _batches(40), window=None)
    assert len(t.records) == 80 and t._run.folded_steps == 0
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="window"):
            gradprobe.trace(window=bad)
    for bad in (0, 1.0, False):
        with pytest.raises(ValueError, match="every"):
            gradprobe.trace(every=bad)


def test_gradients_are_unchanged_by_folding():
    torch.manual_seed(0)
    batches = _batches(25)
    plain, traced = TwoHeads(), TwoHeads()
    traced.load_state_dict(plain.state_dict())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    for x in batches:
        opt.zero_grad()
        la, lb = plain(x)
        la.backward(retain_graph=True)
        lb.backward()
        opt.step()
    _train(traced, batches, window=2)
    for p, q in zip(plain.parameters(), traced.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


# -- the aggregates against a brute-force recomputation ----------------------------------------


def _brute_force(model: TwoHeads, batches: list[torch.Tensor]) -> dict[str, object]:
    """Per step: each loss's gradient per parameter with autograd.grad, untraced; the same SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params = dict(model.named_parameters())
    steps = []
    for x in batches:
        opt.zero_grad()
        la, lb = model(x)
        ga = dict(zip(params, torch.autograd.grad(la, list(params.values()), retain_graph=True, allow_unused=True)))
        gb = dict(zip(params, torch.autograd.grad(lb, list(params.values()), allow_unused=True)))
        for name, p in params.items():
            parts = [g for g in (ga[name], gb[name]) if g is not None]
            p.grad = parts[0].clone() if len(parts) == 1 else parts[0] + parts[1]
        steps.append((ga, gb))
        opt.step()
    return {"steps": steps}


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def test_aggregates_equal_a_brute_force_recomputation():
    torch.manual_seed(0)
    batches = _batches(12)
    a, b = TwoHeads(), TwoHeads()
    b.load_state_dict(a.state_dict())
    t = _train(a, batches, window=2)
    assert t._run.folded_steps > 0  # some steps were folded, some are kept
    truth = _brute_force(b, batches)["steps"]
    run = t.run()
    names = [leaf.name.removeprefix("model.") for leaf in t.leaves]  # traced as `model` in _train
    key_a, key_b = (loss_key(r) for r in t.records[-2:])
    for i, name in enumerate(names):
        for key, which in ((key_a, 0), (key_b, 1)):
            grads = [_f64(step[which][name]) for step in truth]
            agg = run.leaf_losses.get((i, key))
            reached = [g for g in grads if g is not None]
            if not reached:
                assert agg is None
                continue
            norms = [float(g.norm()) for g in reached]
            assert agg.steps == len(reached) and agg.norm.n == len(reached)
            assert math.isclose(agg.norm.mean, sum(norms) / len(norms), rel_tol=1e-5)
            assert math.isclose(agg.norm.high, max(norms), rel_tol=1e-5)
            shares, cosines = [], []
            for step in truth:
                ga, gb = _f64(step[0][name]), _f64(step[1][name])
                total = ga if gb is None else (gb if ga is None else ga + gb)
                mine = ga if which == 0 else gb
                shares.append(float((mine * total).sum() / (total * total).sum()))
                if which == 1 and ga is not None:
                    cosines.append(float((ga * gb).sum() / (ga.norm() * gb.norm())))
            assert agg.share.n == len(shares)
            assert math.isclose(agg.share.mean, sum(shares) / len(shares), rel_tol=1e-4, abs_tol=1e-6)
            assert math.isclose(agg.share.low, min(shares), rel_tol=1e-4, abs_tol=1e-6)
            if cosines:
                assert agg.cos.n == len(cosines)
                assert math.isclose(agg.cos.low, min(cosines), rel_tol=1e-4, abs_tol=1e-6)
                assert agg.conflicts == sum(c < 0 for c in cosines)
    # per module: the share of the module's .grad, and its norm at each step's end
    trunk = run.modules["model.trunk"]
    for key, which in ((key_a, 0), (key_b, 1)):
        expected = []
        for step in truth:
            num = den = 0.0
            for name in ("trunk.weight", "trunk.bias"):
                ga, gb = _f64(step[0][name]), _f64(step[1][name])
                total = ga + gb
                num += float(((ga if which == 0 else gb) * total).sum())
                den += float((total * total).sum())
            expected.append(num / den)
        assert math.isclose(trunk.share[key].mean, sum(expected) / len(expected), rel_tol=1e-4, abs_tol=1e-6)
    norms = [math.sqrt(sum(float((step[0][n].double() + step[1][n].double()).pow(2).sum()) for n in ("trunk.weight", "trunk.bias"))) for step in truth]
    assert math.isclose(trunk.grad_norm.mean, sum(norms) / len(norms), rel_tol=1e-5)
    cos = [
        sum(float((truth_step[0][n].double() * truth_step[1][n].double()).sum()) for n in ("trunk.weight", "trunk.bias"))
        / math.sqrt(
            sum(float(truth_step[0][n].double().pow(2).sum()) for n in ("trunk.weight", "trunk.bias"))
            * sum(float(truth_step[1][n].double().pow(2).sum()) for n in ("trunk.weight", "trunk.bias"))
        )
        for truth_step in truth
    ]
    assert trunk.compared_steps == len(cos)
    assert trunk.conflict_steps == sum(c < 0 for c in cos)
    assert math.isclose(trunk.cos[key_b].low, min(cos), rel_tol=1e-4, abs_tol=1e-6)


def test_keep_tensors_gives_exact_shares_for_three_losses():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.trace(model, keep="tensors", window=1, on_finding="record") as t:
        for _ in range(6):
            opt.zero_grad()
            x = torch.randn(4, 3)
            model(x).sum().backward()
            (model(x).sum() * 2.0).backward()
            (model(x).sum() * -0.5).backward()  # three losses on three lines: three columns
            opt.step()
    run = t.run()
    assert len(run.losses) == 3
    shares = {key: agg.share for (leaf, key), agg in run.leaf_losses.items() if leaf == 0}
    assert all(agg.n == 6 for agg in shares.values())
    assert sorted(round(agg.mean, 4) for agg in shares.values()) == sorted(round(k / 2.5, 4) for k in (1.0, 2.0, -0.5))


# -- sampling -----------------------------------------------------------------------------------


def test_every_n_measures_every_nth_step_and_says_so():
    torch.manual_seed(0)
    model = TwoHeads()
    t = _train(model, _batches(12), window=None, every=3)
    measured = {t._ledger.records[p.record].step for s in t._ledger.leaves for p in s.parts}
    assert measured == {0, 3, 6, 9}
    run = t.run()
    assert all(agg.steps == 4 for agg in run.leaf_losses.values())
    assert "parts measured every 3 steps" in _render(t)


def test_every_n_across_accumulated_steps_labels_the_carried_in_part():
    w = torch.randn(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    with gradprobe.trace(w, every=2, on_finding="record") as t:
        for _ in range(3):
            (w * 2).sum().backward()
            opt.step()  # never zeroed: .grad keeps the unmeasured step's part
    row = t.breakdown()[0]
    assert row.carried_in is not None and row.carried_in.reason == "unmeasured"
    assert row.check is True


# -- the report of a run ------------------------------------------------------------------------


def test_the_report_of_a_long_run_shows_the_latest_step_and_the_run():
    torch.manual_seed(0)
    t = _train(TwoHeads(), _batches(40), window=4)
    text = _render(t, 160)
    assert "step 39, the latest" in text
    assert "40 steps (0–39)" in text
    assert "The run · 40 steps" in text
    assert "#78" in text and "#79" in text and "#0 " not in text  # the latest calls, not step 0's
    calls = [line for line in text.splitlines() if re.match(r"\s*l[ab]\s+test_run\.py:\d+\s+40\s+0–39\s", line)]
    assert len(calls) == 2, text  # each line's calls counted over the run
    assert len(text.splitlines()) < 80


def _nan_run(steps: int, nan_at: int, **options: object) -> gradprobe.Trace:
    """A one-layer model trained ``steps`` steps under one trace (window=2); step ``nan_at``'s loss is NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(4, 2)
    with gradprobe.trace(model, on_finding="record", window=2, **options) as t:
        for step in range(steps):
            opt.zero_grad()
            loss = model(x).sum()
            if step == nan_at:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
    return t


def test_a_finding_late_in_a_run_is_shown_with_its_step():
    t = _nan_run(7001, 7000)
    late = [f for f in t.findings if f.step == 7000]
    assert late, [(f.code, f.step) for f in t.findings]
    assert all(f.step == 7000 for f in t.findings if f.code.startswith("GP6"))
    text = _render(t)
    assert "step 7,000" in text
    assert len(t._ledger.records.kept) <= 4


def test_series_stays_bounded_and_keeps_the_mean():
    table = SeriesTable()
    for start in range(0, 10_000, 1_000):  # as folds add them: a block of steps at a time
        steps = torch.arange(start, start + 1_000)
        table.add(torch.zeros_like(steps), torch.zeros_like(steps), steps, steps.to(torch.float64))
    s = table.series(0, 0)
    points = s.points()
    assert len(points) <= 64
    assert points[0][0] == 0 and points[-1][1] == 9_999
    total = sum(b[2] for b in s.buckets)
    assert total == sum(range(10_000))


def test_an_early_nan_is_still_reported_after_its_step_was_folded():
    t = _nan_run(40, 5, detect="all")
    assert t._run.folded_steps > 5
    (gp601,) = [f for f in t.findings if f.code == "GP601"]
    assert gp601.step == 5 and "model.weight" in gp601.message
    (gp602,) = [f for f in t.findings if f.code == "GP602"]
    assert gp602.step == 5


_CONTAINERS = (list, dict, set, collections.deque, TensorSet)


def _sizes(t: gradprobe.Trace) -> dict[str, int]:
    """Lengths of every container a plugin or the recorder holds, and the ledger's kept entries."""
    out = {}
    for name in t.plugin_names:
        for key, value in vars(t._plugins.get_plugin(name)).items():
            if isinstance(value, _CONTAINERS):
                out[f"{name}.{key}"] = len(value)
    for key, value in vars(t._recorder).items():
        if isinstance(value, _CONTAINERS):
            out[f"recorder.{key}"] = len(value)
    out["findings"] = len(t.findings)
    out["parts"] = sum(len(s.parts) for s in t._ledger.leaves)
    out["records"] = len(t._ledger.records.kept)
    return out


def test_nothing_a_trace_holds_grows_with_the_number_of_steps():
    def run(steps: int) -> dict[str, int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradprobe.trace(model, on_finding="record", window=4, detect="all", decompose="every:5") as t:
            for _ in range(steps):
                opt.zero_grad()
                h = model(torch.randn(3, 4))
                l1, l2 = h.sum(), h.pow(2).mean()
                l1.backward(retain_graph=True)
                l2.backward()
                opt.step()
            return _sizes(t)

    short, long = run(300), run(1200)  # both past the thresholds at which plugins forget (1,024 entries)
    bound = 1024 + 64  # a plugin may keep up to 1,024 entries before it forgets the dead ones
    grew = {k: (short.get(k), v) for k, v in long.items() if v > max(short.get(k, 0) * 1.5 + 8, bound)}
    assert not grew, grew


def test_a_hand_written_loop_with_sampling_keeps_its_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with gradprobe.trace(model, every=3) as t:
        for _ in range(7):
            x = torch.randn(2, 4)
            model(x).sum().backward()
            model(x).pow(2).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            model.zero_grad()
    assert [r.step for r in t.records] == [s for s in range(7) for _ in range(2)]
    measured = {t._ledger.records[p.record].step for s in t._ledger.leaves for p in s.parts}
    assert measured == {0, 3, 6}


@pytest.mark.parametrize("keep", ["stats", "tensors"])
def test_a_split_of_unknown_shares_is_one_line_not_a_table_of_question_marks(keep):
    model = torch.nn.Linear(3, 2)
    with gradprobe.trace(model, keep=keep) as t:
        x = torch.randn(4, 3)
        model(x).sum().backward()
        model(x).pow(2).sum().backward()
        model(x).abs().sum().backward()
    text = _render(t)
    if keep == "stats":
        assert "Per-loss split of the final .grad: not shown" in text
        assert not re.search(r"^\s*weight\s+\?", text, re.M)
    else:
        assert "Per-loss split of the final .grad · one part per backward call" in text


def test_an_optimizer_whose_param_groups_raise_is_left_alone(monkeypatch):
    """Announcing an optimizer step's writes must never raise into the user's step (GP001 instead)."""
    monkeypatch.delenv("GRADPROBE_STRICT_INTERNAL")
    model = torch.nn.Linear(2, 1)

    class Odd(torch.optim.SGD):
        armed = False

        @property
        def param_groups(self):  # type: ignore[override]
            if self.armed:
                raise RuntimeError("no groups here")
            return self.__dict__["_groups"]

        @param_groups.setter
        def param_groups(self, value):  # type: ignore[override]
            self.__dict__["_groups"] = value

        def step(self, closure=None):  # type: ignore[override]
            with torch.no_grad():
                for group in self.__dict__["_groups"]:
                    for p in group["params"]:
                        p -= 0.1 * p.grad

    opt = Odd(model.parameters(), lr=0.1)
    opt.armed = True
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(2):
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
            model.zero_grad()
    assert [r.step for r in t.records] == [0, 1]
    assert any(f.code == "GP001" for f in t.findings)


def test_an_lbfgs_step_with_its_closure_is_one_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(4):
            opt.step(closure)  # the closure runs backward several times inside one step
    steps = [r.step for r in t.records]
    assert len(steps) > 4 and sorted(set(steps)) == [0, 1, 2, 3] and steps == sorted(steps)
