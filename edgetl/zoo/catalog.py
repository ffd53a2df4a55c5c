"""The model catalog: torchvision's and timm's ImageNet-1K classifiers, as :class:`ModelCard` entries.

Two zoos: every torchvision ImageNet-1K classification weight entry (below), and timm's edge-friendly families
(:mod:`edgetl.zoo.timm`, names ``timm/<arch>.<tag>``). For torchvision, all figures (acc@1, acc@5, params,
GFLOPs, file size, minimum input size, resize, crop, mean and std) are read from torchvision's own weights
metadata (``Weights.meta`` and ``Weights.transforms``), never typed by hand. The head's module path and the
ordered trunk blocks are derived from the architecture itself, built on the meta device without weights.

Importing torch and torchvision takes seconds, so each zoo is cached as JSON keyed by its library's version
(the timm zoo also by torch's, whose trace gives its params and GFLOPs); a warm cache answers without importing
torch or timm at all.

Building a zoo's cache is the slow, first-run part (timm's entries are traced); :func:`list_models` reports it
to a ``progress(done, total, name)`` callback, which is called only while a zoo is being built.

Names resolve like timm's registry: ``resnet50`` is the DEFAULT weights, ``resnet50.IMAGENET1K_V1``
a specific tag. An unknown name raises :class:`~edgetl.errors.UnknownNameError` with suggestions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl._io import atomic_write_json, cache_dir
from edgetl.errors import UnknownNameError
from edgetl.options import ZOOS
from edgetl.zoo import timm as zoo_timm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CATALOG_SCHEMA = 3
_METRICS_KEY = "ImageNet-1K"

Progress = Callable[[int, int, str], None]
#: The ``progress`` of the :func:`list_models` call under way, for the zoo builders below its memoised lookup.
_building: ContextVar[Progress | None] = ContextVar("edgetl_catalog_progress", default=None)


def _report(done: int, total: int, name: str) -> None:
    hook = _building.get()
    if hook is not None:
        hook(done, total, name)


@dataclass(frozen=True)
class Preprocess:
    """How an image must be prepared for a model: enough for firmware to do it without torchvision."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    color_order: str = "RGB"
    scale: float = 1.0 / 255.0

    def at_resolution(self, resolution: int | None) -> Preprocess:
        """Return the same preprocessing rescaled to a crop of ``resolution`` pixels (ratio kept)."""
        if resolution is None or resolution == self.crop_size:
            return self
        resize = round(resolution * self.resize_size / self.crop_size)
        return Preprocess(resize, resolution, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class ModelCard:
    """One pretrained weight entry of the catalog (torchvision or timm), with everything edgetl needs to know.

    Attributes:
        name: the builder name, e.g. ``resnet50``, or ``timm/<arch>`` for timm (``timm/mobilenetv4_conv_small``).
        weights: the weights tag, e.g. ``IMAGENET1K_V2``, or timm's pretrained tag (``e2400_r224_in1k``).
        is_default: whether this tag is the builder's DEFAULT weights.
        top1, top5: ImageNet-1K accuracy (%) from torchvision's metadata or timm's published results;
            ``None`` for weights that have no classifier accuracy (``vgg16.IMAGENET1K_FEATURES``).
        params: number of parameters (timm: of the re-parameterised, deployed network).
        gflops: GMACs per image at ``preprocess.crop_size`` (torchvision's ``_ops``; timm: edgetl's trace).
        file_mb: size of the weights file in MiB (torchvision's ``_file_size``; timm: the fp32 state_dict).
        min_size: the smallest (H, W) the architecture accepts.
        preprocess: resize, crop, mean, std and interpolation of the evaluation transform.
        head_path: dotted module path of the classifier layer (the one to replace; for timm it is the layer
            ``reset_classifier`` creates, which :func:`replace_head` calls).
        block_paths: dotted module paths of the trunk's blocks, input to output, for partial freezing.
        family: the architecture family, e.g. ``resnet``, ``efficientnet``, ``vit``.
        url: where torchvision downloads the weights from (timm: the Hugging Face hub page).
        recipe: the training recipe's URL (timm: the cfg's origin URL and how the row was chosen).
    """

    name: str
    weights: str
    is_default: bool
    top1: float | None
    top5: float | None
    params: int
    gflops: float
    file_mb: float
    min_size: tuple[int, int]
    preprocess: Preprocess
    head_path: str
    block_paths: tuple[str, ...]
    family: str
    url: str = ""
    recipe: str = ""
    num_classes: int = 1000
    categories: tuple[str, ...] = field(default=(), repr=False)

    @property
    def id(self) -> str:
        """``name.WEIGHTS``, the unambiguous identifier of this entry."""
        return f"{self.name}.{self.weights}"

    @property
    def zoo(self) -> str:
        """``timm`` or ``torchvision``."""
        return "timm" if zoo_timm.is_timm(self.name) else "torchvision"

    @property
    def resolution(self) -> int:
        """The crop size the published accuracy was measured at."""
        return self.preprocess.crop_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["min_size"] = list(self.min_size)
        d["block_paths"] = list(self.block_paths)
        d["categories"] = list(self.categories)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        d = dict(d)
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        d["min_size"] = tuple(d["min_size"])
        d["block_paths"] = tuple(d["block_paths"])
        d["categories"] = tuple(d.get("categories", ()))
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """The public, JSON-friendly view used by ``edgetl models --json``."""
        return {
            "model": self.name,
            "weights": self.weights,
            "default": self.is_default,
            "top1": self.top1,
            "top5": self.top5,
            "params_m": round(self.params / 1e6, 3),
            "gflops": self.gflops,
            "file_mb": self.file_mb,
            "resolution": self.resolution,
            "family": self.family,
            "zoo": self.zoo,
            "head": self.head_path,
            "blocks": len(self.block_paths),
        }


def _family(name: str) -> str:
    for prefix in (
        "efficientnet_v2",
        "efficientnet",
        "mobilenet_v2",
        "mobilenet_v3",
        "resnext",
        "wide_resnet",
        "resnet",
        "regnet_x",
        "regnet_y",
        "convnext",
        "swin_v2",
        "swin",
        "vit",
        "maxvit",
        "densenet",
        "shufflenet_v2",
        "squeezenet",
        "mnasnet",
        "vgg",
        "alexnet",
        "googlenet",
        "inception",
    ):
        if name.startswith(prefix):
            return prefix
    return name


# --- building architectures without weights ---------------------------------------------------


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new parameter and buffer on the meta device (as accelerate's init_empty_weights).

    Some constructors (RegNet) compute with real tensors, so ``with torch.device("meta")`` cannot
    build them; moving each parameter to meta as it is registered works for every architecture.
    """
    import torch

    register_parameter = torch.nn.Module.register_parameter
    register_buffer = torch.nn.Module.register_buffer

    def _param(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def _buffer(module, name, tensor, persistent=True):
        if tensor is not None:
            tensor = tensor.to("meta")
        register_buffer(module, name, tensor, persistent=persistent)

    torch.nn.Module.register_parameter = _param
    torch.nn.Module.register_buffer = _buffer
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter
        torch.nn.Module.register_buffer = register_buffer


def build_architecture(
    name: str, meta: bool = False, resolution: int | None = None, deploy: bool = False, **kwargs: Any
) -> torch.nn.Module:
    """Build a catalog architecture with random (or, with ``meta=True``, no) weights, in eval mode.

    Args:
        name: a builder name or card id (``resnet50``, ``resnet50.IMAGENET1K_V2``, ``timm/repvit_m1.dist_in1k``).
        meta: put parameters on the meta device: no memory, no initialisation cost.
        resolution: the input size, for architectures whose shape depends on it (ViT, MaxViT, EfficientFormer-v2).
        deploy: the network as it is deployed: timm's re-parameterisable models fused
            (``timm.utils.reparameterize_model``); torchvision's are unchanged. Train the unfused one.
        **kwargs: passed to the torchvision builder or ``timm.create_model`` (e.g. ``num_classes``).
    """
    builder = get_card(name).name
    kwargs = {**arch_kwargs(builder, resolution), **kwargs}
    if zoo_timm.is_timm(builder):
        return zoo_timm.build(zoo_timm.split_name(builder)[0], meta=meta, deploy=deploy, **kwargs)
    return _build(builder, meta, **kwargs)


def arch_kwargs(name: str, resolution: int | None = None, pretrained: bool = True) -> dict[str, Any]:
    """The builder keyword arguments edgetl builds an architecture of either zoo with: the one place that decides them.

    - GoogLeNet and Inception v3 lose their auxiliary classifiers (fine-tuning trains one head); for pretrained
      weights they are built as torchvision builds them with weights (``transform_input``, no initialisation).
    - timm's RepViT and EfficientFormer-v2 get one classifier (``distillation=False``, see :mod:`edgetl.zoo.timm`).
    - Architectures whose shape depends on the input size are sized for ``resolution``: ViT's ``image_size``,
      MaxViT's ``input_size``, EfficientFormer-v2's ``img_size``.

    Args:
        name: a builder name or card id (``vit_b_16``, ``timm/efficientformerv2_s0.snap_dist_in1k``); the name
            alone decides, so this works while the catalog itself is being built.
        resolution: the input size; None leaves the builder's default size (224 px).
        pretrained: whether pretrained weights will be loaded (GoogLeNet's and Inception's input transform).

    Returns:
        The keyword arguments for the torchvision builder or ``timm.create_model``.
    """
    if zoo_timm.is_timm(name):
        arch = zoo_timm.split_name(name)[0]
        kwargs: dict[str, Any] = {"distillation": False} if arch.startswith(zoo_timm.SINGLE_HEAD) else {}
        if arch.startswith("efficientformerv2_") and resolution:
            kwargs["img_size"] = int(resolution)
        return kwargs
    builder = name.strip().partition(".")[0].lower()
    kwargs = {}
    if builder in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, transform_input=pretrained, init_weights=not pretrained)
    if resolution and builder.startswith("vit_"):
        kwargs["image_size"] = int(resolution)
    elif resolution and builder.startswith("maxvit"):
        kwargs["input_size"] = (int(resolution), int(resolution))
    return kwargs


def _build(builder: str, meta: bool, **kwargs: Any) -> torch.nn.Module:
    import torch
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        if meta:
            try:
                with torch.device("meta"):
                    model = models.get_model(builder, weights=None, **kwargs)
            except (NotImplementedError, RuntimeError):
                with _params_on_meta():
                    model = models.get_model(builder, weights=None, **kwargs)
        else:
            model = models.get_model(builder, weights=None, **kwargs)
    return model.eval()


def deployed_model(model: torch.nn.Module, card: ModelCard) -> torch.nn.Module:
    """The network as it is deployed, for export and timing: timm's re-parameterisable models (MobileOne,
    FastViT, RepViT...) fused by ``timm.utils.reparameterize_model`` into a copy in eval mode; ``model``
    itself, which trains in the unfused form, is left unchanged. Other models are returned as they are.
    """
    if card.zoo != "timm":
        return model
    from timm.utils import reparameterize_model

    return reparameterize_model(model, inplace=False).eval()


def get_submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Return the submodule at a dotted ``path``."""
    return model.get_submodule(path)


def replace_head(model: torch.nn.Module, card: ModelCard, num_classes: int) -> torch.nn.Module:
    """Replace the classifier layer at ``card.head_path`` with a fresh one for ``num_classes``.

    The new layer keeps the old one's input width, dtype and device. Returns the new layer. timm models get
    theirs from ``reset_classifier(num_classes)``.
    """
    import torch

    old = model.get_submodule(card.head_path)
    param = next(old.parameters())
    if card.zoo == "timm":
        model.reset_classifier(num_classes)
        model.to(device=param.device, dtype=param.dtype)
        return model.get_submodule(card.head_path)
    if isinstance(old, torch.nn.Linear):
        new = torch.nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, torch.nn.Conv2d):  # SqueezeNet's classifier is a 1x1 convolution
        new = torch.nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    else:
        raise TypeError(f"cannot replace a head of type {type(old).__name__} at {card.head_path}")
    new = new.to(device=param.device, dtype=param.dtype)
    parent_path, _, attr = card.head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return new


def _has_params(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _derive_layout(model: torch.nn.Module, head: str = "") -> tuple[str, tuple[str, ...]]:
    """Find the classifier layer (unless ``head`` names it) and the ordered trunk blocks of a classifier."""
    import torch

    if not head:
        for path, module in model.named_modules():
            out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and out == 1000:
                head = path  # the last such layer
    if not head:
        raise ValueError("no classifier layer with 1000 outputs found")

    expandable = (torch.nn.Sequential, torch.nn.ModuleList)
    blocks: list[str] = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if child_name.lower().startswith("aux") or not _has_params(child):
                continue
            if path == head:
                continue
            parts = [c for c in child.children() if _has_params(c)]
            is_container = type(child).__name__ == "Encoder" or (
                isinstance(child, expandable)
                and (any(any(True for _ in c.children()) for c in parts) or len(parts) >= 4)
            )
            if is_container or head.startswith(path + "."):
                walk(child, path + ".")
            else:
                blocks.append(path)

    walk(model, "")
    return head, tuple(blocks)


# --- reading torchvision's metadata ------------------------------------------------------------


def _metric(value: Any) -> float | None:
    """An accuracy figure, or ``None`` where torchvision publishes NaN (feature-only weights)."""
    value = float(value)
    return None if math.isnan(value) else value


def _interp_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _cards_from_torchvision() -> list[ModelCard]:
    from torchvision import models

    cards: list[ModelCard] = []
    names = models.list_models(module=models)
    for i, name in enumerate(names):
        _report(i, len(names), f"torchvision {name}")
        enum = models.get_model_weights(name)
        entries = [w for w in enum if _METRICS_KEY in w.meta.get("_metrics", {})]
        if not entries:
            continue
        default = enum.DEFAULT
        model = _build(name, meta=True, **arch_kwargs(name))
        head, blocks = _derive_layout(model)
        for w in entries:
            meta = w.meta
            tf = w.transforms()
            metrics = meta["_metrics"][_METRICS_KEY]
            crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
            resize = tf.resize_size[0] if isinstance(tf.resize_size, (list, tuple)) else tf.resize_size
            cards.append(
                ModelCard(
                    name=name,
                    weights=w.name,
                    is_default=w == default,
                    top1=_metric(metrics["acc@1"]),
                    top5=_metric(metrics["acc@5"]),
                    params=int(meta["num_params"]),
                    gflops=float(meta.get("_ops", 0.0)),
                    file_mb=float(meta.get("_file_size", 0.0)),
                    min_size=tuple(meta.get("min_size", (1, 1))),
                    preprocess=Preprocess(
                        resize_size=int(resize),
                        crop_size=int(crop),
                        mean=tuple(float(x) for x in tf.mean),
                        std=tuple(float(x) for x in tf.std),
                        interpolation=_interp_name(tf.interpolation),
                    ),
                    head_path=head,
                    block_paths=blocks,
                    family=_family(name),
                    url=w.url,
                    recipe=str(meta.get("recipe", "")),
                    categories=tuple(meta.get("categories") or ()),
                )
            )
    return cards


def imagenet_categories() -> tuple[str, ...]:
    """ImageNet-1K's class names in output order, as torchvision ships them (used for timm's cards too)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _cards_from_timm() -> list[ModelCard]:
    """Cards for :func:`edgetl.zoo.timm.entries`, sized by tracing each deployed architecture once per resolution."""
    categories = imagenet_categories()
    groups: dict[str, list[zoo_timm.Entry]] = {}
    for e in zoo_timm.entries():
        groups.setdefault(e.arch, []).append(e)
    cards: list[ModelCard] = []
    for i, (arch, group) in enumerate(groups.items()):
        _report(i, len(groups), zoo_timm.PREFIX + arch)
        cards += _timm_arch_cards(arch, group, categories)
    return cards


def _timm_arch_cards(arch: str, group: list[zoo_timm.Entry], categories: tuple[str, ...]) -> list[ModelCard]:
    """The cards of one timm architecture's tags: one meta build for the layout, fused in place for the trace."""
    from edgetl.zoo import cost

    kwargs = arch_kwargs(zoo_timm.PREFIX + arch, group[0].resolution)
    model = zoo_timm.build(arch, meta=True, **kwargs)
    head, blocks = _derive_layout(model, zoo_timm.head_path(arch, group[0].cfg))
    file_mb = round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20, 3)
    fused: dict[int, torch.nn.Module] = {}

    def deployed(res: int) -> torch.nn.Module:
        kw = arch_kwargs(zoo_timm.PREFIX + arch, res)
        if kw != kwargs:  # the architecture depends on the input size: build it for this one
            return zoo_timm.build(arch, meta=True, deploy=True, **kw)
        if not fused:
            fused[0] = zoo_timm.deployed(model, arch, **kwargs)
        return fused[0]

    cards = []
    for e in group:
        trace = cost.trace_architecture(zoo_timm.PREFIX + arch, e.resolution, lambda e=e: deployed(e.resolution))
        cards.append(_timm_card(e, trace, head, blocks, file_mb, categories))
    return cards


def _timm_card(e: zoo_timm.Entry, trace: Any, head: str, blocks: tuple[str, ...], file_mb: float,
               categories: tuple[str, ...]) -> ModelCard:
    cfg = e.cfg
    return ModelCard(
        name=zoo_timm.PREFIX + e.arch,
        weights=e.tag,
        is_default=e.is_default,
        top1=float(e.row["top1"]),
        top5=float(e.row["top5"]),
        params=int(trace.params),
        gflops=round(trace.flops / 2e9, 4),
        file_mb=file_mb,
        min_size=(32, 32),
        preprocess=Preprocess(
            resize_size=zoo_timm.resize_size(e.resolution, e.crop_pct),
            crop_size=e.resolution,
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            interpolation=str(cfg.get("interpolation") or "bilinear"),
        ),
        head_path=head,
        block_paths=blocks,
        family=e.family,
        url=f"https://huggingface.co/timm/{e.hub_id}",
        recipe=(f"{cfg.get('origin_url') or ''} (top-1 at {e.size_source} {e.resolution} px, "
                f"crop_pct {e.crop_pct:g})").strip(),
        categories=categories,
    )


@lru_cache(maxsize=1)
def torchvision_version() -> str:
    """The installed torchvision version, read without importing it."""
    return metadata.version("torchvision")


def _cache_file(zoo: str = "torchvision") -> Path:
    if zoo == "timm":
        key = f"timm-{zoo_timm.timm_version()}-torch-{metadata.version('torch')}"
    else:
        key = f"torchvision-{torchvision_version()}"
    return cache_dir("catalog") / f"{key}-v{_CATALOG_SCHEMA}.json"


@lru_cache(maxsize=2)
def _zoo_cards(zoo: str) -> tuple[ModelCard, ...]:
    if zoo == "timm" and zoo_timm.timm_version() is None:
        log.warning("timm is not installed: the catalog holds torchvision's models only (pip install timm)")
        return ()
    path = _cache_file(zoo)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return tuple(ModelCard.from_dict(d) for d in data["cards"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable catalog cache %s: %s", path, exc)
    log.info("building the %s model catalog (cached afterwards in %s)", zoo, path)
    cards = _cards_from_timm() if zoo == "timm" else _cards_from_torchvision()
    _report(1, 1, "")
    atomic_write_json(path, {zoo: path.stem, "cards": [c.to_dict() for c in cards]})
    return tuple(cards)


def _cards(zoo: str = "all") -> tuple[ModelCard, ...]:
    if zoo not in (*ZOOS, "all"):
        raise UnknownNameError("zoo", zoo, [*ZOOS, "all"])
    return tuple(c for z in ZOOS if zoo in (z, "all") for c in _zoo_cards(z))


def _matches(name: str, card_id: str, pat: str) -> bool:
    names = (name, card_id.lower(), name.removeprefix(zoo_timm.PREFIX), card_id.lower().removeprefix(zoo_timm.PREFIX))
    return any(fnmatch.fnmatch(n, pat) for n in names)


def _timm_may_match(pat: str) -> bool:
    """Whether a glob can match a timm entry, answered from the vendored results (which name every timm entry)
    without building the timm zoo."""
    for hub_id, _ in zoo_timm.read_results():
        arch = hub_id.partition(".")[0]
        if _matches(zoo_timm.PREFIX + arch, zoo_timm.PREFIX + hub_id, pat):
            return True
    return False


def list_models(pattern: str | None = None, default_only: bool = False, zoo: str = "all",
                progress: Progress | None = None) -> list[ModelCard]:
    """List the catalog's cards, optionally filtered.

    Args:
        pattern: a glob matched against the model name and the ``name.WEIGHTS`` id (``"resnet*"``); timm
            names match with or without their ``timm/`` prefix (``"mobilenetv4*"``).
        default_only: keep only each builder's DEFAULT weights (timm: each architecture's default tag).
        zoo: ``torchvision``, ``timm`` or ``all``.
        progress: called as ``progress(done, total, name)`` while a zoo's cache is built (the first run), per
            torchvision builder or timm architecture; never when the cache answers.

    Returns:
        The matching cards, sorted by name and weights tag.
    """
    pat = pattern.lower() if pattern else ""
    if pat and zoo == "all" and not _timm_may_match(pat):
        zoo = "torchvision"
    token = _building.set(progress)
    try:
        cards = list(_cards(zoo))
    finally:
        _building.reset(token)
    if pat:
        cards = [c for c in cards if _matches(c.name, c.id, pat)]
    if default_only:
        cards = [c for c in cards if c.is_default]
    return sorted(cards, key=lambda c: (c.name, c.weights))


def get_card(name: str) -> ModelCard:
    """Resolve a model name to its card.

    ``resnet50`` (and ``resnet50.DEFAULT``) give the DEFAULT weights; ``resnet50.IMAGENET1K_V1``
    a specific tag (case-insensitive). timm names are the hub's: ``timm/<arch>.<tag>``, and
    ``timm/<arch>`` is timm's default tag.

    Raises:
        UnknownNameError: the name is not in the catalog; the message lists the closest names.
    """
    if zoo_timm.is_timm(name):
        return _get_timm_card(name)
    cards = _cards("torchvision")
    arch, _, tag = name.strip().partition(".")
    arch = arch.lower()
    tag = tag.upper()
    matches = [c for c in cards if c.name == arch]
    if not matches:
        raise UnknownNameError("model", name, sorted({c.name for c in _cards()}), hint="see `edgetl models`")
    if not tag or tag == "DEFAULT":
        return next(c for c in matches if c.is_default)
    for card in matches:
        if card.weights == tag:
            return card
    raise UnknownNameError(
        "weights", f"{arch}.{tag}", [c.id for c in matches], hint=f"tags of {arch}: " + ", ".join(
            c.weights for c in matches
        )
    )


def _get_timm_card(name: str) -> ModelCard:
    arch, tag = zoo_timm.split_name(name)
    full = zoo_timm.PREFIX + arch
    matches = [c for c in _cards("timm") if c.name == full]
    if not matches:
        raise UnknownNameError("model", name, sorted({c.name for c in _cards()}), hint="see `edgetl models`")
    if not tag:
        return next((c for c in matches if c.is_default), matches[0])
    for card in matches:
        if card.weights == tag:
            return card
    raise UnknownNameError("weights", f"{full}.{tag}", [c.id for c in matches],
                           hint=f"ImageNet-1K tags of {full}: " + ", ".join(c.weights for c in matches))
