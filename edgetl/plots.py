"""Plots edgetl writes as PNG: the Pareto bubble chart, training curves, the confusion matrix, latency histograms.

matplotlib is imported lazily with the Agg backend, so plotting works on headless build machines and
costs nothing when no plot is asked for. Every plot is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_path


def pyplot() -> Any:
    """matplotlib's pyplot with the headless Agg backend."""
    import matplotlib  # deferred: heavy

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: heavy

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix (PNG by default), close it, return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path


Box = tuple[float, float, float, float]
"""A label's box in display pixels: ``(x0, y0, x1, y1)``."""


def _overlap(a: Box, b: Box, gap: float) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 offset: tuple[float, float] = (4.0, 3.0), gap: float = 1.0, bounds: Box | None = None) -> list[Box]:
    """Place labels beside their points so that no two overlap (a greedy placer, in display pixels).

    Each label starts at ``offset`` up and to the right of its point. Labels are placed lowest point first;
    one that would overlap a label placed before it moves up or down by the smallest distance that clears
    them all (a position above every placed label always does). Within ``bounds`` (the axes), a label is
    moved left rather than past the right edge, and kept below the top edge when a free place there exists.

    Args:
        anchors: each label's point, ``(x, y)`` in pixels (y up).
        sizes: each label's ``(width, height)`` in pixels.
        offset: where a label's lower-left corner goes, relative to its point.
        gap: the least space between two labels.
        bounds: the box the labels should stay in, if any.

    Returns:
        Each label's box ``(x0, y0, x1, y1)``, in the order of ``anchors``.
    """
    boxes: dict[int, Box] = {}
    for i in sorted(range(len(anchors)), key=lambda k: (anchors[k][1], anchors[k][0])):
        (x, y), (w, h) = anchors[i], sizes[i]
        x0, y0 = x + offset[0], y + offset[1]
        if bounds is not None:
            x0 = max(bounds[0], min(x0, bounds[2] - w))
        tries = sorted([y0] + [b[3] + gap for b in boxes.values()] + [b[1] - gap - h for b in boxes.values()],
                       key=lambda t: abs(t - y0))
        free = [(x0, t, x0 + w, t + h) for t in tries]
        free = [box for box in free if not any(_overlap(box, b, gap / 2) for b in boxes.values())]
        inside = [box for box in free if bounds is None or (bounds[1] <= box[1] and box[3] <= bounds[3])]
        boxes[i] = (inside or free)[0]
    return [boxes[i] for i in range(len(anchors))]


def plain_log_ticks(axis: Any) -> None:
    """Label a log-scale axis with plain numbers ("3", "10", "30") instead of "3×10⁰", on its major and
    minor ticks (matplotlib still chooses which minor ticks to label from the axis's span)."""
    from matplotlib.ticker import LogFormatter  # deferred: heavy

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _label_without_overlap(ax: Any, points: list[tuple[float, float]], names: list[str], fontsize: float = 7) -> list:
    """Annotate ``points`` (data coordinates) with ``names``, placed by :func:`place_labels`."""
    fig = ax.figure
    texts = [ax.annotate(n, p, fontsize=fontsize, xytext=(0, 0), textcoords="offset points",
                         arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#777777", "shrinkA": 0, "shrinkB": 2})
             for p, n in zip(points, names, strict=True)]
    fig.canvas.draw()  # the final limits and the texts' sizes
    renderer = fig.canvas.get_renderer()
    sizes = [(t.get_window_extent(renderer).width, t.get_window_extent(renderer).height) for t in texts]
    anchors = [tuple(ax.transData.transform(p)) for p in points]
    px_to_pt = 72.0 / fig.dpi  # offsets in points scale with the dpi the figure is saved at, as the fonts do
    placed = place_labels(anchors, sizes, bounds=tuple(ax.get_window_extent(renderer).extents))
    for t, (x, y), box in zip(texts, anchors, placed, strict=True):
        t.set_position(((box[0] - x) * px_to_pt, (box[1] - y) * px_to_pt))
        t.set_verticalalignment("bottom")
    return texts


def pareto_figure(ranking: Any) -> Any:
    """The figure :func:`plot_pareto` writes (unsaved): see there."""
    plt = pyplot()
    rows = ranking.candidates
    fig, ax = plt.subplots(figsize=(11, 7))
    max_size = max((r.size_mb for r in rows), default=1.0) or 1.0
    for fits, colour, label in ((False, "#bbbbbb", "misses a constraint"), (True, "#1f77b4", "fits")):
        sel = [r for r in rows if r.fits == fits]
        if not sel:
            continue
        ax.scatter(
            [r.latency_ms for r in sel],
            [r.card.top1 for r in sel],
            s=[30 + 1500 * r.size_mb / max_size for r in sel],
            c=colour,
            alpha=0.55,
            edgecolors="black" if fits else "none",
            linewidths=0.5,
            label=label,
        )
    front = ranking.pareto_front
    if front:
        ax.step(
            [r.latency_ms for r in front], [r.card.top1 for r in front], where="post",
            color="#d62728", lw=1.5, label="Pareto front (top-1 vs latency), labelled",
        )
    budget = ranking.constraints.max_latency_ms
    if budget:
        default = f" (default: {ranking.budget.basis})" if ranking.budget.origin == "default" else ""
        ax.axvline(budget, color="#2ca02c", ls="--", lw=1.5, label=f"latency budget {budget:g} ms{default}")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel(f"predicted latency (ms, log scale), batch {ranking.batch}")
    ax.set_ylabel("ImageNet-1K top-1 (%)")
    ax.set_title(
        f"{ranking.profile.name} · {ranking.precision} · bubble area ~ size "
        f"(largest {max_size:.0f} MB); unlabelled models are in the table"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, markerscale=0.4)
    _label_without_overlap(ax, [(r.latency_ms, r.card.top1) for r in front],
                           [r.card.name if r.card.is_default else r.card.id for r in front])
    return fig


def plot_pareto(ranking: Any, path: str | os.PathLike[str]) -> Path:
    """Bubble chart of a :class:`~edgetl.select.Ranking`, in the spirit of MATLAB's network comparison.

    x is predicted latency (log scale, plain millisecond ticks), y is ImageNet top-1, bubble area is
    proportional to the model's size at the ranking's precision. The Pareto front is drawn as a step line and
    its models are labelled, placed so that no two labels overlap (the others are in the table and the JSON);
    the latency budget (if any) is a vertical line; models that miss a constraint are greyed out.
    """
    return save_figure(pareto_figure(ranking), path)


def training_curves_figure(history: list[dict[str, Any]]) -> Any:
    """The figure :func:`plot_training_curves` writes (unsaved): see there."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    colours = {"train": "#1f77b4", "val": "#ff7f0e"}
    for key, ax, label in (
        ("train_loss", ax_loss, "train"), ("val_loss", ax_loss, "val"),
        ("train_accuracy", ax_acc, "train"), ("val_accuracy", ax_acc, "val"),
    ):
        points = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, color=colours[label], label=label)
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator  # deferred: heavy

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if handles:  # one legend for both panels, below them, where it covers no line
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles))
    fig.suptitle("training curves")
    fig.tight_layout()
    return fig


def plot_training_curves(history: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot loss and accuracy per epoch (train and, when present, validation) side by side, with one legend
    below the panels (inside them it covered the validation line).

    Args:
        history: one dict per epoch with ``epoch``, ``train_loss``, ``train_accuracy`` and optionally
            ``val_loss`` and ``val_accuracy`` (``metrics.json``'s ``epochs``).
        path: the PNG to write.
    """
    return save_figure(training_curves_figure(history), path)


def plot_confusion_matrix(
    matrix: list[list[int]], classes: list[str], path: str | os.PathLike[str], title: str = "confusion matrix"
) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted), shaded by row-normalised rate.

    Args:
        matrix: ``matrix[true][pred]`` counts.
        classes: class names in label order.
        path: the PNG to write.
        title: the figure title.
    """
    plt = pyplot()
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(14, max(4, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(title)
    return save_figure(fig, path)
