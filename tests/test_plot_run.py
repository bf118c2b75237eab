"""Trace.plot over a run: per-loss share per module vs step, conflicts per layer vs step, negative
shares drawn below 0 (NOTE [plot negatives] in report/plot.py), module choice, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

STEPS = 60
NEGATIVE_EVERY = 3  # every 3rd step the second loss is -0.3 × the first: its share is -0.3 / 0.7


def _two_loss_run(steps: int = STEPS, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    with gradprobe.trace(model, on_finding="record", **options) as t:
        for i in range(steps):
            opt.zero_grad()
            out = model(x)
            fit = (out - y).square().mean()
            t.name(fit, "fit")
            other = -0.3 * fit if i % NEGATIVE_EVERY == 0 else out.abs().mean()
            t.name(other, "other")
            fit.backward(retain_graph=True)
            other.backward()
            opt.step()
    return t


@pytest.fixture(scope="module")
def run_trace():
    return _two_loss_run()


def _panels(fig):
    """The module panels (the conflict plot's twin axes have no title)."""
    return {ax.get_title().split(" · ")[0]: ax for ax in fig.axes if ax.get_title()}


def _labelled(ax):
    return {line.get_label().split(" · ")[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_shares_figure_has_a_line_per_loss_per_module(run_trace):
    """60 steps, two losses: one panel per module (whole model first), one line per loss, steps on x."""
    fig = run_trace.plot("shares")
    try:
        panels = _panels(fig)
        run = run_trace.run()
        by_norm = sorted(["model.0", "model.2"], key=lambda n: -run.modules[n].grad_norm.mean)
        assert list(panels) == ["(whole model)", *by_norm]
        for name, ax in panels.items():
            lines = _labelled(ax)
            assert set(lines) == {"fit", "other"}
            module = run.modules["" if name == "(whole model)" else name]
            for loss, series in module.share_trend.items():
                label = "fit" if loss.startswith("fit") else "other"
                xs, ys = lines[label].get_data()
                points = series.points()
                assert list(xs) == [(p[0] + p[1]) / 2 for p in points]
                assert list(ys) == pytest.approx([p[2] for p in points])
            assert min(lines["fit"].get_xdata()) == 0
            assert max(lines["fit"].get_xdata()) >= STEPS - 2  # the last step's .grad has not ended yet
        assert [ax.get_xlabel() for ax in panels.values()] == ["", "", "step"]  # one column, shared x
        legend = fig.legends[0]
        assert sorted(t.get_text().split(" · ")[0] for t in legend.get_texts()) == ["fit", "other"]
    finally:
        plt.close(fig)


def test_a_negative_share_is_drawn_below_zero(run_trace):
    """The steps where 'other' pulls against 'fit' put its line below 0, and the axis shows them."""
    fig = run_trace.plot("shares")
    try:
        for ax in _panels(fig).values():
            xs, ys = _labelled(ax)["other"].get_data()
            negative = {int(x) for x, y in zip(xs, ys) if y < 0}
            assert {s for s in range(0, STEPS - 1, NEGATIVE_EVERY)} <= negative
            assert min(ys) == pytest.approx(-0.3 / 0.7, rel=1e-3)
            assert max(_labelled(ax)["fit"].get_ydata()) == pytest.approx(1 / 0.7, rel=1e-3)  # above 100%
            low, high = ax.get_ylim()
            assert low < min(ys) and high > 1 / 0.7
    finally:
        plt.close(fig)


def test_conflicts_figure_draws_cosines_and_the_conflict_rate(run_trace):
    """Per module: the second loss's cosine with what .grad held, the rate of steps in conflict."""
    fig = run_trace.plot("conflicts")
    try:
        panels = _panels(fig)
        assert set(panels) == {"(whole model)", "model.0", "model.2"}
        run = run_trace.run()
        for name, ax in panels.items():
            module = run.modules["" if name == "(whole model)" else name]
            lines = _labelled(ax)
            assert set(lines) == {"other"}  # the first loss of a step has nothing before it to compare
            xs, ys = lines["other"].get_data()
            assert len(xs) == STEPS and all(-1 <= y <= 1 for y in ys)
            assert all(ys[s] == pytest.approx(-1.0) for s in range(0, STEPS, NEGATIVE_EVERY))
            assert f"cos < 0 in {module.conflict_rate:.0%} of {STEPS} steps" in ax.get_title()
            assert ax.get_ylim() == (-1.05, 1.05)
        twins = [ax for ax in fig.axes if not ax.get_title()]
        assert len(twins) == 3 and all(ax.get_ylabel() == "in conflict" for ax in twins)
        rates = [p[2] for p in run.modules[""].conflict_trend.points()]
        assert len(rates) == STEPS and set(rates) <= {0.0, 1.0} and 1.0 in rates
    finally:
        plt.close(fig)


def test_path_writes_a_png(run_trace, tmp_path):
    for kind in ("shares", "conflicts"):
        path = tmp_path / f"{kind}.png"
        fig = run_trace.plot(kind, path=path)
        plt.close(fig)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_split_plot_draws_a_negative_share(tmp_path):
    """The per-loss split (t.plot(path), as before) draws the conflicting loss's share below 0."""
    t = _two_loss_run(steps=NEGATIVE_EVERY + 1)  # the last step is one where 'other' = -0.3 × 'fit'
    fig = t.plot(str(tmp_path / "split.png"))
    try:
        assert (tmp_path / "split.png").stat().st_size > 1000
        ax_share = fig.axes[1]
        widths = [patch.get_width() for patch in ax_share.patches]
        assert min(widths) == pytest.approx(-0.3 / 0.7, rel=1e-3) and max(widths) == pytest.approx(1 / 0.7, rel=1e-3)
        assert ax_share.get_xlim()[0] < -0.3 / 0.7
    finally:
        plt.close(fig)
    fig = t.plot("split", split=0)  # the same by name, and split= by position below
    plt.close(fig)
    fig = t.plot(str(tmp_path / "again.png"), 0)
    plt.close(fig)
    assert (tmp_path / "again.png").exists()


def test_big_models_draw_the_largest_modules_and_say_what_was_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(8)])
    x = torch.randn(4, 6)
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(4):
            model.zero_grad()
            out = model(x)
            out.square().mean().backward(retain_graph=True)
            out[:, 0].sum().backward()
            t.step()
    run = t.run()
    fig = t.plot("shares", max_modules=4)
    try:
        drawn = list(_panels(fig))
        by_norm = sorted((n for n in run.modules if n), key=lambda n: -run.modules[n].grad_norm.mean)
        assert drawn == ["(whole model)", *by_norm[:3]]
        (note,) = [text.get_text() for text in fig.texts if text.get_text().startswith("showing")]
        assert note.startswith("showing 4 of 9 modules") and all(n in note for n in by_norm[3:])
    finally:
        plt.close(fig)
    fig = t.plot("conflicts", modules=["model.3.0", "(whole model)"])
    try:
        assert list(_panels(fig)) == ["model.3.0", "(whole model)"]
        (note,) = [text.get_text() for text in fig.texts if text.get_text().startswith("showing")]
        assert note.startswith("showing 2 of 9 modules; left out: ")
    finally:
        plt.close(fig)


def test_a_long_run_is_drawn_in_buckets_with_a_min_max_band():
    """Past 64 steps neighbours merge: at most 64 points a line, each with its min–max band."""
    t = _two_loss_run(steps=140)
    fig = t.plot("shares", modules=["model.2"])
    try:
        ax = _panels(fig)["model.2"]
        xs, _ = _labelled(ax)["other"].get_data()
        assert 32 <= len(xs) <= 64 and max(xs) > 130
        assert len(ax.collections) == 2  # one band per loss
    finally:
        plt.close(fig)


def test_bad_input_raises_clear_errors(run_trace):
    with pytest.raises(ValueError, match="unknown plot 'share'"):
        run_trace.plot("share")
    with pytest.raises(TypeError, match="'split', 'shares', 'conflicts' or a path"):
        run_trace.plot(42)
    with pytest.raises(ValueError, match="max_modules"):
        run_trace.plot("shares", max_modules=0)
    with pytest.raises(ValueError, match="no module 'head'.*modules: '', 'model.0', 'model.2'"):
        run_trace.plot("shares", modules=["head"])
    with pytest.raises(ValueError, match="split= picks one split"):
        run_trace.plot("conflicts", split=0)
    with pytest.raises(ValueError, match="modules of the run plots"):
        run_trace.plot(modules=["model.0"])
    with pytest.raises(ValueError, match="path is given as well"):
        run_trace.plot("a.png", path="b.png")


def test_shares_of_three_contributions_need_kept_tensors():
    """With keep="stats" a .grad made of three parts has no known shares: the error says what to do."""
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for keep in ("stats", "tensors"):
        with gradprobe.trace(model, keep=keep, on_finding="record") as t:
            for _ in range(3):
                model.zero_grad()
                out = model(x)
                out.square().mean().backward(retain_graph=True)
                out.abs().mean().backward(retain_graph=True)
                out.sum().backward()
                t.step()
        if keep == "stats":
            with pytest.raises(ValueError, match=r"at most two contributions .* keep='tensors'"):
                t.plot("shares")
        else:
            fig = t.plot("shares")
            assert len(_labelled(_panels(fig)["(whole model)"])) == 3
            plt.close(fig)


def test_nothing_to_plot_says_why():
    """One loss per step: no second contribution, so no cosine to draw."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
    with pytest.raises(ValueError, match=r"nothing to plot: no step with two contributions"):
        t.plot("conflicts")
    fig = t.plot("shares")  # one loss: 100% of every step (the last one too: the run so far)
    try:
        ax = _panels(fig)["(whole model)"]  # the one module, `model`, draws the same line
        (line,) = _labelled(ax).values()
        assert list(line.get_ydata()) == pytest.approx([1.0, 1.0, 1.0])
    finally:
        plt.close(fig)
