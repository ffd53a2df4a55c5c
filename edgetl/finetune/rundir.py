"""The run folder of ``edgetl finetune``: what each file is called and how its JSON files are read.

:class:`RunDir` is the one owner of the layout (torch-free, so export, predict, report and the build
runner use it without importing the training code)::

    config.yaml               the resolved options (what --resume reuses)
    splits.json               the train/val/test files and labels, how the test split was made, the skipped files
    model.safetensors         the best weights (highest validation accuracy)
    checkpoint.json           the best weights' JSON state: model, classes, strategy, preprocess, metrics; it
                              names the weights file (model.safetensors, or the staged file while one is saved)
    model.<token>.safetensors new best weights being saved (staged); only a kill mid-save leaves one behind
    last-<gen>.safetensors    weights after the last finished epoch (for --resume), generation <gen>
    last-<gen>.optim.safetensors  AdamW state after the last finished epoch, generation <gen>
    last.json                 loop, scheduler and optimizer scalars after the last finished epoch; it names
                              the generation of the two files above, and is written after them
    metrics.json              per-epoch metrics; what chose the model (selection: val accuracy, best epoch);
                              test accuracy with its count, 95% Wilson interval and per-class accuracy; confusion
    curves.png, confusion.png the training curves and the confusion matrix

The resume checkpoint is a set. Each save writes a new generation of the tensor files, then replaces
``last.json`` (atomically) to name it, then removes the older generations; so a kill at any instant
leaves ``last.json`` naming a complete set. Runs written before generations (``last.safetensors``,
``last.optim.safetensors``) still resume: ``last.json`` names its files.

The best checkpoint is a pair, committed by ``checkpoint.json`` the same way: :attr:`RunDir.weights` is the
file it names, or ``model.safetensors`` when that file is gone (renamed into place after the commit; the
token the two share says whether they belong together). See :mod:`edgetl.finetune.checkpoint`.

The four names that mark a folder as a run are defined in :mod:`edgetl.folders` (the core layer, which
recognises every kind of edgetl output and may not import this package); the rest are defined here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl._io import read_json, written_name
from edgetl.errors import CheckpointError
from edgetl.folders import RUN_CHECKPOINT_FILE, RUN_CONFIG_FILE, RUN_LAST_FILE, RUN_SPLITS_FILE, folder_kind

FORMAT = "edgetl.checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STAGED_WEIGHTS_FILE = "model.{token}.safetensors"
_STAGED_WEIGHTS = re.compile(r"model\.([0-9a-f]+)\.safetensors")
LAST_WEIGHTS_FILE = "last-{gen:06d}.safetensors"
LAST_OPTIM_FILE = "last-{gen:06d}.optim.safetensors"
_LAST_SET_FILE = re.compile(r"last-(\d+)(\.optim)?\.safetensors")
# The resume files of runs written before generations: read, never written.
LEGACY_LAST_FILES = ("last.safetensors", "last.optim.safetensors")
FEATURE_CACHE_DIR = ".feature_cache"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint's JSON state (``checkpoint.json`` or ``last.json``); nothing is unpickled.

    Raises:
        CheckpointError: the file is missing, not JSON, or not an edgetl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; is {path.parent} an edgetl run folder?")
    meta = read_json(path, CheckpointError, "re-run `edgetl finetune` (or --restart)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgetl checkpoint (no format: {FORMAT})")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} was written by a newer edgetl (checkpoint version {meta['version']})")
    return meta


@dataclass(frozen=True)
class RunDir:
    """A fine-tuning run folder: the path of each of its files, and readers for its JSON files.

    Attributes:
        path: the run folder (the ``--out`` of ``edgetl finetune``); a str is turned into a Path.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved options."""
        return self.path / RUN_CONFIG_FILE

    @property
    def splits(self) -> Path:
        """``splits.json``: the train/val/test records, class names and skipped files."""
        return self.path / RUN_SPLITS_FILE

    @property
    def weights(self) -> Path:
        """The best weights: the file ``checkpoint.json`` names if it is there, else ``model.safetensors``.

        Both are the same file but for the instants of a save (see :mod:`edgetl.finetune.checkpoint`): the
        new weights are staged under :meth:`staged_weights`, ``checkpoint.json`` is replaced to name them,
        then they are renamed to ``model.safetensors`` and ``checkpoint.json`` is replaced again.
        """
        try:
            state = self.read_checkpoint()
        except CheckpointError:
            state = {}
        return self.weights_of(state)

    def weights_of(self, state: dict[str, Any]) -> Path:
        """The best weights a ``checkpoint.json`` state names, or ``model.safetensors`` when that file is gone."""
        named = self.path / Path(str(state.get("weights_file") or WEIGHTS_FILE)).name
        return named if named.is_file() else self.path / WEIGHTS_FILE

    def staged_weights(self, token: str) -> Path:
        """``model.<token>.safetensors``: new best weights, written before ``checkpoint.json`` names them."""
        return self.path / STAGED_WEIGHTS_FILE.format(token=token)

    def stale_best_files(self) -> list[Path]:
        """Staged best weights that ``checkpoint.json`` does not name (and their temporaries): a kill's leftovers."""
        current = self.weights
        found = sorted(self.path.iterdir()) if self.path.is_dir() else []
        return [p for p in found if p != current and p.is_file() and not p.is_symlink()
                and _STAGED_WEIGHTS.fullmatch(written_name(p.name))]

    @property
    def checkpoint(self) -> Path:
        """``checkpoint.json``: the best weights' JSON state."""
        return self.path / RUN_CHECKPOINT_FILE

    @property
    def last_weights(self) -> Path:
        """The weights after the last finished epoch: the file ``last.json`` names."""
        return self._named_by_last("weights_file", 0)

    @property
    def last_optimizer(self) -> Path:
        """The optimizer tensors after the last finished epoch: the file ``last.json`` names."""
        return self._named_by_last("optimizer_file", 1)

    def _named_by_last(self, key: str, legacy: int) -> Path:
        try:
            name = self.read_last().get(key)
        except CheckpointError:
            name = None
        return self.path / Path(str(name or LEGACY_LAST_FILES[legacy])).name

    def last_weights_of(self, generation: int) -> Path:
        """``last-<gen>.safetensors``: the weights of one generation of the resume checkpoint."""
        return self.path / LAST_WEIGHTS_FILE.format(gen=generation)

    def last_optimizer_of(self, generation: int) -> Path:
        """``last-<gen>.optim.safetensors``: the optimizer tensors of one generation of the resume checkpoint."""
        return self.path / LAST_OPTIM_FILE.format(gen=generation)

    def last_generations(self) -> set[int]:
        """The generations of resume tensor files on disk (complete or not)."""
        if not self.path.is_dir():
            return set()
        found = (_LAST_SET_FILE.fullmatch(p.name) for p in self.path.iterdir())
        return {int(m.group(1)) for m in found if m}

    def stale_last_files(self, keep: int) -> list[Path]:
        """Resume tensor files of every generation but ``keep``, and those of a run from before generations."""
        stale = [self.path / name for name in LEGACY_LAST_FILES]
        for gen in self.last_generations() - {keep}:
            stale += [self.last_weights_of(gen), self.last_optimizer_of(gen)]
        return [p for p in stale if p.is_file()]

    @property
    def feature_cache(self) -> Path:
        """``.feature_cache/``: backbone features spilled to disk by the linear probe."""
        return self.path / FEATURE_CACHE_DIR

    @property
    def last(self) -> Path:
        """``last.json``: the resume state after the last finished epoch."""
        return self.path / RUN_LAST_FILE

    @property
    def metrics(self) -> Path:
        """``metrics.json``: per-epoch and final metrics."""
        return self.path / METRICS_FILE

    @property
    def curves(self) -> Path:
        """``curves.png``: the training curves."""
        return self.path / CURVES_FILE

    @property
    def confusion(self) -> Path:
        """``confusion.png``: the confusion matrix."""
        return self.path / CONFUSION_FILE

    def outputs(self) -> list[Path]:
        """The files a finished run leaves: best weights, their state, metrics and splits.

        A build's finetune stage is up to date only while all of them are unchanged.
        """
        return [self.weights, self.checkpoint, self.metrics, self.splits]

    def is_run(self) -> bool:
        """Whether the folder looks like a run: ``config.yaml`` with splits or a checkpoint state."""
        return folder_kind(self.path) == "run"

    def can_resume(self) -> bool:
        """Whether an epoch has finished, so ``--resume`` has a state to start from."""
        return self.last.is_file()

    def clear(self) -> list[Path]:
        """Remove every file a run writes here (for ``--restart``); other files and the folder stay.

        Returns:
            The paths removed.
        """
        fixed = {p.name for p in (self.config, self.splits, self.checkpoint, self.last, self.metrics, self.curves,
                                  self.confusion)} | {WEIGHTS_FILE, *LEGACY_LAST_FILES}
        removed = []
        for path in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            name = written_name(path.name)
            if path.is_file() and not path.is_symlink() and (
                    name in fixed or _LAST_SET_FILE.fullmatch(name) or _STAGED_WEIGHTS.fullmatch(name)):
                path.unlink()
                removed.append(path)
        if self.feature_cache.is_dir() and not self.feature_cache.is_symlink():
            shutil.rmtree(self.feature_cache)
            removed.append(self.feature_cache)
        return removed

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint state (best or last) exists, i.e. a run was started here."""
        return self.last.exists() or self.checkpoint.exists()

    def read_checkpoint(self) -> dict[str, Any]:
        """The best weights' JSON state (``checkpoint.json``).

        Raises:
            CheckpointError: it is missing, not JSON, or not an edgetl checkpoint (the message names it).
        """
        return read_state(self.checkpoint)

    def read_last(self) -> dict[str, Any]:
        """The resume state (``last.json``).

        Raises:
            CheckpointError: it is missing, not JSON, or not an edgetl checkpoint (the message names it).
        """
        return read_state(self.last)

    def read_splits(self) -> dict[str, Any]:
        """The run's ``splits.json``: ``classes``, ``source``, ``test_split`` (how the test split was made),
        ``train``/``val``/``test`` records, ``skipped``.

        Raises:
            CheckpointError: the file is missing or not valid JSON (the message names it).
        """
        try:
            return json.loads(self.splits.read_text())
        except OSError as exc:
            raise CheckpointError(
                f"{self.splits} is missing: the run folder is incomplete; re-run `edgetl finetune`"
            ) from exc
        except ValueError as exc:
            raise CheckpointError(f"{self.splits} is not valid JSON ({exc}); re-run `edgetl finetune`") from exc
