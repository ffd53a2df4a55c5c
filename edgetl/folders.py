"""Folders edgetl writes: whose they are, who is writing them, and what a killed run left behind.

One rule decides whether edgetl may write into, or replace, an existing folder
(:func:`require_ours`): the folder is missing or empty, or it has the layout edgetl itself writes
for that kind of output (:func:`folder_kind`):

- ``artifact``: ``manifest.json`` of format ``edgetl.artifact`` (``edgetl export``);
- ``run``: ``config.yaml`` with ``splits.json`` or a checkpoint (``edgetl finetune``);
- ``build``: ``.edgetl-build.json`` (``edgetl build``);
- ``demo``: ``pipeline.yaml`` beside ``data/`` (``edgetl demo``).

Anything else holds the user's files, and a command that would overwrite or delete them refuses.

:func:`folder_lock` holds an exclusive lock on a folder (``finetune --out``, ``build``'s ``out:``)
so that a second writer fails at once instead of mixing two outputs. :func:`staging_prefix` names
hidden staging folders with the writer's pid, so :func:`clean_stale_staging` can remove those whose
writer is dead (killed with SIGKILL) without touching a live one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgetl._io import written_name
from edgetl.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".edgetl.lock"
BUILD_STATE_FILE = ".edgetl-build.json"
BUILD_LOCK_FILE = ".edgetl-build.lock"
ARTIFACT_FORMAT = "edgetl.artifact"
# The files that mark a fine-tuning run; edgetl.finetune.rundir.RunDir owns the rest of the run's layout.
RUN_CONFIG_FILE = "config.yaml"
RUN_SPLITS_FILE = "splits.json"
RUN_CHECKPOINT_FILE = "checkpoint.json"
RUN_LAST_FILE = "last.json"
RUN_SPLITS_FORMAT = "edgetl.splits"
"""``splits.json``'s mark: a run writes it first, so a folder holding it alone is a run killed as it started."""
_RUN_MARKS = (RUN_SPLITS_FILE, RUN_CHECKPOINT_FILE, RUN_LAST_FILE)
# Files edgetl may leave in a folder before its layout is complete (locks, atomic-write temporaries).
_OWN_HIDDEN = (LOCK_FILE, BUILD_LOCK_FILE, BUILD_STATE_FILE)

KINDS = ("artifact", "run", "build", "demo")


def folder_kind(folder: str | os.PathLike[str]) -> str | None:
    """Which edgetl output ``folder`` is (``artifact``, ``run``, ``build``, ``demo``), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if _is_artifact(folder / "manifest.json"):
        return "artifact"
    if ((folder / RUN_CONFIG_FILE).is_file() and any((folder / m).is_file() for m in _RUN_MARKS)) \
            or _has_format(folder / RUN_SPLITS_FILE, RUN_SPLITS_FORMAT):
        return "run"
    if (folder / BUILD_STATE_FILE).is_file():
        return "build"
    if (folder / "pipeline.yaml").is_file() and (folder / "data").is_dir():
        return "demo"
    return None


def _is_artifact(manifest: Path) -> bool:
    return _has_format(manifest, ARTIFACT_FORMAT)


def _has_format(path: Path, name: str) -> bool:
    """Whether ``path`` is a JSON object whose ``format`` is ``name`` (edgetl's mark on the files it writes)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == name


def is_empty(folder: Path) -> bool:
    """True for a folder that holds nothing but edgetl's own lock and state files, and the temporaries of atomic
    writes that a kill interrupted (``.NAME.RANDOM.tmp``)."""
    return all(p.name in _OWN_HIDDEN or written_name(p.name) != p.name for p in folder.iterdir())


def require_ours(folder: str | os.PathLike[str], kinds: Iterable[str], flag: str, what: str) -> Path:
    """Refuse a ``folder`` that exists and is neither empty nor an edgetl output of one of ``kinds``.

    Args:
        folder: the folder a command is about to write into or replace.
        kinds: the layouts the command may overwrite (see :func:`folder_kind`).
        flag: how the user named the folder (``--out``, ``out:``), for the message.
        what: what the command writes (``an artifact``), for the message.

    Returns:
        ``folder`` as a Path.

    Raises:
        ConfigError: ``folder`` is a file, or a folder of files edgetl did not write.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; choose a folder for {what}")
    if not folder.is_dir() or is_empty(folder):
        return folder
    kind = folder_kind(folder)
    if kind not in tuple(kinds):
        found = f"an edgetl {kind} folder" if kind else "files that edgetl did not write"
        raise ConfigError(
            f"{flag} {folder} already holds {found}; edgetl writes {what} only into a new or empty folder "
            f"(or one it wrote before), so choose another folder"
        )
    return folder


def check_apart(out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None], flag: str) -> None:
    """Refuse an ``out`` that is, holds, or lies inside one of the ``inputs`` (name -> path).

    Writing there would replace the inputs, or feed the outputs back in as inputs on the next run.
    """
    target = Path(out).expanduser().resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        if src == target or target in src.parents or src in target.parents:
            raise ConfigError(
                f"{flag} {out} overlaps {what} ({path}): one lies inside the other, so the outputs would "
                "replace the inputs or be read back as inputs; choose an output folder outside it"
            )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str, lock_name: str = LOCK_FILE) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) while the block runs.

    A folder the lock created and nothing else wrote into is removed again at the end.

    Raises:
        ConfigError: another process holds the lock (``another edgetl finetune is writing runs/a``).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / lock_name, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"another edgetl {what} is writing {folder}; wait for it to finish, or choose another folder"
            ) from None
        try:
            yield
        finally:
            if created and is_empty(folder):  # nothing was written: leave no empty folder behind
                with contextlib.suppress(OSError):
                    (folder / lock_name).unlink()
                    folder.rmdir()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def staging_prefix(out: Path, kind: str = "tmp") -> str:
    """The name prefix of a hidden staging folder for ``out``: ``.NAME.tmp-PID-``."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove the hidden staging folders beside ``out`` whose writing process no longer runs.

    Folders of the older name form (``.NAME.tmp-XXXX``, no pid) are removed too: no live edgetl
    writes that form. Returns the folders removed.
    """
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid_text = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        log.warning("removed %d folder(s) left by an interrupted edgetl run beside %s", len(removed), out)
    return removed
