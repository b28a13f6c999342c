"""Figures shared by training (curves.png) and the evaluation report, drawn with matplotlib's
object API on an Agg canvas (no pyplot state, no display needed)."""
from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LOSS_PARTS = (("loss", "total (weighted)"), ("class", "L_class"), ("graph", "L_graph"), ("gap", "L_gap"))


def training_curves(history: list[dict[str, Any]], mark_epoch: int | None = None, mark_label: str = "best") -> Figure:
    """Small multiples per epoch: the weighted total and each loss part (unweighted) on its own
    axis, train solid and val dashed, then the validation accuracies; a dotted line at `mark_epoch`.

    Own axes per part because their scales differ by orders of magnitude (the graph loss is often
    1e-3 of the classification loss) and one shared axis would hide the small ones.
    """
    fig = Figure(figsize=(13, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(LOSS_PARTS) + 1)
    for ax, (part, title) in zip(axes, LOSS_PARTS):
        for split, style in (("train", "-"), ("val", "--")):
            pts = [(row["epoch"], row[f"{split}/{part}"]) for row in history if f"{split}/{part}" in row]
            if pts:
                ax.plot(*zip(*pts), style, color="C0" if split == "train" else "C1", label=split)
        ax.set_title(title, fontsize=10)
    acc = axes[-1]
    for i, m in enumerate(("image", "text", "fused", "mean")):
        pts = [(row["epoch"], row[f"val/acc/{m}"]) for row in history if f"val/acc/{m}" in row]
        if pts:
            acc.plot(*zip(*pts), "-", color=f"C{i + 2}", label=m)
    acc.set_title("validation accuracy", fontsize=10)
    epochs = [row["epoch"] for row in history]
    for ax in axes:
        if mark_epoch:
            ax.axvline(mark_epoch, color="grey", ls=":", lw=1, label=f"{mark_label} (epoch {mark_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in (axes[0], axes[-1]):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
