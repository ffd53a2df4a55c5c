"""Rank the catalog's pretrained backbones for a device: constraints, ordering and the Pareto front.

For each catalog entry the model's cost trace (:mod:`edgetl.zoo.cost`) is fed to the predictor
(:mod:`edgetl.device.latency`) with the device profile, giving latency, memory and size at the chosen precision.
Entries that meet every constraint are ranked first, most accurate first, ties to the lower latency. Without a
latency budget the ranking keeps to one frame per image at the device's real-time rate (33.3 ms at 30 fps): the
most accurate entry without one is a server model no edge device would ship; ``max_latency_ms="none"`` lifts it.
The Pareto front is the set of entries that no other entry beats on both ImageNet top-1 and latency.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl._io import atomic_write_text
from edgetl.device.budget import realtime_budget
from edgetl.device.latency import model_size_mb, predict_latency, predict_memory
from edgetl.device.profiles import DeviceProfile, default_device, load_profile
from edgetl.errors import ConstraintError
from edgetl.options import NO_BUDGET, Constraints, SelectOptions, TargetOptions, documented, take_inputs
from edgetl.zoo.catalog import ModelCard, list_models
from edgetl.zoo.cost import TraceError
from edgetl.zoo.model_cost import is_traced, trace_model

log = logging.getLogger(__name__)

NO_TOP1 = "no ImageNet top-1: a feature extractor"
"""Why an entry without a published top-1 is not ranked (torchvision publishes none for feature-only weights)."""

JSON_KEYS = (
    "model", "weights", "top1", "params_m", "gflops", "size_mb", "latency_ms", "memory_mb", "fps",
    "pareto", "fits",
)


@dataclass
class RankedModel:
    """One catalog entry with its predicted figures on the device."""

    card: ModelCard
    resolution: int
    latency_ms: float
    memory_mb: float
    size_mb: float
    fps: float
    pareto: bool = False
    failures: list[str] = field(default_factory=list)
    miss: float = 0.0  # sum of relative constraint violations, to find the nearest misses
    measured_ms: float | None = None

    @property
    def fits(self) -> bool:
        """Whether the entry meets every constraint."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: exactly :data:`JSON_KEYS`."""
        c = self.card
        return {
            "model": c.name,
            "weights": c.weights,
            "top1": c.top1,
            "params_m": round(c.params / 1e6, 3),
            "gflops": c.gflops,
            "size_mb": round(self.size_mb, 3),
            "latency_ms": round(self.latency_ms, 4),
            "memory_mb": round(self.memory_mb, 2),
            "fps": round(self.fps, 2),
            "pareto": self.pareto,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class LatencyBudget:
    """Where the ranking's latency limit comes from: ``given``, the ``default`` (one frame per image at the
    device's real-time rate, :func:`~edgetl.device.budget.realtime_budget`) or ``none`` (lifted)."""

    ms: float | None
    origin: str = "given"
    basis: str = ""

    def note(self, lift: str = f"{NO_BUDGET} lifts it") -> str:
        """What follows the budget in a description: `` (the default: 30 fps; none lifts it)`` for the default."""
        return f" (the default: {self.basis}; {lift})" if self.origin == "default" else ""

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "origin": self.origin, "basis": self.basis or None}


@dataclass
class Ranking:
    """The result of :func:`select`: every candidate, ranked, plus what could not be predicted.

    ``rows`` holds the candidates that meet the constraints, best first (cut to ``top``);
    ``candidates`` holds all of them in the same order, fitting ones first; ``left_out`` the catalog entries
    that matched but are not ranked, with why (no ImageNet top-1; ``skipped``: no prediction).
    """

    profile: DeviceProfile
    precision: str
    batch: int
    constraints: Constraints
    candidates: list[RankedModel]
    top: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    target: TargetOptions = field(default_factory=TargetOptions)
    budget: LatencyBudget = field(default_factory=lambda: LatencyBudget(None))
    unranked: list[tuple[str, str]] = field(default_factory=list)

    @property
    def left_out(self) -> list[tuple[str, str]]:
        """``(entry, why)`` for every matching catalog entry that is not ranked: no top-1, or no prediction."""
        return [*self.unranked, *((model, f"could not predict: {why}") for model, why in self.skipped)]

    def describe_constraints(self, lift: str = f"{NO_BUDGET} lifts it") -> str:
        """The constraints ranked by, saying where the latency budget comes from (``lift``: how to lift a default
        one, in the caller's terms)."""
        shown = self.constraints
        if self.budget.origin == "none":
            shown = shown.model_copy(update={"max_latency_ms": NO_BUDGET})
        return shown.describe(self.budget.note(lift))

    @property
    def rows(self) -> list[RankedModel]:
        """The candidates that fit, best first, at most ``top`` of them."""
        fitting = [r for r in self.candidates if r.fits]
        return fitting[: self.top] if self.top else fitting

    @property
    def best(self) -> RankedModel:
        """The most accurate candidate that meets every constraint."""
        rows = self.rows
        if not rows:
            raise ConstraintError(self.no_fit_message())
        return rows[0]

    @property
    def pareto_front(self) -> list[RankedModel]:
        """Pareto-optimal candidates (top-1 vs latency), fastest first."""
        return sorted((r for r in self.candidates if r.pareto), key=lambda r: r.latency_ms)

    def nearest_misses(self, n: int = 3) -> list[RankedModel]:
        """The ``n`` candidates that come closest to meeting the constraints."""
        misses = [r for r in self.candidates if not r.fits]
        return sorted(misses, key=lambda r: (r.miss, -r.card.top1))[:n]

    def no_fit_message(self) -> str:
        parts = [
            f"{r.card.name} ({'; '.join(r.failures)})" for r in self.nearest_misses(3)
        ]
        return (
            f"no model meets the constraints on {self.profile.name} at {self.precision} "
            f"({self.describe_constraints()}); nearest misses: " + ", ".join(parts)
            + "; relax a constraint or try another precision"
        )

    def to_json(self) -> list[dict[str, Any]]:
        """The ranked rows as JSON-ready dicts with exactly :data:`JSON_KEYS`."""
        return [r.to_dict() for r in self.rows]

    def to_document(self, lift: str = f"{NO_BUDGET} lifts it") -> dict[str, Any]:
        """``select --json``: what was ranked and how (device, precision, constraints and where the latency budget
        came from), the ranked ``rows`` (:meth:`to_json`) and the entries ``left_out``, with why."""
        return {
            "device": self.profile.name,
            "precision": self.precision,
            "batch": self.batch,
            "constraints": self.describe_constraints(lift),
            "latency_budget": self.budget.to_dict(),
            "ranked": len(self.candidates),
            "fitting": sum(1 for r in self.candidates if r.fits),
            "rows": self.to_json(),
            "left_out": [{"model": model, "reason": why} for model, why in self.left_out],
        }

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the ranked rows as CSV (to ``path`` if given) and return the text."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(JSON_KEYS), lineterminator="\n")
        writer.writeheader()
        for row in self.to_json():
            writer.writerow(row)
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write the Pareto bubble chart (latency vs top-1, bubble area ~ size, the front labelled) to ``path``."""
        from edgetl.plots import plot_pareto

        return plot_pareto(self, path)


def _violations(row: RankedModel, c: Constraints) -> tuple[list[str], float]:
    failures: list[str] = []
    miss = 0.0
    checks = (
        (c.max_latency_ms, row.latency_ms, "latency", "ms", True),
        (c.max_memory_mb, row.memory_mb, "memory", "MB", True),
        (c.max_size_mb, row.size_mb, "size", "MB", True),
        (c.min_accuracy, row.card.top1, "top-1", "%", False),
    )
    for limit, value, name, unit, is_max in checks:
        if limit is None:
            continue
        bad = value > limit if is_max else value < limit
        if bad:
            failures.append(
                f"{name} {value:.3g} {unit} {'>' if is_max else '<'} {limit:g} {unit}"
            )
            miss += abs(value - limit) / max(abs(limit), 1e-9)
    return failures, miss


def _mark_pareto(rows: Sequence[RankedModel]) -> None:
    best_acc = -math.inf
    for r in sorted(rows, key=lambda r: (r.latency_ms, -r.card.top1)):
        if r.card.top1 > best_acc:
            r.pareto = True
            best_acc = r.card.top1


def default_precision(profile: DeviceProfile) -> str:
    """fp16 where the device supports it (GPUs), else fp32."""
    return "fp16" if "fp16" in profile.precisions else "fp32"


@documented(SelectOptions, "select")
def select(
    device: str | DeviceProfile | None = None,
    options: SelectOptions | None = None,
    constraints: Constraints | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    **kwargs: Any,
) -> Ranking:
    """Rank the catalog's pretrained backbones for a device.

    Args:
        device: a profile name or alias (``jetson``, ``rpi``, ``x86``), a YAML path, or a profile; default:
            :func:`~edgetl.device.profiles.default_device`.
        options: how to rank (:class:`~edgetl.options.SelectOptions`).
        constraints: what a model must meet (:class:`~edgetl.options.Constraints`); ``max_memory_mb``
            defaults to the profile's model memory budget, ``max_latency_ms`` to one frame per image at the
            device's real-time rate (:func:`~edgetl.device.budget.realtime_budget`: 33.3 ms at 30 fps), and
            ``max_latency_ms="none"`` lifts it.
        progress: called as ``progress(done, total, name)`` while there is first-run work, and only then: while
            the catalog's cache is built (:func:`~edgetl.zoo.catalog.list_models`), then per model whose cost
            trace is not cached yet (``total`` counts those).
        **kwargs: fields of either model, e.g. ``select("jetson", precision="fp16", max_latency_ms=5)``, and of
            the shared inputs select takes (:data:`~edgetl.options.STAGE_INPUTS`), e.g. ``threads`` (kept on
            ``Ranking.target`` for timing the ranked models on this machine).

    Returns:
        A :class:`Ranking`. It is not an error for nothing to fit: ``Ranking.best`` raises then.

    Raises:
        UnknownNameError: unknown device.
        ProfileError: the device does not support the precision.
        ConfigError: an option or constraint is not valid.
    """
    named = {} if isinstance(device, DeviceProfile) else {"device": device}
    (opts, limits), inputs = take_inputs("select", {**named, **kwargs}, (SelectOptions, options),
                                         (Constraints, constraints))
    target = inputs[TargetOptions]
    profile = device if isinstance(device, DeviceProfile) else load_profile(target.device or default_device())
    precision = opts.precision or default_precision(profile)
    profile.check_precision(precision)
    if limits.max_memory_mb is None:
        limits = limits.model_copy(update={"max_memory_mb": float(profile.memory.model_budget_mb.value)})
    limits, budget = _latency_budget(limits, profile, opts.batch)
    cards, unranked = _ranked_cards(opts, progress)
    candidates, skipped = _predict_all(cards, profile, precision, opts, limits, progress)
    _mark_pareto(candidates)
    candidates.sort(key=lambda r: (not r.fits, -r.card.top1, r.latency_ms))
    return Ranking(profile, precision, opts.batch, limits, candidates, opts.top, skipped, target, budget, unranked)


def _latency_budget(limits: Constraints, profile: DeviceProfile, batch: int) -> tuple[Constraints, LatencyBudget]:
    """``limits`` with the latency budget resolved to a number (or None when lifted), and where it came from."""
    if limits.max_latency_ms == NO_BUDGET:
        return limits.model_copy(update={"max_latency_ms": None}), LatencyBudget(None, "none")
    if limits.max_latency_ms is not None:
        return limits, LatencyBudget(float(limits.max_latency_ms))
    ms, basis = realtime_budget(profile, batch)
    return limits.model_copy(update={"max_latency_ms": ms}), LatencyBudget(ms, "default", basis)


def _ranked_cards(opts: SelectOptions, progress: Callable[[int, int, str], None] | None,
                  ) -> tuple[list[ModelCard], list[tuple[str, str]]]:
    """The matching cards that can be ranked, and ``(entry, why)`` for those that cannot."""
    cards = list_models(opts.models, default_only=not opts.all_weights, zoo=opts.zoo, progress=progress)
    if not cards:
        raise ConstraintError(f"no catalog model matches '{opts.models}'; see `edgetl models`")
    ranked, unranked = [c for c in cards if c.top1 is not None], [(c.id, NO_TOP1) for c in cards if c.top1 is None]
    if not ranked:
        raise ConstraintError(f"no catalog entry matching '{opts.models}' can be ranked: "
                              + "; ".join(f"{model} ({why})" for model, why in unranked))
    return ranked, unranked


def _predict_all(cards: Sequence[ModelCard], profile: DeviceProfile, precision: str, opts: SelectOptions,
                 limits: Constraints, progress: Callable[[int, int, str], None] | None,
                 ) -> tuple[list[RankedModel], list[tuple[str, str]]]:
    candidates: list[RankedModel] = []
    skipped: list[tuple[str, str]] = []
    # the traces to compute (one per architecture and input size: weights tags share theirs), in order
    cold: dict[tuple[str, int], int] = {}
    for card in cards:
        key = (card.name, opts.resolution or card.resolution)
        if key not in cold and not is_traced(card, key[1]):
            cold[key] = len(cold)
    for card in cards:
        res = opts.resolution or card.resolution
        if progress and (card.name, res) in cold:
            progress(cold[card.name, res], len(cold), card.id)
        try:
            trace = trace_model(card, res)
        except TraceError as exc:
            skipped.append((card.id, str(exc)))
            continue
        lat = predict_latency(trace, profile, precision, opts.batch)
        mem = predict_memory(trace, profile, precision, opts.batch)
        row = RankedModel(
            card=card,
            resolution=res,
            latency_ms=lat.latency_ms,
            memory_mb=mem.memory_mb,
            size_mb=model_size_mb(trace.params, precision),
            fps=lat.fps,
        )
        row.failures, row.miss = _violations(row, limits)
        candidates.append(row)
    if progress and cold:
        progress(len(cold), len(cold), "")
    for model_id, reason in skipped:
        log.warning("could not predict %s: %s", model_id, reason)
    return candidates, skipped
