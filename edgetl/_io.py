"""Small file helpers shared by every stage: atomic writes, hashing, the cache folder and strict YAML reading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError, EdgetlError

CACHE_ENV = "EDGETL_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """Return (and create) edgetl's cache folder: ``$EDGETL_CACHE_DIR`` or ``~/.cache/edgetl``.

    An unwritable cache (the variable naming a file, a read-only or forbidden folder) falls back to a
    folder under the system's temporary folder, with one warning naming ``EDGETL_CACHE_DIR``.

    Raises:
        EdgetlError: neither the cache nor a temporary cache can be written; says how to set the variable.
    """
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetl"
    try:
        return _writable_dir(base.joinpath(*parts))
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"edgetl-cache-{_uid()}"
        try:
            path = _writable_dir(fallback.joinpath(*parts))
        except OSError:
            raise EdgetlError(
                f"{base}: the cache folder cannot be written ({exc.strerror or exc}), nor a temporary one under "
                f"{fallback.parent}; set {CACHE_ENV} to a writable folder") from None
        _warn_cache_once(base, fallback, exc)
        return path


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


_writable: set[Path] = set()


def _writable_dir(path: Path) -> Path:
    """Create ``path`` and check it takes a file (``os.access`` is not enough: root passes it everywhere)."""
    if path in _writable and path.is_dir():
        return path
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
    os.close(fd)
    os.unlink(probe)
    _writable.add(path)
    return path


_cache_warned: set[str] = set()


def _warn_cache_once(base: Path, fallback: Path, exc: OSError) -> None:
    if str(base) in _cache_warned:
        return
    _cache_warned.add(str(base))
    import logging

    logging.getLogger("edgetl").warning(
        "cache folder %s is not writable (%s); using the temporary cache %s instead (set %s to a writable "
        "folder to keep the cache)", base, exc.strerror or exc, fallback, CACHE_ENV)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was, so an
    interrupted write never leaves a file that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (POSIX); where a folder cannot be opened (Windows), nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def written_name(name: str) -> str:
    """The file an :func:`atomic_path` write was writing, for its temporary (``.NAME.RANDOM.tmp``: a write killed
    midway); any other name is returned as it is."""
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        return name[1:].rsplit(".", 2)[0]
    return name


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


#: The largest JSON file edgetl reads back (manifests, labels, specs are kilobytes).
MAX_JSON_BYTES = 64 << 20
#: The longest class name: a label is a name, not a document.
MAX_LABEL_CHARS = 256


def read_json(path: str | os.PathLike[str], error: type[EdgetlError] = ConfigError, hint: str = "fix the file") -> Any:
    """Read a UTF-8 JSON file strictly: at most :data:`MAX_JSON_BYTES`, nested no deeper than Python can parse.

    Args:
        path: the file.
        error: the error class raised.
        hint: how to get a good file (``"re-export the artifact"``).

    Raises:
        error: one line naming the file: unreadable, too large, not UTF-8, not JSON, or nested too deeply.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB, too large for a JSON file edgetl wrote; "
                        f"{hint}")
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a JSON file edgetl wrote; {hint}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text; {hint}") from None
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc}); {hint}") from None


def label_problem(label: object) -> str | None:
    """What is wrong with a class name (``None`` when it is fine): not a string, empty, longer than
    :data:`MAX_LABEL_CHARS`, or holding a control character (a NUL, a newline) that would break every line
    it is printed on."""
    if not isinstance(label, str):
        return f"a class name must be text, got {type(label).__name__}"
    if not label.strip():
        return "a class name is empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"a class name of {len(label)} characters (at most {MAX_LABEL_CHARS})"
    bad = next((c for c in label if c < " " or "\x7f" <= c <= "\x9f"), None)
    if bad is not None:
        return f"the class name {label[:40]!r} holds the control character {bad!r}"
    return None


_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _yaml11_word_key(node: Any) -> bool:
    """A mapping key written as a bare ``on``/``off``/``yes``/``no``, which YAML 1.1 reads as a boolean."""
    return (getattr(node, "tag", "") == "tag:yaml.org,2002:bool" and not getattr(node, "style", None)
            and str(getattr(node, "value", "")).lower() in _YAML11_WORDS)


@lru_cache(maxsize=1)
def _strict_loader() -> type:
    """A safe YAML loader that refuses a key given twice in one mapping instead of keeping the last silently, and
    reads a key written ``on``, ``off``, ``yes`` or ``no`` as that word (``validate: {on: ssh://pi}``), as YAML 1.2
    does; values keep YAML 1.1's booleans."""
    import yaml  # deferred: only the readers of YAML files need it

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if _yaml11_word_key(key_node):
                key_node.tag = "tag:yaml.org,2002:str"  # `on:` is the key "on" (YAML 1.2), not True
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def parse_yaml(text: str, source: str, error: type[EdgetlError] = ConfigError) -> Any:
    """Parse YAML ``text`` strictly (safe types only, no key twice in a mapping).

    Raises:
        error: one line, ``source:LINE:COLUMN: invalid YAML: what; how to fix it``.
    """
    import yaml  # deferred: only the readers of YAML files need it

    try:
        return yaml.load(text, Loader=_strict_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        if exc.problem and exc.context and exc.context_mark is not None:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        fix = "remove one of them" if problem.startswith("duplicate key") else "fix the syntax there"
        raise error(f"{source}{where}: invalid YAML: {problem}; {fix}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None


def load_yaml(path: str | os.PathLike[str], what: str, expected: str, hint: str,
              error: type[EdgetlError] = ConfigError) -> dict[str, Any]:
    """Read a UTF-8 YAML file whose top level is a mapping, strictly (see :func:`parse_yaml`).

    Args:
        path: the file.
        what: the file's kind, for messages (``"the profile"``).
        expected: the mapping it should hold, for messages (``"a mapping of profile fields (name:, ...)"``).
        hint: how to get a good file when the top level is not a mapping.
        error: the error class raised.

    Raises:
        error: one line naming the file (and line and column for a syntax error or a duplicate key) and the fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file; save it as UTF-8 YAML") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror}); check the path") from None
    data = parse_yaml(text, str(path), error)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise error(f"{path}: expected {expected}, got {got}; {hint}")
    return data
