"""``Trace.plot``: per-loss gradient flow per module, for one split or over a run (matplotlib, optional).

Place in the flow: report. :func:`plot_split` draws one :class:`~gradprobe.analysis.split.Split`
(a decomposed backward, or the final ``.grad`` split by backward call); :func:`plot_run` draws the
run aggregates of :meth:`Trace.run` over the steps (NOTE [window] in analysis/run.py): each loss's
share of a module's ``.grad`` per step (``"shares"``), or the cosine of each loss's part with what
``.grad`` already held and how often it was negative (``"conflicts"``).

# NOTE [plot negatives]
# A share is a projection on the summed gradient: a loss that pulls against the others has a
# negative share and the others add up to more than 100%. That is the case a plot exists for, so
# shares are never clipped: bars are grouped (one per loss) around a zero line, never stacked, and
# the run plot's axes always include 0 and 1 and grow to whatever the shares reached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradprobe.analysis.run import ModuleRun, RunAggregates, Series
    from gradprobe.analysis.split import Split

__all__ = ["MAX_MODULES", "RUN_KINDS", "pick_modules", "plot_run", "plot_split"]

RUN_KINDS = ("shares", "conflicts")
MAX_MODULES = 12
WHOLE_MODEL = "(whole model)"


def _pyplot() -> Any:
    try:
        import matplotlib

        if not matplotlib.get_backend().lower().startswith(("module://", "qt", "tk", "gtk", "wx", "macosx", "nbagg")):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "Trace.plot() draws with matplotlib, which is not installed; "
            "install the plot extra: pip install 'gradprobe[plot]' (or pip install matplotlib)"
        ) from exc
    return plt


def _save(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_split(split: Split, path: str | Path | None = None) -> Any:
    """Per module: each loss's gradient norm (log scale) and its share of the summed gradient.

    Shares are grouped bars around a zero line, so a loss pulling against the others shows below 0
    (NOTE [plot negatives]). Saves to ``path`` when given; returns the matplotlib figure.
    """
    plt = _pyplot()
    modules = split.modules()
    k = len(split.losses)
    names = [m.name for m in modules]
    height = max(3.0, (0.28 + 0.12 * max(k - 2, 0)) * len(modules) + 1.5)
    fig, (ax_norm, ax_share) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    bar = 0.8 / max(k, 1)
    ys = list(range(len(modules)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, loss in enumerate(split.losses):
        color = colors[i % len(colors)]
        offset = [y + (i - (k - 1) / 2) * bar for y in ys]
        norms = [m.norms[i] or 0.0 for m in modules]
        ax_norm.barh(offset, norms, height=bar, label=loss, color=color)
        shares = [m.shares[i] if m.shares[i] is not None and math.isfinite(m.shares[i]) else 0.0 for m in modules]
        ax_share.barh(offset, shares, height=bar, label=loss, color=color)
    if any(m.norms[i] for m in modules for i in range(k)):
        ax_norm.set_xscale("log")
    ax_norm.set_yticks(ys)
    ax_norm.set_yticklabels(names)
    ax_norm.invert_yaxis()
    ax_norm.set_xlabel("‖gradient part‖ (log)")
    ax_share.axvline(0.0, color="black", linewidth=0.8)
    ax_share.set_xlabel("share of the summed gradient (below 0: pulls against the others)")
    low, high = ax_share.get_xlim()
    ax_share.set_xlim(min(low, 0.0), max(high, 1.0))
    scale = max((m.largest for m in modules), default=0.0)
    for y, m in zip(ys, modules):
        for _i, _j, cos in m.conflicts(scale):
            ax_share.annotate(f"cos {cos:+.2f}", xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                              textcoords="offset points", va="center", fontsize=7, color="red", annotation_clip=False)
            break
    ax_norm.legend(loc="best", fontsize=8)
    fig.suptitle(f"Gradient flow by loss · {split.title}")
    fig.tight_layout()
    return _save(fig, path)


# -- over a run -----------------------------------------------------------------------------------


def _trend(run: ModuleRun, kind: str) -> dict[str, Series]:
    return run.share_trend if kind == "shares" else run.cos_trend


def pick_modules(
    agg: RunAggregates, kind: str, modules: list[str] | None = None, max_modules: int = MAX_MODULES
) -> tuple[list[str], list[str]]:
    """The modules a run plot draws, and those it leaves out.

    Without ``modules``: those with something to draw, largest mean ``‖.grad‖`` first, the whole model
    (``""``) first of all when there are modules besides it; at most ``max_modules``.
    """
    have = [name for name, run in agg.modules.items() if any(s.buckets for s in _trend(run, kind).values())]
    if modules is not None:
        unknown = [m for m in modules if m not in agg.modules and m != WHOLE_MODEL]
        if unknown:
            known = ", ".join(repr(n) for n in sorted(agg.modules)[:20]) or "none"
            raise ValueError(f"Trace.plot(modules=...): no module {unknown[0]!r} in the run; modules: {known}")
        chosen = ["" if m == WHOLE_MODEL else m for m in modules]
        return [m for m in chosen if m in have], [m for m in have if m not in chosen]
    have.sort(key=lambda n: (n != "", -(agg.modules[n].grad_norm.mean or 0.0)))
    return have[:max_modules], have[max_modules:]


def _loss_labels(agg: RunAggregates) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, info in agg.losses.items():
        site = info.site
        labels[key] = f"{info.name} · {Path(site.filename).name}:{site.lineno}" if site is not None else info.name
    if len(set(labels.values())) < len(labels):
        return {key: key for key in labels}
    return labels


def _left_out_text(drawn: list[str], left: list[str], chosen: bool) -> str:
    names = ", ".join(n or WHOLE_MODEL for n in left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
    order = "" if chosen else ", largest mean ‖.grad‖ first"
    return (f"showing {len(drawn)} of {len(drawn) + len(left)} modules{order}; "
            f"left out: {names} (choose with modules=[...], max_modules=N)")


def plot_run(
    agg: RunAggregates,
    kind: str,
    path: str | Path | None = None,
    modules: list[str] | None = None,
    max_modules: int = MAX_MODULES,
) -> Any:
    """One panel per module, steps along x: each loss's share of the module's ``.grad`` (``"shares"``)
    or its part's cosine with what ``.grad`` held before it (``"conflicts"``, with the fraction of
    steps in conflict). A line is the mean per bucket of steps, the band its min–max.

    Saves to ``path`` when given; returns the matplotlib figure.
    """
    if kind not in RUN_KINDS:
        raise ValueError(f"Trace.plot(): unknown plot {kind!r}; choose one of {', '.join(map(repr, RUN_KINDS))}")
    if isinstance(max_modules, bool) or not isinstance(max_modules, int) or max_modules < 1:
        raise ValueError(f"Trace.plot(max_modules=...) is how many modules to draw: a positive int, got {max_modules!r}")
    drawn, left = pick_modules(agg, kind, modules, max_modules)
    if not drawn:
        what = ("no step with a known share: a share needs the step's final .grad (reset it with zero_grad() "
                "before the next step) and, with keep='stats', at most two contributions to one .grad a step "
                "(trace(..., keep='tensors') for more)" if kind == "shares" else
                "no step with two contributions to one .grad (a cosine needs a second backward call "
                "adding to what the first left)")
        where = f" in modules {modules!r}" if modules is not None else ""
        raise ValueError(f"Trace.plot({kind!r}): nothing to plot{where}: {what}")
    plt = _pyplot()
    labels = _loss_labels(agg)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {key: colors[i % len(colors)] for i, key in enumerate(agg.losses)}
    cols = 1 if len(drawn) <= 3 else 2 if len(drawn) <= 8 else 3
    rows = math.ceil(len(drawn) / cols)
    width = 5.0 * cols + 2.6  # the legend's column on the right
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.6 * rows + 1.2), sharex=True, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(drawn):]:
        ax.set_visible(False)
    first = last = None
    for ax, name in zip(flat, drawn):
        run = agg.modules[name]
        for key, series in _trend(run, kind).items():
            pts = series.points()
            if not pts:
                continue
            xs = [(p[0] + p[1]) / 2 for p in pts]
            first = pts[0][0] if first is None else min(first, pts[0][0])
            last = pts[-1][1] if last is None else max(last, pts[-1][1])
            ax.plot(xs, [p[2] for p in pts], marker=".", markersize=3, linewidth=1.2, color=color.get(key),
                    label=labels.get(key, key))
            if any(p[3] != p[4] for p in pts):
                ax.fill_between(xs, [p[3] for p in pts], [p[4] for p in pts], color=color.get(key), alpha=0.2,
                                linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        norm = run.grad_norm.mean
        title = (name or WHOLE_MODEL) + (f" · mean ‖.grad‖ {norm:.3g}" if norm is not None else "")
        if kind == "shares":
            low, high = ax.get_ylim()
            ax.set_ylim(min(low, -0.05), max(high, 1.05))  # NOTE [plot negatives]
            ax.set_ylabel("share of .grad")
        else:
            ax.set_ylim(-1.05, 1.05)
            ax.set_ylabel("cos with .grad before")
            rate = run.conflict_rate
            if rate is not None:
                title += f" · cos < 0 in {rate:.0%} of {run.compared_steps} steps"
            pts = run.conflict_trend.points()
            if pts:
                twin = ax.twinx()
                twin.fill_between([(p[0] + p[1]) / 2 for p in pts], 0, [p[2] for p in pts], step="mid", color="red",
                                  alpha=0.12, linewidth=0, label="steps in conflict")
                twin.set_ylim(0, 1)
                twin.set_ylabel("in conflict", fontsize=7, color="red")
                twin.tick_params(labelsize=7, colors="red")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in flat[max(len(drawn) - cols, 0):len(drawn)]:
        ax.set_xlabel("step")
    handles: dict[str, Any] = {}
    for ax in flat[:len(drawn)]:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                handles.setdefault(line.get_label(), line)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, title="loss", title_fontsize=8)
    span = f"steps {first:,}–{last:,}" if first is not None else ""
    heading = ("Each loss's share of the module's .grad per step (below 0: pulls against the others)"
               if kind == "shares" else "Each loss's part: cosine with what .grad held before it (below 0: conflict)")
    fig.suptitle(f"{heading}\n{span} · line: mean per bucket of steps, band: min–max", fontsize=10, x=0.02, ha="left")
    bottom = 0.0
    if left:
        fig.text(0.01, 0.005, _left_out_text(drawn, left, modules is not None), fontsize=7, va="bottom")
        bottom = 0.3 / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1 - 2.4 / width, 1))
    return _save(fig, path)
