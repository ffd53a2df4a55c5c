"""Checkpoints: safetensors weights plus a JSON state, written atomically, read without unpickling.

A run folder holds two checkpoints:

- ``model.safetensors`` + ``checkpoint.json``: the best weights (what ``edgetl export`` loads).
- ``last-<gen>.safetensors`` + ``last-<gen>.optim.safetensors`` + ``last.json``: the state after the
  last finished epoch, for ``--resume``. Optimizer tensors (AdamW's moments and step counts) go into
  the ``.optim`` file; scalars (param-group settings, scheduler, grad-scaler, early-stopping state)
  into ``last.json``.

Each file is written atomically. The resume checkpoint is written as a set: a new generation of the
two tensor files first, then ``last.json`` naming that generation, then the older generations are
removed. A kill at any instant leaves ``last.json`` naming a complete set (the new one or the one
before), so ``--resume`` always has a state to start from. The tensor files also carry a random
``token`` in their safetensors metadata that the JSON file repeats, so files from different saves
are detected instead of silently mixed.

The best checkpoint is a pair committed the same way, and still ends as ``model.safetensors``
(:func:`best_steps`, each step atomic):

1. the new weights are written under a name of their own, ``model.<token>.safetensors`` (staged);
2. ``checkpoint.json`` is replaced by the new state naming the staged file: the commit;
3. the staged file is renamed over ``model.safetensors``;
4. ``checkpoint.json`` is replaced again, naming ``model.safetensors``;
5. staged files left by an earlier kill are removed.

Readers take the file ``checkpoint.json`` names, or ``model.safetensors`` when that is gone
(:attr:`~edgetl.finetune.rundir.RunDir.weights`), and check the token. A kill before step 2 leaves the
previous pair (and a stray staged file); from step 2 on, the new pair: between steps 3 and 4
``checkpoint.json`` names the staged file, which now is ``model.safetensors``. At no instant does
``checkpoint.json`` describe weights other than the ones read with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl._io import atomic_write_bytes, atomic_write_json
from edgetl.errors import CheckpointError
from edgetl.finetune.rundir import FORMAT, VERSION, WEIGHTS_FILE, RunDir, read_state

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(flat, metadata=metadata)


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` as a safetensors file atomically; return its sha256."""
    data = _to_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors on the CPU, metadata).

    Raises:
        CheckpointError: the file is missing or not a valid safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensors, meta


def tensors_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, values), not of its metadata.

    Two trainings that produce the same weights have the same digest, although each checkpoint
    carries its own random token.
    """
    import hashlib

    import torch

    tensors, _ = read_tensors(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- optimizer state -----------------------------------------------------------------------------


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON scalars."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an ``optimizer.state_dict()`` from :func:`split_optimizer_state`'s two halves."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --- whole checkpoints ---------------------------------------------------------------------------


def save_best(run_dir: str | os.PathLike[str], model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the best checkpoint (``model.safetensors`` + ``checkpoint.json``) as a pair; return the weights path."""
    for _ in best_steps(run_dir, model_state, meta):
        pass
    return RunDir(run_dir).weights


def best_steps(run_dir: str | os.PathLike[str], model_state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> Iterator[str]:
    """The steps of :func:`save_best` (see the module's docstring), yielding the name of each one done.

    A caller that stops iterating leaves the folder as a kill after that step would (tests do).
    """
    run = RunDir(run_dir)
    token = secrets.token_hex(8)
    staged, final = run.staged_weights(token), run.path / WEIGHTS_FILE
    digest = write_tensors(staged, model_state, {"format": FORMAT, "token": token})
    yield "weights staged"
    state = {"format": FORMAT, "version": VERSION, **meta, "token": token, "weights_sha256": digest}
    atomic_write_json(run.checkpoint, {**state, "weights_file": staged.name})
    yield "checkpoint.json names the staged weights"
    os.replace(staged, final)
    yield "staged weights renamed to model.safetensors"
    atomic_write_json(run.checkpoint, {**state, "weights_file": final.name})
    yield "checkpoint.json names model.safetensors"
    for stale in run.stale_best_files():
        stale.unlink(missing_ok=True)
    yield "stale staged weights removed"


def update_best_meta(run_dir: str | os.PathLike[str], **fields: Any) -> None:
    """Add or replace fields in ``checkpoint.json`` (e.g. the final test metrics)."""
    path = RunDir(run_dir).checkpoint
    meta = read_state(path)
    meta.update(fields)
    atomic_write_json(path, meta)


def save_last(
    run_dir: str | os.PathLike[str],
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write the resume checkpoint as a set: ``last-<gen>.safetensors``, ``last-<gen>.optim.safetensors``, then
    ``last.json`` naming generation ``gen``; then remove the older generations. Return the weights path."""
    run = RunDir(run_dir)
    previous = run.read_last().get("generation", 0) if run.last.is_file() else 0
    generation = max([int(previous), *run.last_generations()]) + 1  # never overwrite a file on disk
    token = secrets.token_hex(8)
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
    weights, optimizer = run.last_weights_of(generation), run.last_optimizer_of(generation)
    write_tensors(optimizer, opt_tensors, {"format": FORMAT, "token": token})
    write_tensors(weights, model_state, {"format": FORMAT, "token": token})
    atomic_write_json(
        run.last,
        {"format": FORMAT, "version": VERSION, **meta, "optimizer": opt_meta, "token": token,
         "generation": generation, "weights_file": weights.name, "optimizer_file": optimizer.name},
    )
    for stale in run.stale_last_files(keep=generation):
        stale.unlink(missing_ok=True)
    return weights


def _check_token(path: Path, file_meta: dict[str, str], token: str | None) -> None:
    if token is not None and file_meta.get("token") != token:
        raise CheckpointError(
            f"{path} does not belong to the checkpoint described beside it (the run stopped while "
            "saving); start the run over with --restart"
        )


def load_best(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read the best checkpoint: (JSON state, weights). Never unpickles anything."""
    run = RunDir(run_dir)
    meta = run.read_checkpoint()
    path = run.weights_of(meta)
    tensors, file_meta = read_tensors(path)
    _check_token(path, file_meta, meta.get("token"))
    return meta, tensors


def load_last(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read the resume checkpoint: (JSON state, model weights, optimizer state_dict)."""
    run = RunDir(run_dir)
    meta = run.read_last()
    weights_path, optim_path = run.last_weights, run.last_optimizer
    weights, wmeta = read_tensors(weights_path)
    _check_token(weights_path, wmeta, meta.get("token"))
    opt_tensors, ometa = read_tensors(optim_path)
    _check_token(optim_path, ometa, meta.get("token"))
    return meta, weights, join_optimizer_state(opt_tensors, meta["optimizer"])
