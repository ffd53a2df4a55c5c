"""The cost trace of a catalog model: :mod:`edgetl.zoo.cost`'s tracer applied to a catalog architecture.

:mod:`edgetl.zoo.cost` traces any module and knows nothing of the catalog; the catalog uses it to size timm's
entries. This module joins the two, so that neither imports the other back.
"""

from __future__ import annotations

from edgetl.zoo.catalog import ModelCard, build_architecture, get_card
from edgetl.zoo.cost import CostTrace, is_cached, trace_architecture


def trace_model(model: str | ModelCard, resolution: int | None = None) -> CostTrace:
    """Return the cost trace of a catalog model, from the cache or by tracing it on the meta device.

    The traced network is the deployed one (``build_architecture(..., deploy=True)``): timm's
    re-parameterisable models are fused first, as they run after export.

    Args:
        model: a catalog name (``resnet50``, ``resnet50.IMAGENET1K_V1``) or a :class:`ModelCard`.
        resolution: the square input size; defaults to the card's crop size.

    Raises:
        UnknownNameError: the model is not in the catalog.
        TraceError: the architecture cannot run at that resolution.
    """
    card = model if isinstance(model, ModelCard) else get_card(model)
    res = int(resolution or card.resolution)
    return trace_architecture(
        card.name, res, lambda: build_architecture(card.id, meta=True, resolution=res, deploy=True)
    )


def is_traced(card: ModelCard, resolution: int | None = None) -> bool:
    """Whether :func:`trace_model` answers ``card`` at ``resolution`` (default: its crop size) from the cache."""
    return is_cached(card.name, int(resolution or card.resolution))
