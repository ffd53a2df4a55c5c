"""Classify images: the top-K labels with their probabilities, from a model source.

``SOURCE`` is one of three things, told apart by :func:`open_source`:

- an **artifact folder** (``edgetl export``): its files are verified against the manifest, and the model
  runs on the runtime it was built for (TensorRT where the device runs it and it is here, else ONNX
  Runtime on the CPU), fed exactly as ``preprocess.json`` says, with numpy and Pillow only: the path
  firmware mirrors (:mod:`edgetl.data.preprocess`, the preprocessing validate and export measured with);
- a **finetune run folder**: its best weights in PyTorch, with the run's preprocessing and classes;
- a **catalog name** (``timm/tf_efficientnet_lite0``, ``resnet18.IMAGENET1K_V1``) with its ImageNet weights
  (``weights``/``weights_dir`` as in :func:`edgetl.zoo.weights.load_model`) and ImageNet's class names.

Every source decodes its images as training does and prepares them with :func:`edgetl.data.preprocess.prepare`.

Not to be confused with :mod:`edgetl.device.latency`, the latency predictor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.board.jobs import Remote, predict_on_board
from edgetl.data.preprocess import PreprocessSpec, decode, prepare, read_spec
from edgetl.errors import ArtifactError, ConfigError, DataError, UnknownNameError
from edgetl.export import bundle, golden, signing
from edgetl.finetune.rundir import RunDir
from edgetl.options import RemoteOptions, SourceOptions, ValidateOptions, documented, shared_inputs, take_inputs
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner, tensorrt_available

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prediction:
    """The top-K classes of one image, most probable first."""

    image: str
    labels: tuple[str, ...]
    indices: tuple[int, ...]
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str:
        """The top-1 label."""
        return self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the image and its ranked ``{label, index, probability}`` entries."""
        return {
            "image": self.image,
            "top": [
                {"label": lab, "index": i, "probability": round(p, 6)}
                for lab, i, p in zip(self.labels, self.indices, self.probabilities, strict=True)
            ],
        }


@dataclass
class Classifier:
    """What prediction needs from a source: class names, an image transform and a forward pass to logits.

    ``transform`` turns an RGB image into a ``3 x H x W`` float32 array; ``forward`` turns an
    ``N x 3 x H x W`` float32 array into ``N x classes`` logits.
    """

    name: str
    kind: str
    labels: Sequence[str]
    transform: Callable[[Image.Image], np.ndarray]
    forward: Callable[[np.ndarray], np.ndarray]
    runtime: str
    close: Callable[[], None] = lambda: None


def open_source(
    source: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = "imagenet",
    weights_dir: str | os.PathLike[str] | None = None,
    resolution: int | None = None,
    verify_key: str | os.PathLike[str] | None = None,
    check: bool = False,
) -> Classifier:
    """Open an artifact folder, a run folder or a catalog name as a :class:`Classifier`.

    ``resolution`` is a catalog model's input size (default: its own); an artifact or a run keeps its own.
    With ``verify_key`` (a public key, PEM), ``source`` must be an artifact signed with it. With ``check``, an
    artifact's golden inputs are re-run on its runtime first (:func:`edgetl.export.golden.check`).

    Raises:
        ArtifactError: an artifact whose files do not match its manifest, or (with ``verify_key``) whose
            signature is missing or invalid.
        ConfigError: ``verify_key`` or ``check`` with a source that is not an artifact.
        GoldenMismatchError: (with ``check``) the runtime or the preprocessing does not reproduce export's outputs.
        CheckpointError: a folder that is neither an artifact nor a finished run.
        ConfigError: a resolution for an artifact or a run.
        UnknownNameError: ``source`` is not a catalog name.
        DataError: ``source`` looks like a path, and nothing is there.
        WeightsError: the weights are not on this machine.
    """
    path = Path(source).expanduser()
    if path.is_dir() and resolution is not None:
        raise ConfigError(f"{source} keeps the input size it was trained at; drop --resolution")
    if (path / bundle.MANIFEST_FILE).is_file():
        return _artifact_classifier(path, verify_key, check)
    what = "a run folder" if path.is_dir() else "a catalog name"
    if verify_key is not None:
        raise ConfigError(f"--verify-key checks an artifact's signature, and {source} is {what}; drop --verify-key")
    if check:
        raise ConfigError(f"--check re-runs an artifact's golden outputs, and {source} is {what}; drop --check")
    if path.is_dir():
        return _run_classifier(path)
    _require_catalog_name(str(source))
    return _catalog_classifier(str(source), weights, weights_dir, resolution)


def _require_catalog_name(source: str) -> None:
    """Refuse a source that is neither a folder nor a catalog name; a path is said not to exist."""
    from edgetl.zoo.catalog import get_card  # torch-free with a warm catalog

    try:
        get_card(source)
    except UnknownNameError:
        if source.startswith((".", "/", "~")) or ("/" in source and not source.startswith("timm/")):
            raise DataError(f"{source} does not exist; pass an artifact folder, a run folder or a catalog name") \
                from None
        raise


def _artifact_classifier(folder: Path, verify_key: str | os.PathLike[str] | None = None,
                         check: bool = False) -> Classifier:
    manifest, integrity = signing.verify_artifact(folder, verify_key)
    log.info("%s: %s", folder, integrity["summary"])
    labels = bundle.read_labels(folder)
    spec = read_spec(folder / bundle.PREPROCESS_FILE)
    device = manifest.get("device") or {}
    engine = folder / bundle.ENGINE_FILE
    if device.get("runtime") == "tensorrt" and engine.is_file() and tensorrt_available():
        runner, runtime = TensorRTRunner(engine, name="tensorrt"), "tensorrt"
    else:
        runner, runtime = OnnxRuntimeRunner(folder / bundle.MODEL_FILE, providers="cpu", name="onnxruntime"), \
            "onnxruntime"
    runner.activate()
    if check:
        _check_golden(folder, manifest, runner, runtime)

    def forward(x: np.ndarray) -> np.ndarray:
        logits = np.asarray(runner.infer(x)["logits"])
        if logits.ndim != 2 or logits.shape[1] != len(labels):  # else labels[j] is an IndexError or a wrong name
            raise ArtifactError(f"the model in {folder} has {logits.shape[-1]} outputs, {bundle.LABELS_FILE} names "
                                f"{len(labels)} classes; re-export the artifact")
        return logits

    return Classifier(str(folder), "artifact", labels, lambda img: prepare(img, spec), forward, runtime,
                      close=runner.deactivate)


def _check_golden(folder: Path, manifest: dict[str, Any], runner: Any, runtime: str) -> None:
    """Re-run the golden inputs on ``runner`` (active); the runner is closed when they diverge."""
    try:
        result = golden.check(folder, manifest, lambda x: runner.infer(x)["logits"],
                              golden.runtime_precision(manifest, runtime), runtime)
    except BaseException:
        runner.deactivate()
        raise
    if result["status"] != "passed":
        log.warning("%s: %s", folder, result["note"])
    else:
        log.info("%s: golden outputs: %s", folder, golden.summary(result))


def _torch_classifier(name: str, kind: str, labels: Sequence[str], model: Any, preprocess: Any,
                      resolution: int | None = None) -> Classifier:
    import torch  # deferred: an artifact is classified without torch

    spec = PreprocessSpec.from_preprocess(preprocess, resolution)
    model = model.eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return Classifier(name, kind, labels, lambda img: prepare(img, spec), forward, "torch")


def _run_classifier(folder: Path) -> Classifier:
    RunDir(folder).read_checkpoint()  # a folder that is no finished run is refused before torch is imported
    from edgetl.finetune.model import load_trained_model  # deferred: it imports torch

    trained = load_trained_model(folder, device="cpu")
    return _torch_classifier(str(folder), "run", list(trained.classes), trained.network, trained.preprocess,
                             trained.resolution)


def _catalog_classifier(name: str, weights: Any, weights_dir: Any, resolution: int | None = None) -> Classifier:
    from edgetl.zoo.weights import load_model  # deferred: it imports torch

    loaded = load_model(name, weights=weights, weights_dir=weights_dir, resolution=resolution)
    card = loaded.card
    labels = list(card.categories) or [f"class_{i}" for i in range(card.num_classes)]
    if not loaded.pretrained:
        log.warning("%s has random weights: its predictions mean nothing", card.id)
    return _torch_classifier(card.id, "catalog", labels, loaded.model, card.preprocess, resolution)


def _open_image(image: Any) -> tuple[str, Image.Image]:
    return ("<image>" if isinstance(image, Image.Image) else str(image)), decode(image)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classify(classifier: Classifier, images: Sequence[Any], top: int = 5, batch_size: int = 16) -> list[Prediction]:
    """Run ``classifier`` on ``images`` (paths or PIL images) and return each one's top-``top`` classes."""
    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        opened = [_open_image(im) for im in images[start : start + batch_size]]
        logits = classifier.forward(np.stack([classifier.transform(img) for _, img in opened]))
        out += _ranked([name for name, _ in opened], logits, classifier.labels, top)
    return out


def _ranked(names: Sequence[str], logits: np.ndarray, labels: Sequence[str], top: int) -> list[Prediction]:
    """Each image's top-``top`` classes by softmax probability."""
    k = min(top, len(labels))
    probs = _softmax(np.asarray(logits))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [Prediction(name, tuple(labels[j] for j in idx), tuple(int(j) for j in idx),
                       tuple(float(row[j]) for j in idx))
            for name, row, idx in zip(names, probs, order, strict=True)]


def _predict_on_board(remote: Remote, source: str | os.PathLike[str], images: Sequence[Any], top: int,
                      verify_key: Path | None, check: bool) -> list[Prediction]:
    """Run an artifact on ``images`` on the board (:func:`edgetl.board.jobs.predict_on_board`); its files are
    verified here first, and again on the board."""
    folder = Path(source).expanduser()
    if not (folder / bundle.MANIFEST_FILE).is_file():
        raise ConfigError(f"--on runs an artifact folder on the board, and {source} is not one; export it first "
                          "(`edgetl export RUN --out ARTIFACT`)")
    if any(isinstance(im, Image.Image) for im in images):
        raise ConfigError("--on ships image files to the board: pass paths, not images in memory")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]} does not exist; pass image files")
    _, integrity = signing.verify_artifact(folder, verify_key)
    log.info("%s: %s", folder, integrity["summary"])
    labels = bundle.read_labels(folder)
    logits, golden_result = predict_on_board(remote, folder, [Path(p) for p in images], check)
    if golden_result is not None:
        log.info("%s: golden outputs on %s: %s", folder, remote.on, golden.summary(golden_result))
    if np.asarray(logits).shape[-1] != len(labels):
        raise ArtifactError(f"the model in {folder} has {np.asarray(logits).shape[-1]} outputs, "
                            f"{bundle.LABELS_FILE} names {len(labels)} classes; re-export the artifact")
    return _ranked([str(p) for p in images], np.asarray(logits), labels, top)


@documented(None, "predict")
def predict(
    source: str | os.PathLike[str],
    images: Sequence[Any],
    top: int = 5,
    weights: str | os.PathLike[str] | None = "imagenet",
    weights_dir: str | os.PathLike[str] | None = None,
    verify_key: str | os.PathLike[str] | None = None,
    check: bool = False,
    **kwargs: Any,
) -> list[Prediction]:
    """Classify images with a model source and return the top-K labels with probabilities, per image.

    Args:
        source: an artifact folder, a finetune run folder, or a catalog name (``timm/tf_efficientnet_lite0``).
        images: image paths (or PIL images), classified in order.
        top: how many classes to return per image.
        weights: for a catalog name: ``imagenet`` (default), ``none`` or a PATH (see
            :func:`edgetl.zoo.weights.load_model`).
        weights_dir: for a catalog name: the offline weights folder (default ``$EDGETL_WEIGHTS_DIR``).
        verify_key: a public key (PEM): ``source`` must be an artifact signed with it, and unchanged since.
        check: first re-run an artifact's golden inputs on its runtime: the stored images prepared with its
            preprocess.json must give export's inputs, and the outputs export's within the precision's tolerance.
        **kwargs: the other fields of the shared inputs predict takes (:data:`~edgetl.options.STAGE_INPUTS`),
            e.g. ``resolution`` (a catalog model's input size; default: its own), or ``on`` (``ssh://HOST``: run
            an artifact on a board over SSH, its images shipped there) with ``device_python`` and ``runtime``
            (``tensorrt``: an engine built on the board, a Jetson).

    Returns:
        One :class:`Prediction` per image, in the order given.

    Raises:
        EdgetlError: a bad source, missing weights, an unreadable image or a bad ``top``; one line each.
    """
    if not images:
        raise ConfigError("no images given; pass one or more image files")
    _, inputs = take_inputs("predict", {"weights": weights, "weights_dir": weights_dir, **kwargs})
    given = inputs[SourceOptions]
    key = shared_inputs(ValidateOptions, "predict()", verify_key=verify_key).verify_key
    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    remote = Remote.of(inputs[RemoteOptions])
    if remote is not None:
        return _predict_on_board(remote, source, list(images), top, key, check)
    classifier = open_source(source, weights=given.weights, weights_dir=given.weights_dir,
                             resolution=given.resolution, verify_key=key, check=check)
    try:
        return classify(classifier, list(images), top=top)
    finally:
        classifier.close()  # an artifact's runtime session
