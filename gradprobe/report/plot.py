"""``Trace.plot``: "gradient flow by loss", one group of bars per module (matplotlib, optional)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradprobe.analysis.split import Split

__all__ = ["plot_split"]


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


def plot_split(split: Split, path: str | None = None) -> Any:
    """Per module: each loss's gradient norm (log scale) and its share of the summed gradient.

    Saves to ``path`` when given; returns the matplotlib figure.
    """
    plt = _pyplot()
    modules = split.modules()
    k = len(split.losses)
    names = [m.name for m in modules]
    height = max(3.0, 0.28 * len(modules) + 1.5)
    fig, (ax_norm, ax_share) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    bar = 0.8 / max(k, 1)
    ys = list(range(len(modules)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, loss in enumerate(split.losses):
        color = colors[i % len(colors)]
        norms = [m.norms[i] or 0.0 for m in modules]
        ax_norm.barh([y + (i - (k - 1) / 2) * bar for y in ys], norms, height=bar, label=loss, color=color)
        left = [sum(max(m.shares[j] or 0.0, 0.0) for j in range(i)) for m in modules]
        ax_share.barh(ys, [max(m.shares[i] or 0.0, 0.0) for m in modules], left=left, color=color, label=loss)
    if any(m.norms[i] for m in modules for i in range(k)):
        ax_norm.set_xscale("log")
    ax_norm.set_yticks(ys)
    ax_norm.set_yticklabels(names)
    ax_norm.invert_yaxis()
    ax_norm.set_xlabel("‖gradient part‖ (log)")
    ax_share.set_xlabel("share of the summed gradient")
    ax_share.set_xlim(0, 1)
    scale = max((m.largest for m in modules), default=0.0)
    for y, m in zip(ys, modules):
        for _i, _j, cos in m.conflicts(scale):
            ax_share.annotate(f"cos {cos:+.2f}", (1.0, y), xytext=(3, 0), textcoords="offset points",
                              va="center", fontsize=7, color="red", annotation_clip=False)
            break
    ax_norm.legend(loc="best", fontsize=8)
    fig.suptitle(f"Gradient flow by loss · {split.title}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
