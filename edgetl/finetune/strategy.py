"""Which layers to train, and how fast: the auto strategy, freezing, and layer-wise LR groups.

The auto strategy follows the classic transfer-learning table (CS231n, "Transfer Learning"):

=========  =====================  ==========================
           similar to ImageNet    different from ImageNet
=========  =====================  ==========================
small      linear probe           partial (last blocks)
large      partial (last blocks)  full fine-tune
=========  =====================  ==========================

*Small* means fewer than :data:`SMALL_MAX_IMAGES` training images, or fewer than
:data:`SMALL_MAX_PER_CLASS` per class on average. Around 100 images per class is where fine-tuning a
whole ImageNet backbone (millions of weights) stops overfitting badly, and where linear probes stop
gaining from more data; the per-class rule keeps a 50-class set of 1,500 images "small".

*Similar* is measured, with ``domain="auto"``, as the pretrained model's confidence on the user's
images: the mean max-softmax of its ImageNet head over a sample of training images. A classifier is
confident on images like its training distribution and spreads its probability on images unlike it
(Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples",
ICLR 2017). ImageNet models score well above :data:`DOMAIN_CONFIDENCE_THRESHOLD` (0.5) on natural
photos of ImageNet-like objects, and below it on X-rays, spectrograms, satellite tiles, documents and
synthetic shapes. Without pretrained weights there is nothing to transfer, so the domain counts as
different.

Without pretrained weights there is nothing to transfer: ``auto`` trains everything (``full``).

The table is auto's prior. Where trials are cheap (:mod:`edgetl.finetune.trials`), auto measures instead: it
trains short trials of linear, partial and full on the training split, scores them on the validation split, and
keeps the best, the table's choice winning ties. ``lp-ft`` (:mod:`edgetl.finetune.lpft`) is only used when asked
for: no cell of the table picks it, and auto does not try it (why: :mod:`edgetl.finetune.trials`).

Freezing: frozen parameters get ``requires_grad=False``; inside frozen blocks every BatchNorm layer is
swapped for a :class:`FrozenBatchNorm` (as torchvision's ``FrozenBatchNorm2d`` and timm's
``freeze_batch_norm_2d`` do) and every dropout or stochastic-depth layer for ``nn.Identity`` (what it
computes in eval mode). Frozen layers therefore never update their running statistics, whatever
``model.train()`` says, and the model still pickles (``torch.save(model)``) and exports. Under the
linear probe everything but the head is frozen, so the backbone is a fixed function of the image and
its features can be cached (:mod:`edgetl.finetune.features`).

Learning rates: parameters are grouped by stage (:mod:`edgetl.finetune.stages`); the head trains at
``lr`` and each stage below at ``layer_decay`` times the stage above it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from edgetl.errors import ConfigError
from edgetl.finetune.stages import stages
from edgetl.finetune.trials import TrialReport
from edgetl.options import STRATEGIES
from edgetl.zoo.catalog import ModelCard

log = logging.getLogger(__name__)

DOMAINS = ("auto", "similar", "different")
SMALL_MAX_IMAGES = 1000
SMALL_MAX_PER_CLASS = 100
DOMAIN_CONFIDENCE_THRESHOLD = 0.5
DOMAIN_SAMPLE_IMAGES = 256

_TABLE = {
    ("small", "similar"): "linear",
    ("small", "different"): "partial",
    ("large", "similar"): "partial",
    ("large", "different"): "full",
}
_NO_DECAY_NAMES = ("pos_embedding", "class_token", "relative_position_bias_table", "cls_token", "pos_embed",
                   "layer_scale", "logit_scale")


@dataclass(frozen=True)
class DomainEstimate:
    """How similar the user's images are to ImageNet, and how that was decided.

    Attributes:
        domain: ``similar`` or ``different``.
        source: ``user`` (``--domain`` given), ``measured``, ``no-pretrained-weights`` or
            ``no-imagenet-head`` (a weights file whose head was left out).
        confidence: mean max-softmax of the ImageNet head over ``samples`` images (when measured).
        threshold: the confidence above which the domain counts as similar.
        samples: how many images were measured.
    """

    domain: Literal["similar", "different"]
    source: str
    confidence: float | None = None
    threshold: float = DOMAIN_CONFIDENCE_THRESHOLD
    samples: int = 0

    @property
    def reason(self) -> str:
        if self.source == "user":
            return f"domain {self.domain} (given)"
        if self.source == "no-pretrained-weights":
            return "domain counts as different (no pretrained weights)"
        if self.source == "no-imagenet-head":
            return ("domain counts as different (the weights file has another head, so the ImageNet confidence "
                    "cannot be measured; pass --domain similar if the images are like ImageNet)")
        cmp = ">=" if self.domain == "similar" else "<"
        return (
            f"domain {self.domain} (ImageNet confidence {self.confidence:.2f} {cmp} {self.threshold:.2f} "
            f"over {self.samples} images)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


@dataclass(frozen=True)
class StrategyDecision:
    """The fine-tuning strategy to use and why.

    Attributes:
        strategy: ``linear``, ``partial``, ``full`` or ``lp-ft``.
        unfreeze: how many trunk blocks train (0 for linear, all for full; under lp-ft, in its second phase).
        num_blocks: how many trunk blocks the model has.
        requested: what was asked for (``auto`` or an explicit strategy).
        size: ``small`` or ``large`` (the dataset-size class), when auto decided.
        domain: the domain estimate, when auto decided.
        reason: one human-readable sentence.
        trials: what auto measured, or why it did not (auto with a trial report only).
    """

    strategy: str
    unfreeze: int
    num_blocks: int
    requested: str
    reason: str
    size: str | None = None
    domain: DomainEstimate | None = None
    trials: TrialReport | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domain"] = self.domain.to_dict() if self.domain else None
        d["trials"] = self.trials.to_dict() if self.trials else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrategyDecision:
        """The decision :meth:`to_dict` wrote (a checkpoint's strategy record)."""
        d = dict(d)
        if d.get("domain"):
            d["domain"] = DomainEstimate(**{k: v for k, v in d["domain"].items() if k != "reason"})
        if d.get("trials"):
            d["trials"] = TrialReport.from_dict(d["trials"])
        return cls(**d)


def default_unfreeze(num_blocks: int) -> int:
    """The number of blocks partial fine-tuning trains by default: the last quarter, at least 1."""
    return max(1, math.ceil(num_blocks / 4))


def dataset_size_class(num_train: int, num_classes: int) -> tuple[str, str]:
    """Classify a training set as ``small`` or ``large``; return the class and the reason."""
    per_class = num_train / max(1, num_classes)
    if num_train < SMALL_MAX_IMAGES or per_class < SMALL_MAX_PER_CLASS:
        why = (
            f"{num_train} training images < {SMALL_MAX_IMAGES}"
            if num_train < SMALL_MAX_IMAGES
            else f"{per_class:.0f} images per class < {SMALL_MAX_PER_CLASS}"
        )
        return "small", f"small dataset ({why})"
    return "large", f"large dataset ({num_train} training images, {per_class:.0f} per class)"


def choose_strategy(
    requested: str,
    num_blocks: int,
    num_train: int = 0,
    num_classes: int = 1,
    domain: DomainEstimate | None = None,
    unfreeze: int | None = None,
    trials: TrialReport | None = None,
) -> StrategyDecision:
    """Decide the strategy: an explicit one, or ``auto`` from dataset size and domain similarity (the table),
    or from the trials that measured the candidates.

    Args:
        requested: ``auto``, ``linear``, ``partial``, ``full`` or ``lp-ft``.
        num_blocks: the number of trunk blocks (``len(card.block_paths)``).
        num_train: training images (auto only).
        num_classes: classes (auto only).
        domain: the domain estimate (auto only; see :func:`estimate_domain`).
        unfreeze: blocks to train under partial and lp-ft (default: :func:`default_unfreeze`).
        trials: auto's trials (:mod:`edgetl.finetune.trials`): their winner replaces the table's choice; when none
            ran, their reason is given.

    Raises:
        ConfigError: unknown strategy, ``auto`` without a domain, or an impossible ``unfreeze``.
    """
    if requested not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{requested}'; choose one of {', '.join(STRATEGIES)}")
    if unfreeze is not None and not 1 <= unfreeze <= num_blocks:
        raise ConfigError(f"--unfreeze {unfreeze} is out of range: this model has {num_blocks} blocks (1-{num_blocks})")
    size = None
    if requested == "auto":
        if domain is None:
            raise ConfigError("the auto strategy needs a domain estimate")
        size, size_reason = dataset_size_class(num_train, num_classes)
        if domain.source == "no-pretrained-weights":
            strategy, reason = "full", "no pretrained weights, so nothing to transfer -> full"
        else:
            strategy = _TABLE[(size, domain.domain)]
            reason = f"{size_reason}, {domain.reason} -> {strategy}"
            if trials is not None:
                strategy = trials.chosen or strategy
                reason += f" by the table; {trials.summary()}"
    else:
        strategy, reason = requested, f"requested (--strategy {requested})"
    if strategy == "linear":
        n = 0
    elif strategy == "full":
        n = num_blocks
    else:
        n = unfreeze if unfreeze is not None else default_unfreeze(num_blocks)
        first = "a linear probe, then " if strategy == "lp-ft" else ""
        reason += f", {first}training the last {n} of {num_blocks} blocks"
    if unfreeze is not None and strategy not in ("partial", "lp-ft"):
        log.warning("--unfreeze %d is ignored: the strategy is %s", unfreeze, strategy)
    auto = requested == "auto"
    return StrategyDecision(strategy, n, num_blocks, requested, reason, size, domain if auto else None,
                            trials if auto else None)


def mean_max_softmax(
    model: nn.Module, batches: Any, device: Any = "cpu", max_images: int = DOMAIN_SAMPLE_IMAGES
) -> tuple[float, int]:
    """Mean max-softmax probability of ``model``'s outputs over up to ``max_images`` images.

    Args:
        model: a classifier with its pretrained head (run in eval mode).
        batches: an iterable of ``(images, labels)`` or image tensors.
        device: where to run.
        max_images: stop after this many images.

    Returns:
        (mean confidence, number of images measured).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            images = images[: max_images - count].to(device)
            probs = torch.softmax(model(images).float(), dim=1)
            total += probs.max(dim=1).values.sum().item()
            count += images.shape[0]
            if count >= max_images:
                break
    model.train(was_training)
    return (total / count if count else 0.0), count


def estimate_domain(
    requested: str,
    model: nn.Module | None = None,
    batches: Any = None,
    device: Any = "cpu",
    threshold: float = DOMAIN_CONFIDENCE_THRESHOLD,
    max_images: int = DOMAIN_SAMPLE_IMAGES,
    imagenet_head: bool = True,
) -> DomainEstimate:
    """Decide whether the images are similar to ImageNet.

    Args:
        requested: ``similar``, ``different`` or ``auto``.
        model: the pretrained model with its ImageNet head, or None without pretrained weights.
        batches: training images (eval transform), needed for ``auto`` with a model.
        device: where to run the measurement.
        threshold: mean max-softmax at or above which the domain is similar.
        max_images: how many images to measure.
        imagenet_head: whether ``model``'s head holds trained ImageNet weights; without them the
            confidence cannot be measured and ``auto`` counts the domain as different.
    """
    if requested not in DOMAINS:
        raise ConfigError(f"unknown domain '{requested}'; choose one of {', '.join(DOMAINS)}")
    if requested != "auto":
        return DomainEstimate(requested, "user", threshold=threshold)  # type: ignore[arg-type]
    if model is None:
        return DomainEstimate("different", "no-pretrained-weights", threshold=threshold)
    if not imagenet_head:
        return DomainEstimate("different", "no-imagenet-head", threshold=threshold)
    confidence, n = mean_max_softmax(model, batches, device, max_images)
    domain = "similar" if confidence >= threshold else "different"
    return DomainEstimate(domain, "measured", confidence, threshold, n)  # type: ignore[arg-type]


# --- freezing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreezePlan:
    """What trains and what is frozen in a model, derived from a decision and its card.

    Attributes:
        strategy: ``linear``, ``partial`` or ``full``.
        head_path: the (new) classifier layer; always trains.
        trainable_blocks: trunk blocks that train, input to output.
        frozen_blocks: trunk blocks that are frozen.
        locked: module paths locked in eval mode (frozen blocks; under linear, the whole trunk).
    """

    strategy: str
    head_path: str
    trainable_blocks: tuple[str, ...]
    frozen_blocks: tuple[str, ...]
    locked: tuple[str, ...]

    def block_of(self, param_name: str) -> str | None:
        """The block (or the head) a parameter belongs to, or None for a parameter in no block."""
        for path in (self.head_path, *self.trainable_blocks, *self.frozen_blocks):
            if param_name.startswith(path + "."):
                return path
        return None


_NORM_ACT_TAIL = ("drop", "act")
"""What timm's ``BatchNormAct2d`` applies after normalising, in this order."""


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers: eval-mode BatchNorm in any mode.

    It computes exactly what the BatchNorm it replaces computes in eval mode (``F.batch_norm`` with
    ``training=False``), and its state dict has the same keys (``num_batches_tracked`` included), so a
    checkpoint loads into the original architecture unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        """A frozen copy of ``bn`` (sharing no storage with it). timm's ``BatchNormAct2d`` applies its
        ``drop`` and ``act`` after normalising; the copy keeps them and applies them in the same order."""
        frozen = cls(bn.num_features, bn.eps).to(device=bn.running_mean.device)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, name)
            if value is not None:
                getattr(frozen, name).copy_(value.detach())
        for name in _NORM_ACT_TAIL:
            if isinstance(getattr(bn, name, None), nn.Module):
                frozen.add_module(name, getattr(bn, name))
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        for name in _NORM_ACT_TAIL:
            tail = self._modules.get(name)
            if tail is not None:
                x = tail(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _frozen_replacement(module: nn.Module) -> nn.Module | None:
    """What a module in a frozen block becomes, or None to keep it (and look inside it)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        extra = {name for name, _ in module.named_children()} - set(_NORM_ACT_TAIL)
        if extra:  # a BatchNorm subclass whose forward does more than we know: train it rather than break it
            log.warning("not freezing %s: unknown parts %s", type(module).__name__, ", ".join(sorted(extra)))
            return None
        return FrozenBatchNorm.from_batch_norm(module)
    if isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth)) or type(module).__name__ == "DropPath":
        return nn.Identity()  # what dropout and stochastic depth compute in eval mode
    return None


def freeze_modules(model: nn.Module, path: str) -> int:
    """Swap the BatchNorm, dropout and stochastic-depth layers at or below ``path`` for frozen equivalents.

    Returns:
        How many modules were swapped.
    """
    module = model.get_submodule(path)
    new = _frozen_replacement(module)
    if new is not None:
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
        return 1
    return sum(freeze_modules(model, f"{path}.{name}" if path else name) for name, _ in list(module.named_children()))


def _trunk_roots(model: nn.Module, head_path: str) -> list[str]:
    """The smallest set of module paths that covers everything except the head."""
    roots: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path == head_path:
                continue
            if head_path.startswith(path + "."):
                walk(child, path + ".")
            else:
                roots.append(path)

    walk(model, "")
    return roots


def apply_strategy(model: nn.Module, card: ModelCard, decision: StrategyDecision) -> FreezePlan:
    """Freeze ``model`` for ``decision`` in place: ``requires_grad`` off, frozen BatchNorm and no dropout.

    The model must already have its new head at ``card.head_path``.

    Returns:
        The plan, for building parameter groups.
    """
    blocks = tuple(card.block_paths)
    n = decision.unfreeze if decision.strategy != "full" else len(blocks)
    trainable = blocks[len(blocks) - n :] if n else ()
    frozen = blocks[: len(blocks) - n]
    if decision.strategy == "linear":
        locked = tuple(_trunk_roots(model, card.head_path))
    elif decision.strategy in ("partial", "lp-ft"):
        locked = frozen
    else:
        locked = ()
    plan = FreezePlan(decision.strategy, card.head_path, trainable, frozen, locked)
    for name, param in model.named_parameters():
        owner = plan.block_of(name)
        param.requires_grad_(decision.strategy == "full" or owner == card.head_path or owner in trainable)
    # A BatchNorm layer outside every block (rare) is locked too when all its parameters are frozen.
    extra = [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in module.parameters())
        and not any(path == lk or path.startswith(lk + ".") for lk in locked)
    ]
    plan = FreezePlan(plan.strategy, plan.head_path, trainable, frozen, (*locked, *extra))
    for path in plan.locked:
        freeze_modules(model, path)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("strategy %s: %d of %d parameters train (%d blocks + head)",
             decision.strategy, n_train, n_all, len(trainable))
    return plan


# --- parameter groups ----------------------------------------------------------------------------


def _no_decay_names(model: nn.Module) -> set[str]:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, norms) or param.ndim <= 1 or p_name in _NO_DECAY_NAMES:
                names.add(full)
    return names


def build_param_groups(
    model: nn.Module,
    plan: FreezePlan,
    card: ModelCard,
    lr: float,
    layer_decay: float = 0.7,
    weight_decay: float = 0.05,
) -> list[dict[str, Any]]:
    """AdamW parameter groups by stage: the head at ``lr``, each stage below at ``layer_decay`` times the one above.

    Stages come from :func:`edgetl.finetune.stages.stages` (timm's ``group_matcher``, or the family's
    stage list). Only trainable parameters are grouped. Norm layers, biases and embeddings get no
    weight decay.

    Returns:
        Groups with ``params``, ``lr``, ``lr_scale``, ``weight_decay`` and a ``name`` (``head`` or a
        stage's name, suffixed ``/decay`` or ``/no_decay``), head first, then the stages top-down.
    """
    if lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    no_decay = _no_decay_names(model)
    params = dict(model.named_parameters())
    below, head = stages(model, card)
    groups = []
    for depth, stage in enumerate([head, *reversed(below)]):
        scale = layer_decay**depth
        for decay in (True, False):
            members = [params[n] for n in stage.params if params[n].requires_grad and (n not in no_decay) == decay]
            if members:
                groups.append({
                    "params": members, "lr": lr * scale, "lr_scale": scale,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{stage.name}/{'decay' if decay else 'no_decay'}",
                })
    return groups


def describe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each LR group's name, LR scale and parameter count (``/decay`` and ``/no_decay`` halves together)."""
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        name = g["name"].rsplit("/", 1)[0]
        entry = out.setdefault(name, {"name": name, "lr_scale": g["lr_scale"], "params": 0})
        entry["params"] += sum(p.numel() for p in g["params"])
    return list(out.values())
