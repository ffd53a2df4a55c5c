"""timm as the catalog's second zoo: edge-friendly ImageNet-1K backbones as :class:`~edgetl.zoo.catalog.ModelCard`.

Names follow the Hugging Face hub ids: ``timm/<arch>.<tag>`` (``timm/mobilenetv4_conv_small.e2400_r224_in1k``);
``timm/<arch>`` is timm's default tag, the first one its registry lists.

Which entries: every pretrained tag of :data:`FAMILIES` whose classifier has ImageNet-1K's 1000 classes (the tag
names ``in1k``) and which has a row in timm's published results (``results-imagenet.csv``, vendored as
``edgetl/zoo/timm_results.csv`` with its provenance on the first line).

Where each figure comes from:

- **Resolution and preprocessing** from the tag's ``pretrained_cfg``. The entry is evaluated where timm evaluates
  it: at ``test_input_size`` with ``test_crop_pct`` when the cfg names them, else at ``input_size`` with
  ``crop_pct``. Resize is ``floor(size / crop_pct)``, as timm's eval transform does; mean, std and interpolation
  are the cfg's (``tf_*`` and some MobileNetV4 tags use mean = std = 0.5).
- **Top-1 / top-5** from the results row of the tag at exactly that ``img_size``.
- **Params and GFLOPs** from edgetl's own cost trace of the *deployed* network: re-parameterisable models
  (MobileOne, FastViT, RepViT, GhostNetV3...) are fused with ``timm.utils.reparameterize_model()`` first.
  GFLOPs are multiply-accumulates, as torchvision's ``_ops`` and timm's ``GMACs``.
- **File size**: the unfused fp32 ``state_dict`` (what a weights file holds), in MiB as torchvision's.

Distilled RepViT and EfficientFormer-v2 tags have two classifiers whose outputs are averaged at inference. edgetl
builds them with one (``distillation=False``), so that fine-tuning replaces and trains one head, and folds the
pretrained pair into it exactly (:func:`adapt_state_dict`).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIX = "timm/"
RESULTS_FILE = Path(__file__).with_name("timm_results.csv")
RESULTS_SOURCE = (
    "# source: huggingface/pytorch-image-models, commit aa4b5850c1543fa488abf260f18390eda46cf85d, "
    "path results/results-imagenet.csv (rows of the catalog's timm entries only, unchanged)"
)

# family name -> timm architecture globs
FAMILIES: dict[str, tuple[str, ...]] = {
    "mobilenetv4": ("mobilenetv4_*",),
    "efficientnet_lite": ("tf_efficientnet_lite*",),
    "fastvit": ("fastvit_*",),
    "repvit": ("repvit_*",),
    "mobileone": ("mobileone_*",),
    "ghostnet": ("ghostnet*",),
    "lcnet": ("lcnet_*",),
    "efficientvit_mit": ("efficientvit_b*", "efficientvit_l*"),
    "tinynet": ("tinynet_*",),
    "mobilevitv2": ("mobilevitv2_*",),
    "efficientformerv2": ("efficientformerv2_*",),
    "mobilenetv3": ("mobilenetv3_*", "tf_mobilenetv3_*"),
    "convnext": ("convnext_atto*", "convnext_femto*", "convnext_pico*", "convnext_nano*"),
    "regnet": ("regnetx_*", "regnety_*", "regnetv_*"),
}
SINGLE_HEAD = ("repvit_", "efficientformerv2_")  # built with distillation=False, see the module docstring


def is_timm(name: str) -> bool:
    """Whether a catalog name belongs to the timm zoo."""
    return name.strip().lower().startswith(PREFIX)


def split_name(name: str) -> tuple[str, str]:
    """``timm/<arch>.<tag>`` -> (``arch``, ``tag``); the tag is ``""`` when the name has none."""
    arch, _, tag = name.strip()[len(PREFIX):].partition(".")
    return arch.lower(), tag.lower()


def family_of(arch: str) -> str | None:
    """The catalog family of a timm architecture, or None when it is not one of :data:`FAMILIES`."""
    for family, globs in FAMILIES.items():
        if any(fnmatch.fnmatch(arch, g) for g in globs):
            return family
    return None


@lru_cache(maxsize=1)
def timm_version() -> str | None:
    """The installed timm version, read without importing timm (None when timm is not installed)."""
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None


# --- published results ------------------------------------------------------------------------


def read_results(path: str | Path | None = None) -> dict[tuple[str, int], dict[str, str]]:
    """Read a timm results CSV (the vendored one by default) keyed by (``arch.tag``, ``img_size``).

    Lines starting with ``#`` (the provenance line) are skipped.
    """
    with open(path or RESULTS_FILE, newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        return {(r["model"], int(r["img_size"])): r for r in rows}


def write_vendored_results(source: str | Path, ids: list[tuple[str, int]], dest: str | Path | None = None) -> Path:
    """Copy the rows ``ids`` (``arch.tag``, ``img_size``) of timm's results CSV into the vendored file, atomically.

    Used by ``tools/vendor_timm_results.py`` when the catalog's timm entries change.
    """
    from edgetl._io import atomic_write_text

    with open(source, newline="") as fh:
        lines = fh.read().splitlines()
    header, wanted = lines[0], set(ids)
    kept = [ln for ln in lines[1:] if (ln.split(",")[0], int(ln.split(",")[1])) in wanted]
    dest = Path(dest or RESULTS_FILE)
    atomic_write_text(dest, "\n".join([RESULTS_SOURCE, header, *kept]) + "\n")
    return dest


# --- building ---------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence timm's and torch's user and deprecation warnings while building a model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def build(arch: str, meta: bool = False, deploy: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Build a timm architecture with random weights (or none, ``meta=True``), in eval mode.

    Args:
        arch: the timm architecture name (no ``timm/`` prefix, no tag).
        meta: put it on the meta device.
        deploy: re-parameterise it as it is deployed (``timm.utils.reparameterize_model``).
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``).
    """
    import torch

    if not meta:
        model = _create(arch, **kwargs)
        return _reparameterize(model) if deploy else model
    with torch.device("meta"):
        model = _create(arch, **kwargs)
    return deployed(model, arch, **kwargs) if deploy else model


def deployed(model: torch.nn.Module, arch: str, **kwargs: Any) -> torch.nn.Module:
    """Re-parameterise a meta-device ``model`` of ``arch`` in place and return it (fused, as deployed).

    The fusion runs under ``torch.device("meta")``, so the tensors it creates (MobileOne's, FastViT's identity
    kernels) are on the meta device too. Should a fusion still need real tensors, the model is rebuilt on the
    CPU with ``kwargs``, fused there and moved to the meta device.
    """
    import torch

    try:
        with torch.device("meta"):
            return _reparameterize(model)
    except (NotImplementedError, RuntimeError):
        return _reparameterize(_create(arch, **kwargs)).to("meta")


def _create(arch: str, **kwargs: Any) -> torch.nn.Module:
    import timm  # deferred: importing timm takes seconds

    with quiet_warnings():
        return timm.create_model(arch, pretrained=False, **kwargs).eval()


def _reparameterize(model: torch.nn.Module) -> torch.nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(model, inplace=True).eval()


def adapt_state_dict(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a timm pretrained ``state_dict`` into the layout of edgetl's build of ``arch``.

    For RepViT and EfficientFormer-v2, whose pretrained tags carry a distillation head averaged with the main one
    at inference, fold the two into one exactly. Other architectures are returned unchanged.
    """
    import torch

    if arch.startswith("efficientformerv2_") and "head_dist.weight" in state:
        state = dict(state)
        for p in ("weight", "bias"):
            state[f"head.{p}"] = (state[f"head.{p}"] + state.pop(f"head_dist.{p}")) / 2
    elif arch.startswith("repvit_") and "head.head_dist.l.weight" in state:
        state = dict(state)
        w1, b1 = _fuse_norm_linear(state, "head.head")
        w2, b2 = _fuse_norm_linear(state, "head.head_dist")
        for key in [k for k in state if k.startswith("head.head_dist.")]:
            del state[key]
        bn = "head.head.bn."
        eps = 1e-5  # BatchNorm1d's default, which timm's NormLinear uses
        state[bn + "weight"] = torch.ones_like(state[bn + "weight"])
        state[bn + "bias"] = torch.zeros_like(state[bn + "bias"])
        state[bn + "running_mean"] = torch.zeros_like(state[bn + "running_mean"])
        state[bn + "running_var"] = torch.full_like(state[bn + "running_var"], 1 - eps)  # an identity BatchNorm
        state["head.head.l.weight"], state["head.head.l.bias"] = (w1 + w2) / 2, (b1 + b2) / 2
    return state


def _fuse_norm_linear(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold timm's NormLinear (BatchNorm1d then Linear) at ``prefix`` into one linear layer's weight and bias."""
    eps = 1e-5
    g, b = state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"]
    mean, var = state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"]
    w, bias = state[f"{prefix}.l.weight"], state[f"{prefix}.l.bias"]
    scale = g / (var + eps) ** 0.5
    shift = b - mean * scale
    return w * scale[None, :], bias + w @ shift


# --- catalog entries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One pretrained ImageNet-1K tag of a catalog family, with its evaluation setting and results row."""

    arch: str
    tag: str
    family: str
    is_default: bool
    cfg: dict[str, Any]
    resolution: int
    crop_pct: float
    size_source: str  # "test_input_size" or "input_size"
    row: dict[str, str]

    @property
    def hub_id(self) -> str:
        return f"{self.arch}.{self.tag}"


def evaluation_setting(cfg: dict[str, Any]) -> tuple[int, float, str]:
    """(resolution, crop_pct, which cfg field) at which timm evaluates a tag: its test size when it has one."""
    if cfg.get("test_input_size"):
        return int(cfg["test_input_size"][-1]), float(cfg.get("test_crop_pct") or cfg["crop_pct"]), "test_input_size"
    return int(cfg["input_size"][-1]), float(cfg["crop_pct"]), "input_size"


def entries(results: dict[tuple[str, int], dict[str, str]] | None = None) -> list[Entry]:
    """Every pretrained ImageNet-1K tag of :data:`FAMILIES` in the installed timm with a published row."""
    import timm
    from timm.models import get_arch_pretrained_cfgs

    results = read_results() if results is None else results
    out: list[Entry] = []
    names = {n for globs in FAMILIES.values() for g in globs for n in timm.list_models(g, pretrained=True)}
    for arch in sorted({n.partition(".")[0] for n in names}):
        cfgs = get_arch_pretrained_cfgs(arch)  # keyed by "arch.tag", timm's default tag first
        default_tag = next(iter(cfgs), "").partition(".")[2]
        for full, pcfg in cfgs.items():
            tag, cfg = full.partition(".")[2], pcfg.to_dict()
            if cfg.get("num_classes") != 1000 or "in1k" not in tag:
                continue
            res, crop, source = evaluation_setting(cfg)
            row = results.get((f"{arch}.{tag}", res))
            if row is None:
                log.debug("timm/%s.%s has no published result at %d px; left out", arch, tag, res)
                continue
            out.append(Entry(arch, tag, family_of(arch) or arch, tag == default_tag, cfg, res, crop, source, row))
    return out


def head_path(arch: str, cfg: dict[str, Any]) -> str:
    """The module path of the (single) classifier edgetl builds for ``arch``."""
    classifier = cfg["classifier"]
    return classifier[0] if isinstance(classifier, (tuple, list)) else classifier


def resize_size(resolution: int, crop_pct: float) -> int:
    """timm's eval resize: the shorter side to ``floor(resolution / crop_pct)``."""
    return math.floor(resolution / crop_pct)
