"""The PNG plots: labels that do not overlap, plain millisecond ticks, legends off the lines, readable bars."""

from __future__ import annotations

import itertools

import pytest

import edgetl
from edgetl.plots import (
    pareto_figure,
    place_labels,
    plain_log_ticks,
    plot_pareto,
    plot_training_curves,
    pyplot,
    training_curves_figure,
)
from edgetl.report import BUDGET_LINE_FACTOR, candidates_figure, plot_candidates

PNG = b"\x89PNG\r\n\x1a\n"


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_labels_of_points_close_together_do_not_overlap():
    anchors = [(100.0, 100.0), (101.0, 101.0), (102.0, 99.0), (100.0, 102.0), (140.0, 100.5), (300.0, 100.0)]
    sizes = [(60.0, 10.0)] * len(anchors)
    boxes = place_labels(anchors, sizes)
    assert all(_disjoint(a, b) for a, b in itertools.combinations(boxes, 2)), boxes
    assert boxes[-1] == (304.0, 103.0, 364.0, 113.0)  # a label with room stays beside its point
    assert all(b[2] - b[0] == 60.0 and b[3] - b[1] == 10.0 for b in boxes)


def test_labels_stay_inside_the_bounds_when_there_is_room():
    bounds = (0.0, 0.0, 200.0, 200.0)
    anchors = [(190.0, 150.0), (190.0, 151.0), (190.0, 152.0)]
    boxes = place_labels(anchors, [(50.0, 10.0)] * 3, bounds=bounds)
    assert all(_disjoint(a, b) for a, b in itertools.combinations(boxes, 2))
    assert all(b[0] >= 0 and b[2] <= 200 and b[1] >= 0 and b[3] <= 200 for b in boxes), boxes


def _tick_labels(ax) -> list[str]:
    ax.figure.canvas.draw()
    ticks = ax.get_xticklabels() + ax.get_xticklabels(minor=True)
    return [t.get_text() for t in ticks if t.get_text()]


@pytest.mark.parametrize(("limits", "expected"), [((2.5, 4.5), {"3", "4"}), ((1.5, 900.0), {"10", "100"})])
def test_log_axes_are_labelled_with_plain_numbers(limits, expected):
    fig, ax = pyplot().subplots()
    ax.set_xscale("log")
    ax.set_xlim(*limits)
    plain_log_ticks(ax.xaxis)
    labels = _tick_labels(ax)
    assert expected <= set(labels), labels
    assert all(float(text) > 0 for text in labels), labels  # "3", not "3×10⁰" or mathtext
    pyplot().close(fig)


def test_pareto_chart_labels_the_front_only_without_overlap(tmp_path):
    ranking = edgetl.select(device="jetson", precision="fp16", models="resnet*")
    fig = pareto_figure(ranking)
    ax = fig.axes[0]
    texts = ax.texts
    names = [r.card.name if r.card.is_default else r.card.id for r in ranking.pareto_front]
    assert sorted(t.get_text() for t in texts) == sorted(names) and len(ranking.candidates) > len(names)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer).extents for t in texts]
    assert all(_disjoint(a, b) for a, b in itertools.combinations(boxes, 2))
    assert all(float(text) > 0 for text in _tick_labels(ax))
    pyplot().close(fig)
    assert plot_pareto(ranking, tmp_path / "pareto.png").read_bytes()[:8] == PNG


HISTORY = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_accuracy": 1 - 0.5 / e,
            "val_accuracy": 1 - 0.6 / e} for e in range(1, 6)]


def test_training_curves_legend_covers_no_panel(tmp_path):
    fig = training_curves_figure(HISTORY)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["train", "val"]
    box = legend.get_window_extent(renderer).extents
    assert all(_disjoint(box, ax.get_window_extent(renderer).extents) for ax in fig.axes)
    pyplot().close(fig)
    assert plot_training_curves(HISTORY, tmp_path / "curves.png").read_bytes()[:8] == PNG


CANDIDATES = [
    {"precision": "fp32", "latency": {"min_ms": 1.2, "p50_ms": 1.6}, "predicted_ms": 1.514,
     "accuracy": {"top1": 84.0}},
    {"precision": "int8", "latency": {"min_ms": 0.9, "p50_ms": 1.1}, "predicted_ms": 1.514,
     "accuracy": {"top1": 83.1}, "chosen": True},
]


def _budget_lines(ax) -> list[float]:
    return [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_candidates_show_measured_and_predicted_on_a_scale_that_shows_them(tmp_path):
    fig = candidates_figure(CANDIDATES, budget_ms=1000, device="raspberry-pi-5")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"min, measured here", "p50, measured here", "predicted for raspberry-pi-5"} <= set(labels)
    assert any("budget 1000 ms: off the scale" in t for t in labels) and not _budget_lines(ax)
    assert ax.get_ylim()[1] < 2  # the bars fill the panel, not a thousandth of it
    pyplot().close(fig)

    near = 1.6 * BUDGET_LINE_FACTOR  # the tallest bar is 1.6 ms
    fig = candidates_figure(CANDIDATES, budget_ms=near)
    assert _budget_lines(fig.axes[0]) == [near] and fig.axes[0].get_ylim()[1] > near
    pyplot().close(fig)

    assert plot_candidates(CANDIDATES, tmp_path / "c.png", 1000).read_bytes()[:8] == PNG
    assert plot_candidates([{"precision": "fp32"}], tmp_path / "none.png") is None
