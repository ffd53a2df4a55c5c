"""Parameter groups by *stage*, for layer-wise LR decay: the stem, the stages of the trunk, the head.

timm models carry their own grouping (``model.group_matcher(coarse=True)``, the matcher that timm's
``param_groups_layer_decay`` uses). torchvision models have none, so this module writes one per family in
timm's format: a dict of ``stem`` and ``blocks`` regular expressions, or a callable from a parameter name
to an ordinal. A block spec whose suffix is :data:`MATCH_PREV_GROUP` joins the group below it (the final
1x1 convolution or norm after the last stage). Families without a matcher (the flat ``features`` lists of
MobileNet, MNASNet, VGG, AlexNet, SqueezeNet, and any unknown model) are grouped from the catalog's block
list: consecutive blocks with the same output width form one stage.

The parameters of the classifier (``card.head_path``), and those no rule matches (as in timm), form the
*head* group. At most :data:`MAX_STAGES` groups sit below the head: deeper groupings (ViT's 12 or 24
encoder layers) are merged into that many contiguous groups, so that at the default decay of 0.7 the
bottom group still trains at ``0.7 ** 8`` = 0.058 of the head's LR.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgetl.zoo.catalog import ModelCard

MAX_STAGES = 8
MATCH_PREV_GROUP = (99999,)
"""A block suffix that merges the match into the group below it (timm's convention)."""
_UNMATCHED = (float("inf"),)

Matcher = dict[str, Any] | Callable[[str], Any]


@dataclass(frozen=True)
class Stage:
    """One LR group of a model: a name and the parameter names in it, bottom-up order of the model."""

    name: str
    params: tuple[str, ...]


def _features_halves(name: str) -> Any:
    """ConvNeXt and Swin: ``features.0`` is the stem; a downsampling layer joins the stage after it."""
    m = re.match(r"^features\.(\d+)\.", name)
    if m:
        return ((int(m.group(1)) + 1) // 2,)
    return MATCH_PREV_GROUP if re.match(r"^norm\.", name) else _UNMATCHED


def _features_indexed(model: nn.Module) -> Callable[[str], Any]:
    """EfficientNet (v1, v2): ``features.0`` is the stem, each index a stage; the last 1x1 conv joins the one below."""
    last = len(model.get_submodule("features")) - 1

    def matcher(name: str) -> Any:
        m = re.match(r"^features\.(\d+)\.", name)
        if not m:
            return _UNMATCHED
        i = int(m.group(1))
        return (i - 1, *MATCH_PREV_GROUP) if i == last else (i,)

    return matcher


_TORCHVISION: dict[str, Callable[[nn.Module], Matcher]] = {
    "resnet": lambda m: {"stem": r"^(?:conv1|bn1)\.", "blocks": r"^layer(\d+)\."},
    "resnext": lambda m: {"stem": r"^(?:conv1|bn1)\.", "blocks": r"^layer(\d+)\."},
    "wide_resnet": lambda m: {"stem": r"^(?:conv1|bn1)\.", "blocks": r"^layer(\d+)\."},
    "regnet_x": lambda m: {"stem": r"^stem\.", "blocks": r"^trunk_output\.block(\d+)\."},
    "regnet_y": lambda m: {"stem": r"^stem\.", "blocks": r"^trunk_output\.block(\d+)\."},
    "shufflenet_v2": lambda m: {"stem": r"^conv1\.", "blocks": [(r"^stage(\d+)\.", None),
                                                                 (r"^conv5\.", MATCH_PREV_GROUP)]},
    "convnext": lambda m: _features_halves,
    "swin": lambda m: _features_halves,
    "swin_v2": lambda m: _features_halves,
    "efficientnet": _features_indexed,
    "efficientnet_v2": _features_indexed,
    "vit": lambda m: {"stem": r"^(?:conv_proj\.|class_token$|encoder\.pos_embedding$)",
                      "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None),
                                 (r"^encoder\.ln\.", MATCH_PREV_GROUP)]},
    "maxvit": lambda m: {"stem": r"^stem\.", "blocks": r"^blocks\.(\d+)\."},
    "densenet": lambda m: {"stem": r"^features\.(?:conv0|norm0)\.",
                           "blocks": [(r"^features\.(?:denseblock|transition)(\d+)\.", None),
                                      (r"^features\.norm5\.", MATCH_PREV_GROUP)]},
    "inception": lambda m: {"stem": r"^Conv2d_", "blocks": r"^Mixed_(\d)"},
    "googlenet": lambda m: {"stem": r"^conv\d\.", "blocks": r"^inception(\d)"},
}


def model_matcher(model: nn.Module, card: ModelCard) -> Matcher | None:
    """The stage matcher of ``model``: timm's own, the family's, or None (group by blocks)."""
    own = getattr(model, "group_matcher", None)
    if callable(own):
        return own(coarse=True)
    family = _TORCHVISION.get(card.family)
    return family(model) if family is not None else None


def _compile(matcher: Matcher) -> Callable[[str], tuple[float, ...]]:
    """A function from a parameter name to its sortable ordinal (timm's ``group_with_matcher`` rules)."""
    if callable(matcher):
        return lambda name: tuple(float(x) for x in _as_tuple(matcher(name)))
    rules: list[tuple[re.Pattern[str], tuple[int, ...], Any]] = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for regex, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            rules.append((re.compile(regex), (ordinal,), suffix))

    def ordinal_of(name: str) -> tuple[float, ...]:
        for regex, prefix, suffix in rules:
            m = regex.match(name)
            if m:
                parts = (*prefix, *(g for g in m.groups() if g is not None), *(suffix or ()))
                return tuple(float(x) for x in parts)
        return _UNMATCHED

    return ordinal_of


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, Iterable) else (value,)


def _matcher_groups(names: list[str], matcher: Matcher) -> list[list[str]]:
    """Parameter names grouped by ordinal, bottom-up; a MATCH_PREV_GROUP ordinal joins the group before it."""
    ordinal_of = _compile(matcher)
    by_ordinal: dict[tuple[float, ...], list[str]] = {}
    for name in names:
        by_ordinal.setdefault(ordinal_of(name), []).append(name)
    groups: list[list[str]] = []
    for key in sorted(by_ordinal):
        if key == _UNMATCHED:
            continue
        if groups and key[-1] == MATCH_PREV_GROUP[0]:
            groups[-1].extend(by_ordinal[key])
        else:
            groups.append(list(by_ordinal[key]))
    return groups


def _out_width(module: nn.Module) -> int | None:
    widths = [getattr(m, "out_channels", None) or getattr(m, "out_features", None) for m in module.modules()]
    widths = [w for w in widths if w]
    return widths[-1] if widths else None


def _block_groups(model: nn.Module, card: ModelCard, names: list[str]) -> list[list[str]]:
    """Consecutive catalog blocks with the same output width, as groups of parameter names.

    A block without a width of its own (a BatchNorm listed as a block) joins the one before it.
    """
    groups: list[list[str]] = []
    width: Any = object()
    for block in card.block_paths:
        params = [n for n in names if n.startswith(block + ".")]
        if not params:
            continue
        w = _out_width(model.get_submodule(block))
        if groups and w in (width, None):
            groups[-1].extend(params)
        else:
            groups.append(params)
        width = width if w is None else w
    return groups


def _merge(groups: list[list[str]], most: int) -> list[list[str]]:
    """At most ``most`` contiguous groups: the bottom ones absorb the extra (as ``numpy.array_split``)."""
    if len(groups) <= most:
        return groups
    size, extra = divmod(len(groups), most)
    out, start = [], 0
    for i in range(most):
        end = start + size + (1 if i < extra else 0)
        out.append([n for g in groups[start:end] for n in g])
        start = end
    return out


def _owner(name: str, blocks: tuple[str, ...]) -> str:
    """A parameter's catalog block, else its module path cut to two components."""
    block = next((b for b in blocks if name.startswith(b + ".")), None)
    if block is not None:
        return block
    path = name.rpartition(".")[0] or name
    return ".".join(path.split(".")[:2])


def _stage_name(params: list[str], others: list[str], blocks: tuple[str, ...]) -> str:
    """The widest module holding exactly this group (``layer1``), else ``first..last`` of its blocks."""
    owners = [_owner(n, blocks) for n in params]
    parts = [o.split(".") for o in owners]
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    for depth in range(1, len(common) + 1):
        prefix = ".".join(common[:depth])
        if not any(n.startswith(prefix + ".") for n in others):
            return prefix
    return owners[0] if owners[0] == owners[-1] else f"{owners[0]}..{owners[-1]}"


def stages(model: nn.Module, card: ModelCard, most: int = MAX_STAGES) -> tuple[list[Stage], Stage]:
    """Group ``model``'s parameters by stage.

    Args:
        model: the network, with its head at ``card.head_path`` (weights may be on the meta device).
        card: its catalog card (family, head path, blocks).
        most: the most groups below the head.

    Returns:
        ``(stages, head)``: the stages bottom-up (each a :class:`Stage` with parameter names in model
        order), and the head group (the classifier and every parameter no stage claims).
    """
    names = [n for n, _ in model.named_parameters()]
    head_prefix = card.head_path + "."
    body = [n for n in names if not n.startswith(head_prefix)]
    matcher = model_matcher(model, card)
    groups = _matcher_groups(body, matcher) if matcher is not None else _block_groups(model, card, body)
    groups = _merge([g for g in groups if g], most)
    claimed = {n for g in groups for n in g}
    head = Stage("head", tuple(n for n in names if n not in claimed))
    named = []
    for g in groups:
        members = set(g)
        named.append(Stage(_stage_name(g, [n for n in names if n not in members], card.block_paths), tuple(g)))
    return named, head
