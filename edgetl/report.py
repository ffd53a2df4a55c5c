"""``report.md``: the build report, written from the files the stages left in the output folder.

The report reads only files on disk (``select/ranking.json``, the run's ``metrics.json`` and
``checkpoint.json``, the artifact's ``manifest.json`` and ``validation.json``), so a build whose stages
were all skipped writes the same report as the build that ran them. Plots go to ``OUT/report/`` as PNG.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgetl._io import atomic_path, atomic_write_text
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.trials import TrialReport
from edgetl.plots import pyplot, save_figure

PLOTS_DIR = "report"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _copy(src: Path, dst: Path) -> bool:
    if not src.is_file():
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return True


def _f(value: Any, fmt: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "—"
    try:
        return f"{value:{fmt}}{unit}"
    except (TypeError, ValueError):
        return str(value)


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


BUDGET_LINE_FACTOR = 2.0
"""The latency budget is drawn on the candidates chart when it is at most this many times the slowest bar;
a larger one would flatten the bars, so the legend states it instead."""


def _latency_series(timed: list[dict[str, Any]], device: str | None) -> list[tuple[str, list[float | None]]]:
    """The latency bars of each candidate: measured here (min, p50) and predicted for the device."""
    series = [
        ("min, measured here", [(c.get("latency") or {}).get("min_ms") for c in timed]),
        ("p50, measured here", [(c.get("latency") or {}).get("p50_ms") for c in timed]),
        (f"predicted for {device or 'the device'}", [c.get("predicted_ms") for c in timed]),
    ]
    return [(label, values) for label, values in series if any(v is not None for v in values)]


def candidates_figure(candidates: list[dict[str, Any]], budget_ms: float | None = None, device: str | None = None,
                      ranked_on: str | None = None) -> Any:
    """The figure :func:`plot_candidates` writes (unsaved), or None when no candidate has a latency."""
    timed = [c for c in candidates if c.get("latency") or c.get("predicted_ms") is not None]
    if not timed:
        return None
    plt = pyplot()
    fig, (ax_lat, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{c['precision']}{' (shipped)' if c.get('chosen') else ''}" for c in timed]
    xs = range(len(timed))
    series = _latency_series(timed, device)
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        at = [x + (k - (len(series) - 1) / 2) * width for x in xs]
        bars = ax_lat.bar(at, [v or 0 for v in values], width, label=label)
        ax_lat.bar_label(bars, [f"{v:.3g}" if v is not None else "" for v in values], fontsize=7)
    tallest = max(v for _, values in series for v in values if v is not None)
    near = bool(budget_ms) and budget_ms <= BUDGET_LINE_FACTOR * tallest
    if near:
        ax_lat.axhline(budget_ms, color="#d62728", ls="--", label=f"budget {budget_ms:g} ms")
    elif budget_ms:
        ax_lat.plot([], [], " ", label=f"budget {budget_ms:g} ms: off the scale, {budget_ms / tallest:.0f}× the "
                                       "tallest bar")
    ax_lat.set_ylim(0, 1.15 * max(tallest, budget_ms if near else 0))
    ax_lat.set_xticks(list(xs), names)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    accs = [(c.get("accuracy") or {}).get("top1") for c in timed]
    if any(a is not None for a in accs):
        ax_acc.bar(list(xs), [a or 0 for a in accs], 0.5, color="#2ca02c")
        ax_acc.set_ylim(0, 100)
        for x, a in zip(xs, accs, strict=True):
            if a is not None:
                ax_acc.text(x, a + 1, f"{a:.1f}", ha="center", fontsize=8)
    ax_acc.set_xticks(list(xs), names)
    ax_acc.set_ylabel("top-1 on the evaluation images (%)")
    for ax in (ax_lat, ax_acc):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("quantization candidates" + (f": the pick was ranked on {ranked_on.split(';')[0]}"
                                              if ranked_on else ""), fontsize=10)
    return fig


def plot_candidates(candidates: list[dict[str, Any]], path: Path, budget_ms: float | None = None,
                    device: str | None = None, ranked_on: str | None = None) -> Path | None:
    """Bar charts of the precision candidates: latency measured here (min and p50) beside the latency predicted
    for ``device``, on a scale that shows them (the budget is a line only when it is near them), and top-1.

    Args:
        candidates: the manifest's ``candidates``.
        path: the PNG to write.
        budget_ms: the latency budget, if any.
        device: the device the prediction is for.
        ranked_on: what the choice was ranked on (the manifest's ``selection.ranked_on``), for the title.

    Returns:
        The path written, or None when no candidate has a latency.
    """
    fig = candidates_figure(candidates, budget_ms, device, ranked_on)
    return None if fig is None else save_figure(fig, path)


def _stages_section(outcomes: Sequence[Any]) -> list[str]:
    rows = [[o.name, o.status, o.reason, _f(o.seconds, ".1f", " s") if not o.skipped else "—"] for o in outcomes]
    return ["## Stages", "", _table(["stage", "status", "why", "time"], rows, [False, False, False, True]), ""]


def _select_section(out: Path, plots: Path) -> list[str]:
    doc = _read(out / "select" / "ranking.json")
    if not doc:
        return []
    lines = ["## 1. Backbone selection", ""]
    lines.append(
        f"Device **{doc['device']}**, predicted at **{doc['precision']}**, batch {doc['batch']}, "
        f"resolution {doc.get('resolution') or 'each model’s own'}; constraints: {doc['constraints']}. "
        f"{doc['fitting']} of {doc['candidates']} ranked catalog entries fit."
    )
    lines += ["", f"**Chosen: `{doc['model']}`** — {doc['reason']}.", ""]
    rows = []
    for i, r in enumerate(doc["rows"], 1):
        rows.append([
            i, f"**{r['id']}**" if r.get("chosen") else r["id"], _f(r["top1"]), _f(r["params_m"], ".1f"),
            _f(r["gflops"], ".2f"), _f(r["size_mb"], ".1f"), _f(r["latency_ms"], ".3f"), _f(r["memory_mb"], ".0f"),
            "★" if r["pareto"] else "",
        ])
    if rows:
        lines.append(_table(
            ["#", "model", "ImageNet top-1", "params (M)", "GFLOPs", "size MB", "predicted ms", "memory MB", "Pareto"],
            rows, [True, False, True, True, True, True, True, True, False],
        ))
    if doc.get("nearest_misses") and doc["fitting"] < doc["candidates"]:
        misses = "; ".join(f"{m['model']} ({', '.join(m['failures'])})" for m in doc["nearest_misses"])
        lines += ["", f"Nearest misses: {misses}."]
    if doc.get("left_out"):
        left_out = "; ".join(f"`{e['model']}` ({e['reason']})" for e in doc["left_out"])
        lines += ["", f"Left out of the ranking: {left_out}."]
    if _copy(out / "select" / "pareto.png", plots / "pareto.png"):
        lines += ["", f"![Pareto chart]({PLOTS_DIR}/pareto.png)"]
    lines.append("")
    return lines


def _finetune_section(out: Path, plots: Path) -> list[str]:
    run = RunDir(out / "run")
    metrics = _read(run.metrics)
    ckpt = _read(run.checkpoint)
    if not metrics:
        return []
    config = ckpt.get("config") or {}
    strategy = metrics.get("strategy") or {}
    data = metrics.get("dataset") or {}
    sizes = data.get("sizes") or {}
    weights = (ckpt.get("weights") or {}).get("weights", config.get("weights"))
    lines = ["## 2. Fine-tuning", ""]
    lines.append(
        f"`{metrics['model']}` (weights: {weights}) on {data.get('num_classes', '?')} classes: "
        f"{sizes.get('train', '?')} training, {sizes.get('val', 0)} validation, {sizes.get('test', 0)} test images"
        + (f", {data['skipped']} unreadable images skipped" if data.get("skipped") else "") + "."
    )
    lines += ["", f"**Strategy: {strategy.get('strategy')}** — {strategy.get('reason')}.", ""]
    lines += _strategy_lines(strategy)
    hp = [
        ["epochs run / asked", f"{metrics.get('epochs_run')} / {config.get('epochs')}"
         + (" (early stop)" if metrics.get("stopped_early") else "")],
        ["best epoch", "0 (the linear probe)" if metrics.get("best_epoch") == 0 else metrics.get("best_epoch")],
        ["head learning rate", config.get("lr")],
        ["layer-wise LR decay", _layer_decay(config.get("layer_decay"))],
        ["blocks trained", f"{strategy.get('unfreeze')} of {strategy.get('num_blocks')}"],
        ["batch size · resolution", f"{config.get('batch_size')} · {ckpt.get('resolution')} px"],
        ["augmentation", config.get("augment")],
        ["feature cache", "yes (backbone run once)" if metrics.get("feature_cache") else "no"],
        ["validation accuracy (chose the epoch)", _selection_accuracy(metrics)],
        ["test accuracy (chose nothing)", _test_accuracy(metrics)],
    ]
    lines += [_table(["", ""], hp), ""]
    lines += _per_class_lines(metrics)
    for src, what in ((run.curves, "training curves"), (run.confusion, "confusion matrix")):
        if _copy(src, plots / src.name):
            lines += [f"![{what}]({PLOTS_DIR}/{src.name})", ""]
    return lines


def _strategy_lines(strategy: dict[str, Any]) -> list[str]:
    """How the strategy was chosen: the table, and auto's trials when they ran."""
    table = ("small data similar to ImageNet trains only a new head (linear probe); small data of a different "
             "domain, or large similar data, also trains the last blocks (partial); large data of a different domain "
             "trains everything (full)")
    frozen = "Frozen layers keep BatchNorm in eval mode, so their running statistics do not drift."
    trials = TrialReport.from_dict(strategy["trials"]) if strategy.get("trials") else None
    if trials is None or not trials.ran:
        return [f"The strategy follows the transfer-learning table: {table}. {frozen}", ""]
    rows = _table(["strategy", "epochs tried", "val top-1", "val loss", "chosen"], trials.rows())
    return [f"auto measured: it trained short trials of each candidate on the training split and kept the best on "
            f"the validation split ({trials.reason}). The transfer-learning table ({table}) chose {trials.prior}; "
            f"it breaks ties. {frozen}", "", rows, ""]


def _layer_decay(decay: Any) -> str:
    """Each block's LR below the head as the factor it is: the top block at the head's LR x decay, and so on."""
    if not isinstance(decay, (int, float)):
        return str(decay)
    return (f"{decay:g} per block: the top block trains at the head's LR × {decay:g}, the next at × "
            f"{decay**2:.3g}")


def _selection_accuracy(metrics: dict[str, Any]) -> str:
    """The validation accuracy, said to be what chose the model (so optimistic)."""
    val = metrics.get("val") or {}
    if metrics.get("val_accuracy") is None:
        return "— (no validation split: the training accuracy chose the epoch)"
    count = f" on {val['images']} images" if val.get("images") else ""
    return f"{_pct(metrics.get('val_accuracy'))}{count} (optimistic: these images chose the epoch)"


def _test_accuracy(metrics: dict[str, Any]) -> str:
    """The test accuracy with its image count and 95% interval, or why there is none."""
    test = metrics.get("test") or {}
    if metrics.get("test_accuracy") is None:
        reason = ((metrics.get("dataset") or {}).get("test_split") or {}).get("reason")
        return f"— ({reason})" if reason else "—"
    ci = test.get("ci95") or {}
    if "images" not in test or not ci:
        return _pct(metrics.get("test_accuracy"))
    return (f"{_pct(metrics['test_accuracy'])} ({test.get('correct')}/{test['images']} images; "
            f"95% Wilson interval {_pct(ci.get('low'))}–{_pct(ci.get('high'))})")


def _per_class_lines(metrics: dict[str, Any]) -> list[str]:
    """Per-class accuracy on the split of the confusion matrix (the test split when there is one)."""
    per_class = metrics.get("per_class_accuracy") or {}
    if not per_class:
        return []
    split = metrics.get("confusion_split") or "val"
    counts = (metrics.get(split) or {}).get("per_class_images") or {}
    parts = [f"{k} {_pct(v)}" + (f" of {counts[k]}" if k in counts else "") for k, v in per_class.items()]
    return [f"Per-class accuracy ({split}): " + ", ".join(parts) + ".", ""]


def _export_section(out: Path, plots: Path, budget_ms: float | None) -> list[str]:
    manifest = _read(out / "artifact" / "manifest.json")
    if not manifest:
        return []
    acc = manifest.get("accuracy") or {}
    lines = ["## 3. Export and quantization", ""]
    onnx = manifest.get("onnx") or {}
    lines.append(
        f"ONNX opset {onnx.get('opset')}, {onnx.get('nodes_before_simplify')} → {onnx.get('nodes_after_simplify')} "
        f"nodes after onnxslim. Requested precision: {manifest.get('requested_precision')}; "
        f"rule: {(manifest.get('selection') or {}).get('rule')}, ranked on "
        f"{(manifest.get('selection') or {}).get('ranked_on')}."
    )
    lines.append("")
    rows = []
    for c in manifest.get("candidates") or []:
        lat, a = c.get("latency") or {}, c.get("accuracy") or {}
        rows.append([
            f"**{c['precision']}**" if c.get("chosen") else c["precision"], c.get("mode"),
            _f((c.get("file_bytes") or 0) / 1e6, ".2f"), _f(lat.get("min_ms"), ".3f"), _f(lat.get("p50_ms"), ".3f"),
            _f(c.get("predicted_ms"), ".3f"), _f(a.get("top1")), _f(a.get("drop_pts")),
            "✓" if c.get("chosen") else "", c.get("rejected") or c.get("note") or "",
        ])
    lines.append(_table(
        ["precision", "mode", "size MB", "min ms (here)", "p50 ms (here)", "predicted ms", "top-1", "drop pts",
         "shipped", "why"], rows, [False, False, True, True, True, True, True, True, False, False],
    ))
    lines.append("")
    for c in manifest.get("candidates") or []:
        q = c.get("quantization") or {}
        if c["precision"] == "int8" and q:
            how = (f"static {q.get('format') or 'QDQ'}, {q.get('calib_method')} calibration on "
                   f"{q.get('calibration_data') or str(q.get('calib_images')) + ' images'}" if c.get("mode") == "static"
                   else "dynamic (weights quantized ahead, activations at run time)")
            extra = ", per-channel weights" if q.get("per_channel") else ""
            extra += ", 7-bit weights (reduce_range: this CPU family has no VNNI)" if q.get("reduce_range") else ""
            lines += [f"INT8: {how}{extra}.", ""]
    if acc.get("measured"):
        images = acc.get("images") or 0
        step = 100.0 / images if images else None
        lines.append(
            f"Accuracy drop: FP32 {_f(acc.get('fp32_top1'))}% → {manifest['precision']} {_f(acc.get('top1'))}% on "
            f"{images} held-out images = **{_f(acc.get('drop_pts'))} points** (budget {acc.get('max_drop_pts')}); "
            f"top-1 agreement with FP32 {_pct(acc.get('top1_agreement'))}. "
            + (f"One image is {step:.2f} points here, so a drop below that is within noise." if step else "")
        )
    else:
        lines.append(f"Accuracy: not measured ({acc.get('reason', 'no labelled images')}).")
    if acc.get("test"):
        t, ci = acc["test"], acc["test"]["artifact"]["top1_ci95"]
        worst = t.get("worst_class") or {}
        lines.append(
            f"On the test split, which chose nothing ({t['images']} images): FP32 {_f(t['fp32']['top1'])}% → "
            f"{manifest['precision']} {_f(t['artifact']['top1'])}% (95% Wilson interval {_f(ci['low'])}–"
            f"{_f(ci['high'])}%), a drop of {_f(t['drop_pts'])} points; the worst class, {worst.get('name')}, "
            f"dropped {_f(worst.get('drop_pts'))} points. The validation figures above chose the precision."
        )
    lines.append("")
    png = plot_candidates(manifest.get("candidates") or [], plots / "candidates.png", budget_ms,
                          (manifest.get("device") or {}).get("name"),
                          (manifest.get("selection") or {}).get("ranked_on"))
    if png is not None:
        lines += [f"![quantization candidates]({PLOTS_DIR}/candidates.png)", ""]
    return lines


def _validate_section(out: Path) -> list[str]:
    art = out / "artifact"
    v = _read(art / "validation.json")
    if not v:
        return []
    lat, mem = v.get("latency") or {}, v.get("memory") or {}
    lines = ["## 4. Validation", ""]
    integrity = (v.get("integrity") or {}).get("summary") or "checksummed, not signed"
    lines.append(
        f"All {len(v.get('files') or {})} artifact files match their sha256 ({integrity}). "
        f"Device **{v['device']}**, measured "
        f"here with {lat.get('runtime')} ({lat.get('threads') or 'all'} threads), {lat.get('iterations')} runs:"
    )
    lines.append("")
    rows = [
        ["latency p50 / p90 / p99 / min", f"{_f(lat.get('p50_ms'), '.3f')} / {_f(lat.get('p90_ms'), '.3f')} / "
                                          f"{_f(lat.get('p99_ms'), '.3f')} / {_f(lat.get('min_ms'), '.3f')} ms"],
        ["coefficient of variation", _pct(lat.get("cv"))],
    ]
    if lat.get("predicted_ms") is not None:
        rows.append([f"predicted on {lat.get('predicted_for')}", f"{_f(lat['predicted_ms'], '.3f')} ms"])
    if lat.get("budget_ms") is not None:
        verdict = "**pass**" if lat.get("pass") else "**FAIL**"
        rows.append(["latency budget", f"{_f(lat.get('judged_ms'), '.3f')} ms ({lat.get('judged_on')}) vs "
                                       f"{lat['budget_ms']:g} ms: {verdict}"])
    else:
        rows.append(["latency budget", "none set"])
    if mem.get("runtime_mb") is not None:
        rows.append([f"memory: {mem.get('measured') or 'measured here'}",
                     f"{mem['runtime_mb']} MB vs budget {_f(mem.get('budget_mb'), 'g')} MB: "
                     + ("pass" if mem.get("pass") else "FAIL")
                     + (f" (model file {_f(mem['model_file_mb'], '.1f')} MB)" if mem.get("model_file_mb") else "")])
    if v.get("accuracy"):
        a = v["accuracy"]
        rows.append(["accuracy", f"top-1 {a['top1']:.2f}% on {a['images']} images ({a['data']})"])
    lines += [_table(["check", "result"], rows), ""]
    for note in v.get("notes") or []:
        lines.append(f"Note: {note}")
    if v.get("notes"):
        lines.append("")
    return lines


def _artifact_section(out: Path) -> list[str]:
    manifest = _read(out / "artifact" / "manifest.json")
    files = manifest.get("files") or {}
    if not files:
        return []
    rows = [[f"`{name}`", _f((rec.get("bytes") or rec.get("size") or 0) / 1e6, ".3f"), f"`{rec['sha256'][:16]}…`"]
            for name, rec in files.items()]
    return ["## Artifact", "", f"`{out / 'artifact'}`:", "", _table(["file", "MB", "sha256"], rows,
                                                                    [False, True, False]), ""]


BASELINE_FILE = "baseline.json"
"""A from-scratch run of the build's network with the same budget (``edgetl demo`` writes one), if any."""


def _baseline_section(out: Path) -> list[str]:
    """The fine-tuned run beside the same network trained from random weights with the same budget."""
    baseline, metrics = _read(out / BASELINE_FILE), _read(RunDir(out / "run").metrics)
    if not baseline or not metrics:
        return []
    budget = baseline.get("budget") or {}
    strategy = (metrics.get("strategy") or {}).get("strategy")
    return [
        "", "## Transfer against training from scratch", "",
        f"The same network ({baseline.get('model')}), data, epochs ({budget.get('epochs')}), resolution "
        f"({budget.get('resolution')} px) and seed, from random weights (`{baseline.get('run_dir')}`).", "",
        "| starting weights | val top-1 (chose the epoch) | test top-1 |", "|---|---|---|",
        f"| pretrained ({strategy}) | {_pct(metrics.get('val_accuracy'))} | {_pct(metrics.get('test_accuracy'))} |",
        f"| random ({baseline.get('strategy')}) | {_pct(baseline.get('val_accuracy'))} | "
        f"{_pct(baseline.get('test_accuracy'))} |",
    ]


def write_report(out: str | os.PathLike[str], config: Any, outcomes: Sequence[Any], failures: Sequence[str],
                 source: str = "", seconds: float | None = None) -> Path:
    """Write ``OUT/report.md`` and its plots (``OUT/report/*.png``) from the build's files.

    Args:
        out: the build's output folder.
        config: the resolved :class:`~edgetl.pipeline.BuildConfig`.
        outcomes: the :class:`~edgetl.pipeline.StageOutcome` of each stage.
        failures: the budgets that were missed.
        source: the build file.
        seconds: the build's wall-clock time.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    status = "**passed**" if not failures else "**FAILED**: " + "; ".join(failures)
    budget = config.validate_.max_latency_ms or config.constraints.stated_latency_ms
    lines = [
        f"# edgetl build report: {out.name}",
        "",
        f"Build file `{source}` · device `{config.device}` · data `{config.data}` · "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        + (f" · {seconds:.0f} s" if seconds is not None else ""),
        "",
        f"Result: {status}",
        "",
    ]
    lines += _stages_section(outcomes)
    lines += _select_section(out, plots)
    lines += _finetune_section(out, plots)
    lines += _export_section(out, plots, budget)
    lines += _validate_section(out)
    lines += _artifact_section(out)
    lines += _baseline_section(out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
