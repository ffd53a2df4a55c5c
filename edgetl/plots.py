"""Plots edgetl writes as PNG: the Pareto bubble chart, training curves, the confusion matrix, latency histograms.

matplotlib is imported lazily with the Agg backend, so plotting works on headless build machines and
costs nothing when no plot is asked for. Every plot is written atomically.
"""

from __future__ import annotations

import os
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


def plot_pareto(ranking: Any, path: str | os.PathLike[str], label_top: int = 8) -> Path:
    """Bubble chart of a :class:`~edgetl.select.Ranking`, in the spirit of MATLAB's network comparison.

    x is predicted latency (log scale), y is ImageNet top-1, bubble area is proportional to the model's
    size at the ranking's precision. The Pareto front is drawn as a step line, the latency budget (if
    any) as a vertical line; models that miss a constraint are greyed out; the best ``label_top``
    fitting models and the Pareto models are labelled.
    """
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
            color="#d62728", lw=1.5, label="Pareto front (top-1 vs latency)",
        )
    budget = ranking.constraints.max_latency_ms
    if budget:
        ax.axvline(budget, color="#2ca02c", ls="--", lw=1.5, label=f"latency budget {budget:g} ms")
    labelled = {id(r) for r in ranking.rows[:label_top]} | {id(r) for r in front}
    for r in rows:
        if id(r) in labelled:
            ax.annotate(
                r.card.name if r.card.is_default else r.card.id,
                (r.latency_ms, r.card.top1), fontsize=7, xytext=(4, 3), textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"predicted latency (ms, log scale), batch {ranking.batch}")
    ax.set_ylabel("ImageNet-1K top-1 (%)")
    ax.set_title(
        f"{ranking.profile.name} · {ranking.precision} · bubble area ~ size "
        f"(largest {max_size:.0f} MB)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, markerscale=0.4)
    return save_figure(fig, path)


def plot_training_curves(history: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot loss and accuracy per epoch (train and, when present, validation) side by side.

    Args:
        history: one dict per epoch with ``epoch``, ``train_loss``, ``train_accuracy`` and optionally
            ``val_loss`` and ``val_accuracy`` (``metrics.json``'s ``epochs``).
        path: the PNG to write.
    """
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key, ax, label in (
        ("train_loss", ax_loss, "train"), ("val_loss", ax_loss, "val"),
        ("train_accuracy", ax_acc, "train"), ("val_accuracy", ax_acc, "val"),
    ):
        points = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator  # deferred: heavy

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("training curves")
    return save_figure(fig, path)


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
