"""Pretrained weights: find them, load them safely, and pull them for air-gapped machines.

``--weights`` takes ``imagenet`` (the catalog entry's pretrained weights), ``none`` (random init)
or a PATH to a state_dict file (``.pth``/``.pt`` or ``.safetensors``).

Where ImageNet weights come from, in order:

1. ``weights_dir`` (the ``--weights-dir`` option) or ``$EDGETL_WEIGHTS_DIR``: one folder for both zoos; else
   edgetl's own weights folder, ``<cache>/weights`` (``$EDGETL_CACHE_DIR/weights``, by default
   ``~/.cache/edgetl/weights``), where ``edgetl weights import`` writes by default.

   - torchvision: files named like the basenames of torchvision's URLs (``resnet18-f37072fd.pth``);
   - timm: ``timm/<arch>.<tag>.safetensors``, the state_dict timm's pretrained model has
     (``timm/tf_efficientnet_lite0.in1k.safetensors``), as ``edgetl weights pull`` and
     ``edgetl weights import`` write it.

   When such a folder is set, loading is offline: nothing is downloaded. edgetl never writes an imported
   file into another library's cache (torch hub's, Hugging Face's), whose files other programs trust.
2. torchvision's own cache, ``torch.hub.get_dir()/checkpoints`` (``~/.cache/torch/hub/checkpoints``), same layout.
3. A download into that cache, unless a weights folder is set or ``$EDGETL_OFFLINE=1``: torchvision's
   (``torch.hub.download_url_to_file`` with the sha256 prefix check), or timm's own loading
   (``timm.create_model(name, pretrained=True)`` from the Hugging Face hub), saved as safetensors.

The file is then read by torchvision's real loader, ``Weights.get_state_dict`` (``torch.hub``'s
``load_state_dict_from_url``, ``check_hash=True``), always with ``weights_only=True``: loading weights
never unpickles arbitrary objects.

How a file is verified:

- Downloads are checked against the sha256 prefix in torchvision's file name (as torchvision does).
- A file that is already in the torch hub cache is trusted, as torchvision trusts it.
- A file placed by hand in the weights folder is hashed and compared with that prefix. A match is
  logged as verified. On a mismatch the policy ``$EDGETL_VERIFY_WEIGHTS`` decides: ``warn`` (the
  default) logs a warning and uses the file, because it was read with ``weights_only=True`` and must
  still match the architecture key for key and shape for shape; ``strict`` refuses it; ``off`` skips
  hashing. ``strict`` also hashes files from the torch hub cache.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from edgetl._io import atomic_path, cache_dir, sha256_file
from edgetl.errors import WeightsError
from edgetl.zoo.catalog import ModelCard, arch_kwargs, get_card

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "EDGETL_WEIGHTS_DIR"
OFFLINE_ENV = "EDGETL_OFFLINE"
VERIFY_ENV = "EDGETL_VERIFY_WEIGHTS"
VERIFY_POLICIES = ("warn", "strict", "off")

# torch.hub's HASH_REGEX: the sha256 prefix torchvision puts in its file names.
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class LoadedModel:
    """A 1000-class (or randomly initialised) network and where its weights came from.

    Attributes:
        model: the network in eval mode, with the catalog's original head.
        card: the catalog entry.
        weights: ``imagenet``, ``none`` or the PATH given.
        pretrained: whether the weights are pretrained (domain measurement needs the ImageNet head).
        arch_kwargs: the keyword arguments the builder (torchvision's or timm's) was called with, from
            :func:`~edgetl.zoo.catalog.arch_kwargs`; rebuilding the architecture for a checkpoint needs the same ones.
        file: the weights file that was read, if any.
        sha256: that file's sha256, when it was hashed.
        verified: how the file was checked (``sha256-prefix``, ``torch-hub-cache``, ``architecture``, ...).
        imagenet_head: whether the head holds trained ImageNet weights (False for a weights file with
            another class count, whose head is left out and stays random).
    """

    model: torch.nn.Module
    card: ModelCard
    weights: str
    pretrained: bool
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None
    sha256: str | None = None
    verified: str = ""
    imagenet_head: bool | None = None

    def __post_init__(self) -> None:
        if self.imagenet_head is None:
            object.__setattr__(self, "imagenet_head", self.pretrained)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description of the weights, for checkpoints and reports."""
        return {
            "weights": self.weights,
            "pretrained": self.pretrained,
            "file": str(self.file) if self.file else None,
            "sha256": self.sha256,
            "verified": self.verified,
        }


def weights_file_name(card: ModelCard) -> str:
    """The file name ``card``'s weights are stored under, relative to a weights folder.

    torchvision: the basename of its URL (``resnet18-f37072fd.pth``); timm: ``timm/<arch>.<tag>.safetensors``.
    """
    if card.zoo == "timm":
        return f"{card.id}.safetensors"
    if not card.url:
        raise WeightsError(f"{card.id} has no download URL in torchvision's metadata; use --weights PATH")
    return os.path.basename(urlparse(card.url).path)


def expected_hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix in a torchvision weights file name (``resnet18-f37072fd.pth`` -> ``f37072fd``)."""
    match = _HASH_REGEX.search(file_name)
    return match.group(1) if match and match.group(1) else None


def hub_checkpoints_dir() -> Path:
    """torchvision's weights cache: ``torch.hub.get_dir()/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights_dir(weights_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The offline weights folder: ``weights_dir`` if given, else ``$EDGETL_WEIGHTS_DIR``, else None."""
    value = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else None


def own_weights_dir() -> Path | None:
    """edgetl's own weights folder, ``<cache>/weights`` (:func:`edgetl._io.cache_dir`); None if it cannot be made."""
    try:
        return cache_dir("weights")
    except OSError:
        return None


def foreign_caches() -> list[tuple[str, Path]]:
    """Other libraries' caches, which edgetl never writes into: torch hub's folder and Hugging Face's cache."""
    import torch.hub

    found = [("torch hub's cache", Path(torch.hub.get_dir()))]
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    found.append(("Hugging Face's cache", Path(hf_home)))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            found.append(("Hugging Face's cache", Path(os.environ[var])))
    return [(what, path.expanduser().resolve()) for what, path in found]


def refuse_foreign_cache(folder: Path) -> None:
    """Refuse to write into ``folder`` when it is (inside) another library's cache.

    Raises:
        WeightsError: one line naming the folder, the cache it is in, and the fix.
    """
    resolved = folder.expanduser().resolve()
    for what, cache in foreign_caches():
        if resolved.is_relative_to(cache):
            raise WeightsError(
                f"{folder} is inside {what} ({cache}), whose files other programs trust; edgetl does not write "
                f"there: leave out --dir (edgetl's own weights folder) or pass another folder"
            )


def _verify_policy() -> str:
    policy = os.environ.get(VERIFY_ENV, "warn").strip().lower() or "warn"
    if policy not in VERIFY_POLICIES:
        raise WeightsError(f"${VERIFY_ENV}={policy!r} is not one of {', '.join(VERIFY_POLICIES)}")
    return policy


def find_weights_file(card: ModelCard, weights_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the local file holding ``card``'s ImageNet weights, or None if none is on this machine."""
    name = weights_file_name(card)
    folders = [d for d in (resolve_weights_dir(weights_dir), own_weights_dir(), hub_checkpoints_dir()) if d is not None]
    for folder in folders:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _missing_message(card: ModelCard, weights_dir: Path | None) -> str:
    name = weights_file_name(card)
    looked = ", ".join(str(d) for d in (weights_dir, hub_checkpoints_dir()) if d is not None)
    return (
        f"no pretrained weights for {card.id} on this machine ({name} is not in {looked}); "
        f"on a connected machine run `edgetl weights pull {card.id}` and copy {name} into "
        f"~/.cache/torch/hub/checkpoints or ${WEIGHTS_DIR_ENV}, or map a state_dict you have onto it with "
        f"`edgetl weights import FILE --model {card.id}`, or pass --weights PATH, "
        "or --weights none to train from scratch"
    )


def _download(card: ModelCard, folder: Path, progress: bool) -> Path:
    import torch.hub

    if card.zoo == "timm":
        return _download_timm(card, folder)
    name = weights_file_name(card)
    dst = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", card.url, dst)
    try:
        with atomic_path(dst) as tmp:
            # download_url_to_file checks the sha256 prefix and removes a file that does not match.
            torch.hub.download_url_to_file(card.url, str(tmp), expected_hash_prefix(name), progress=progress)
    except RuntimeError as exc:
        raise WeightsError(f"downloaded weights for {card.id} are corrupt: {exc}") from exc
    except OSError as exc:
        raise WeightsError(f"cannot download weights for {card.id} ({exc}); {_missing_message(card, None)}") from exc
    return dst


def _download_timm(card: ModelCard, folder: Path) -> Path:
    """Load ``card``'s weights with timm's own loading (Hugging Face hub) and save them as safetensors."""
    from safetensors.torch import save_file

    from edgetl.zoo import timm as zoo_timm

    dst = folder / weights_file_name(card)
    hub_id = card.id.removeprefix(zoo_timm.PREFIX)
    log.info("loading timm's pretrained %s to save it as %s", hub_id, dst)
    import timm  # deferred: importing timm takes seconds

    try:
        with zoo_timm.quiet_warnings():
            model = timm.create_model(hub_id, pretrained=True)
    except Exception as exc:  # no network, no such file on the hub: say so in one line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot download timm's weights for {card.id} ({reason}); "
                           f"{_missing_message(card, None)}") from exc
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"source": f"hf-hub:timm/{hub_id}", "format": "timm state_dict"})
    return dst


def pull_weights(name: str, dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Download a catalog model's ImageNet weights, for copying to an air-gapped machine.

    torchvision's file keeps torchvision's name and is checked against the sha256 prefix in that name.
    timm's is loaded by timm and saved as ``timm/<arch>.<tag>.safetensors``. A file that is already
    there (and matches its prefix) is not downloaded again.

    Args:
        name: a catalog name or id (``resnet18``, ``resnet50.IMAGENET1K_V2``, ``timm/repvit_m1.dist_in1k``).
        dir: the destination folder; default ``$EDGETL_WEIGHTS_DIR`` or torchvision's hub cache.
        progress: show a download progress bar on stderr.

    Returns:
        The path of the weights file.

    Raises:
        WeightsError: the download failed or the file does not match its hash.
    """
    card = get_card(name)
    folder = Path(dir).expanduser() if dir is not None else resolve_weights_dir() or hub_checkpoints_dir()
    dst = folder / weights_file_name(card)
    prefix = expected_hash_prefix(dst.name)
    if dst.is_file() and (prefix is None or sha256_file(dst).startswith(prefix)):
        log.info("%s is already in %s", weights_file_name(card), folder)
        return dst
    if _offline_env():
        raise WeightsError(
            f"{OFFLINE_ENV} is set, so {weights_file_name(card)} is not downloaded; pull it on a connected machine "
            f"and copy it "
            f"into {folder}"
        )
    return _download(card, folder, progress)


def _offline_env() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _check_file(card: ModelCard, path: Path, from_weights_dir: bool) -> tuple[str | None, str]:
    """Apply the verification policy to a local weights file; return (sha256, how it was verified)."""
    policy = _verify_policy()
    if policy == "off" or (not from_weights_dir and policy != "strict"):
        return None, "torch-hub-cache" if not from_weights_dir else "architecture"
    digest = sha256_file(path)
    prefix = expected_hash_prefix(path.name)
    if prefix is None or digest.startswith(prefix):
        return digest, "sha256-prefix" if prefix else "architecture"
    if policy == "strict":
        raise WeightsError(
            f"{path} does not match the sha256 prefix {prefix} of torchvision's {card.id} weights "
            f"(sha256 {digest[:12]}...); pull it again with `edgetl weights pull {card.id}`, "
            f"or set {VERIFY_ENV}=warn to accept a file that matches the architecture"
        )
    log.warning(
        "%s does not match the sha256 prefix %s of torchvision's file; using it because it loads as "
        "plain tensors that match the architecture (set %s=strict to refuse such files)",
        path, prefix, VERIFY_ENV,
    )
    return digest, "architecture (sha256 prefix mismatch)"


def build_network(card: ModelCard, arch_kwargs: dict[str, Any], num_classes: int | None = None) -> torch.nn.Module:
    """Build ``card``'s architecture with random weights and the given builder arguments, in eval mode."""
    from edgetl.zoo.catalog import build_architecture

    kwargs = dict(arch_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return build_architecture(card.id, **kwargs)
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise WeightsError(f"cannot build {card.name} with {kwargs}: {exc}") from exc


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file, without unpickling arbitrary objects.

    Raises:
        WeightsError: the file is missing, unreadable or not a flat dict of tensors.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass a .pth/.pt/.safetensors state_dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse error means the file is not usable weights
        raise WeightsError(f"cannot read weights from {path}: {_load_failure(exc)}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a flat mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_failure(exc: Exception) -> str:
    """Why torch.load failed, in one line, without torch's advice to retry with ``weights_only=False``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reason = next((ln for ln in lines[1:] if "weights_only" not in ln and "documentation" not in ln), "")
        return (f"it holds pickled objects other than tensors ({reason.rstrip('.') or 'refused'}), which can run "
                "code, so edgetl will not load it; save a plain state_dict, e.g. "
                "torch.save(model.state_dict(), PATH), or a .safetensors file")
    return lines[0] if lines else type(exc).__name__


def _fix_keys(card: ModelCard, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a torchvision state_dict to edgetl's build of it (:func:`~edgetl.zoo.catalog.arch_kwargs`)."""
    fixed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key.startswith(("AuxLogits.", "aux1.", "aux2.")) and not getattr(model, "aux_logits", True):
            continue
        fixed[key] = value
    pos = fixed.get("encoder.pos_embedding")
    own = getattr(getattr(model, "encoder", None), "pos_embedding", None)
    if pos is not None and own is not None and pos.shape != own.shape:
        from collections import OrderedDict

        from torchvision.models.vision_transformer import interpolate_embeddings

        fixed = dict(interpolate_embeddings(model.image_size, model.patch_size, OrderedDict(fixed)))
    return fixed


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, card: ModelCard,
               allow_head_mismatch: bool) -> bool:
    """Load ``state`` into ``model`` strictly; return whether the head was left out (another class count)."""
    own = model.state_dict()
    head_prefix = card.head_path + "."
    head_dropped = False
    if allow_head_mismatch:
        for key in [k for k in state if k.startswith(head_prefix)]:
            if key in own and own[key].shape != state[key].shape:
                log.info("ignoring %s from %s: its head has a different number of classes", key, source)
                state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
                head_dropped = True
                break
    missing = [k for k in own if k not in state and not (allow_head_mismatch and k.startswith(head_prefix))]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise WeightsError(
            f"{source} does not match the {card.name} architecture: {'; '.join(parts)}; "
            f"pass weights saved from {card.name}, or --weights none"
        )
    model.load_state_dict(state, strict=False)
    return head_dropped


def load_model(
    name: str | ModelCard,
    weights: str | os.PathLike[str] | None = "imagenet",
    weights_dir: str | os.PathLike[str] | None = None,
    resolution: int | None = None,
    progress: bool = False,
) -> LoadedModel:
    """Build a catalog model with its ImageNet head and the requested weights, in eval mode.

    Args:
        name: a catalog name or id, or a :class:`ModelCard`.
        weights: ``imagenet``, ``none`` (or None), or a PATH to a state_dict file.
        weights_dir: an offline weights folder, laid out as the module docstring says (default
            ``$EDGETL_WEIGHTS_DIR``).
        resolution: the training resolution, default the card's: it sizes the architectures whose shape depends
            on it (ViT, MaxViT, EfficientFormer-v2); others ignore it.
        progress: show a progress bar if weights have to be downloaded.

    Returns:
        The network and a record of where its weights came from.

    Raises:
        WeightsError: the weights are not on this machine (and cannot or may not be downloaded),
            are corrupt, or do not match the architecture. The message says how to get them.
    """
    card = name if isinstance(name, ModelCard) else get_card(name)
    spec = "none" if weights is None else str(weights)
    kind = spec.lower() if spec.lower() in ("imagenet", "none", "pretrained", "default") else "path"
    pretrained = kind != "none"
    kwargs = arch_kwargs(card.id, resolution or card.resolution, pretrained=pretrained)
    model = build_network(card, kwargs)
    if kind == "none":
        return LoadedModel(model, card, "none", False, kwargs, verified="random init")

    if kind == "path":
        path = Path(spec).expanduser()
        state = _fix_keys(card, load_state_dict_file(path), model)
        head_dropped = _load_into(model, state, str(path), card, allow_head_mismatch=True)
        return LoadedModel(model.eval(), card, str(path), True, kwargs, path, None, "architecture",
                           imagenet_head=not head_dropped)

    wdir = resolve_weights_dir(weights_dir)
    offline = wdir is not None or _offline_env()
    path = find_weights_file(card, wdir)
    if path is None:
        if offline:
            raise WeightsError(_missing_message(card, wdir))
        path = _download(card, hub_checkpoints_dir(), progress)
    own = own_weights_dir()
    from_weights_dir = any(d is not None and path.resolve().is_relative_to(d.resolve()) for d in (wdir, own))
    digest, how = _check_file(card, path, from_weights_dir)
    _load_into(model, _read_pretrained(card, path, model), str(path), card, allow_head_mismatch=False)
    log.info("loaded %s weights from %s (%s)", card.id, path, how)
    return LoadedModel(model.eval(), card, "imagenet", True, kwargs, path, digest, how)


def model_from_state(card: ModelCard, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Build ``card``'s pretrained network from a state_dict in the layout of its weights file, in eval mode.

    This is what :func:`load_model` does after reading the file, for a state_dict already in memory
    (``edgetl weights import`` checks its result this way before writing it).

    Raises:
        WeightsError: the state_dict does not match the architecture.
    """
    model = build_network(card, arch_kwargs(card.id, card.resolution, pretrained=True))
    if card.zoo == "timm":
        from edgetl.zoo import timm as zoo_timm

        state = zoo_timm.adapt_state_dict(zoo_timm.split_name(card.name)[0], state)
    else:
        state = _fix_keys(card, state, model)
    _load_into(model, state, source, card, allow_head_mismatch=False)
    return model.eval()


def _read_pretrained(card: ModelCard, path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read ``card``'s pretrained weights file into a state_dict in the layout of edgetl's build of it."""
    if card.zoo == "timm":
        from edgetl.zoo import timm as zoo_timm

        state = load_state_dict_file(path)
        return zoo_timm.adapt_state_dict(zoo_timm.split_name(card.name)[0], state)
    from torchvision import models

    enum = models.get_model_weights(card.name)[card.weights]
    try:
        # The file exists, so torch.hub reads it and downloads nothing.
        state = enum.get_state_dict(
            model_dir=str(path.parent), file_name=path.name, map_location="cpu",
            progress=False, check_hash=True, weights_only=True,
        )
    except Exception as exc:  # a truncated or foreign file: say which and how to replace it
        raise WeightsError(
            f"cannot read {path} ({str(exc).splitlines()[0][:200]}); delete it and run "
            f"`edgetl weights pull {card.id}`"
        ) from exc
    return _fix_keys(card, state, model)
