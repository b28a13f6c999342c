"""Figures shared by training (curves.png) and the evaluation report, drawn with matplotlib's
object API on an Agg canvas (no pyplot state, no display needed). Every text drawn is literal
(`literal`): a class name such as `$x$` or `a_$^$` is not read as mathtext."""
from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.ticker import MaxNLocator

LOSS_PARTS = (("loss", "total (weighted)"), ("class", "L_class"), ("graph", "L_graph"), ("gap", "L_gap"), ("inst", "L_inst"))
ACCURACIES = ("image", "text", "fused", "mean")
N_EPOCH_TICKS = 6  # at most this many epoch labels per panel, whatever the number of epochs


def literal(text: object) -> str:
    """`text` as matplotlib draws it literally: each `$` escaped, so no mathtext is parsed (a
    class name `$^$` would otherwise stop the drawing with a parse error)."""
    return str(text).replace("$", r"\$")


def _lone(pts: list) -> str | None:
    """A marker for a curve of one point, which a line alone would not show."""
    return "o" if len(pts) == 1 else None


def training_curves(history: list[dict[str, Any]], mark_epoch: int | None = None, mark_label: str = "best") -> Figure:
    """Small multiples per epoch, 2 rows of 4 panels: the weighted total and each loss part
    (unweighted) on its own axis, train solid and val dashed, then the validation accuracies; a
    dotted line at `mark_epoch`. The last panel holds the legends, so no legend covers a curve.

    Own axes per part because their scales differ by orders of magnitude (the graph loss is often
    1e-3 of the classification loss) and one shared axis would hide the small ones.
    """
    fig = Figure(figsize=(16, 7.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    *axes, key_ax, spare = fig.subplots(2, 4).ravel()  # len(LOSS_PARTS) loss panels, then the accuracies
    spare.remove()
    for ax, (part, title) in zip(axes, LOSS_PARTS):
        for split, style in (("train", "-"), ("val", "--")):
            pts = [(row["epoch"], row[f"{split}/{part}"]) for row in history if f"{split}/{part}" in row]
            if pts:
                ax.plot(*zip(*pts), style, lw=1.8, marker=_lone(pts), color="C0" if split == "train" else "C1",
                        label=split)
        ax.set_title(title, fontsize=12)
    acc = axes[-1]
    for i, m in enumerate(ACCURACIES):
        pts = [(row["epoch"], row[f"val/acc/{m}"]) for row in history if f"val/acc/{m}" in row]
        if pts:
            acc.plot(*zip(*pts), "-", lw=1.8, marker=_lone(pts), color=f"C{i + 2}", label=m)
    acc.set_title("validation accuracy", fontsize=12)
    epochs = [row["epoch"] for row in history]
    for ax in axes:
        if mark_epoch:
            ax.axvline(mark_epoch, color="grey", ls=":", lw=1.2, label=literal(f"{mark_label} (epoch {mark_epoch})"))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=N_EPOCH_TICKS, integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch", fontsize=10)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    key_ax.axis("off")  # the legend panel: losses (with the marked epoch) above, accuracies below
    legends = (("losses", "upper left", axes[0].lines), ("validation accuracy", "lower left",
                                                         [ln for ln in acc.lines if ln.get_label() in ACCURACIES]))
    for title, where, lines in legends:
        if lines:
            key_ax.add_artist(Legend(key_ax, lines, [ln.get_label() for ln in lines], title=title, loc=where,
                                     fontsize=11, title_fontsize=11, frameon=False, alignment="left"))
    return fig
