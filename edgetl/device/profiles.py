"""Device profiles on disk: one YAML file per device, read, validated (:mod:`edgetl.device.schema`), found and
written.

Profiles are looked up by name or alias in these folders, a later folder replacing an earlier
profile of the same name:

1. the built-in profiles shipped with edgetl;
2. :func:`user_profile_dir` (``$EDGETL_CONFIG_DIR/profiles`` or ``~/.config/edgetl/profiles``), where
   ``edgetl device calibrate`` saves;
3. the folders of ``$EDGETL_PROFILE_PATH`` (``os.pathsep``-separated; like ``PATH``, its first entry
   wins). The CLI's ``--profiles DIR`` prepends to it.

Parsed profiles are cached per search path and file state, so repeated look-ups cost a few ``stat``
calls. This module never imports torch.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgetl._io import atomic_write_text, load_yaml, parse_yaml

# DeviceProfile is re-exported: `from edgetl.device.profiles import DeviceProfile` is the public spelling
from edgetl.device.schema import DeviceProfile
from edgetl.errors import ProfileError, UnknownNameError
from edgetl.options import format_errors

log = logging.getLogger(__name__)

PROFILE_PATH_ENV = "EDGETL_PROFILE_PATH"
CONFIG_DIR_ENV = "EDGETL_CONFIG_DIR"

# The wheel ships profiles/*.yaml as this package; a source checkout has them in <repo>/profiles.
_DATA_PACKAGE = "edgetl.profile_data"

# --- YAML reading and writing -------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Dumper that writes figures, references and short lists in flow style, like the built-in files."""


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class _Flow(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping(_MAP_TAG, v, flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence(_SEQ_TAG, v, flow_style=True))


def _for_yaml(obj: Any, key: str = "") -> Any:
    """Mark leaf mappings and scalar lists for flow style; write integral floats as ints."""
    if isinstance(obj, dict):
        out = {k: _for_yaml(v, k) for k, v in obj.items()}
        leaf = all(not isinstance(v, dict) for v in obj.values())
        if leaf and key not in ("efficiency", "sources", "calibrated", "kernels", ""):
            # a figure reads best as {value: ..., source: ...}: provenance last
            last = {k: out.pop(k) for k in ("source", "derived") if k in out}
            return _Flow({**out, **last})
        return out
    if isinstance(obj, list):
        items = [_for_yaml(v, key) for v in obj]
        return _FlowList(items) if all(not isinstance(v, (dict, list)) for v in obj) else items
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 1e15:
        return int(obj)
    return obj


def profile_yaml(profile: DeviceProfile) -> str:
    """Render ``profile`` as YAML in the layout of the built-in files; it loads back unchanged."""
    data = profile.model_dump(mode="json", exclude_none=True)
    return yaml.dump(
        _for_yaml(data),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100_000,
        default_flow_style=False,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    return load_yaml(path, "the profile", "a mapping of profile fields (name:, family:, runtime:, ...)",
                     "start from a built-in profile (see `edgetl devices`)", error=ProfileError)


def _validate(data: dict[str, Any], path: Path) -> DeviceProfile:
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(format_errors(exc, DeviceProfile, str(path))) from None
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: name: '{profile.name}' does not match the file name; "
            f"set `name: {path.stem}` or rename the file to {profile.name}{path.suffix}"
        )
    profile._path = path
    return profile


def read_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """Parse and validate one profile file (no search path, no cache).

    Raises:
        ProfileError: a one-line message naming the file, the field and the fix.
    """
    path = Path(path).expanduser()
    return _validate(_read_yaml(path), path)


# --- Search path and registry -------------------------------------------------------------------


def builtin_profile_dir() -> Path:
    """The folder of the profiles shipped with edgetl."""
    # A source checkout's own profiles/ first: an editable install's finder may point edgetl.profile_data at
    # another checkout (a git worktree run with PYTHONPATH), and the code and its profiles must match.
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if (checkout / "__init__.py").is_file() and (Path(__file__).resolve().parents[2] / "pyproject.toml").is_file():
        return checkout
    try:
        spec = importlib.util.find_spec(_DATA_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        root = importlib.resources.files(_DATA_PACKAGE)
        if isinstance(root, Path):
            return root
    return Path(__file__).resolve().parents[2] / "profiles"


def user_profile_dir() -> Path:
    """The user's profile folder: ``$EDGETL_CONFIG_DIR/profiles`` or ``~/.config/edgetl/profiles``."""
    root = os.environ.get(CONFIG_DIR_ENV)
    if root:
        return Path(root).expanduser() / "profiles"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "edgetl" / "profiles"


def profile_search_path() -> list[Path]:
    """The profile folders, lowest priority first: a later folder's profile replaces an earlier one.

    Order: built-in, :func:`user_profile_dir`, then ``$EDGETL_PROFILE_PATH`` (whose first entry wins,
    as in ``PATH``, so it comes last here).
    """
    entries = os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep)
    extra = [Path(p).expanduser() for p in entries if p.strip()]
    return [builtin_profile_dir(), user_profile_dir(), *reversed(extra)]


_Snapshot = tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]


def _snapshot(folders: list[Path]) -> _Snapshot:
    """The YAML files of each folder with their mtime and size: the cache key of the registry."""
    out = []
    for folder in folders:
        files: list[tuple[str, int, int]] = []
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.endswith(".yaml") and not entry.name.startswith(".") and entry.is_file():
                    st = entry.stat()
                    files.append((entry.name, st.st_mtime_ns, st.st_size))
        out.append((str(folder), tuple(sorted(files))))
    return tuple(out)


@dataclass(frozen=True)
class _Registry:
    profiles: dict[str, DeviceProfile]
    aliases: dict[str, str]
    broken: dict[str, str]
    """File stem -> the error of a profile file that could not be read (skipped with a warning)."""


@lru_cache(maxsize=16)
def _registry(snapshot: _Snapshot) -> _Registry:
    profiles: dict[str, DeviceProfile] = {}
    broken: dict[str, str] = {}
    builtin, user = str(builtin_profile_dir()), str(user_profile_dir())
    for folder, files in snapshot:
        if not Path(folder).is_dir():
            if folder == builtin:
                log.warning("the built-in device profiles are missing (%s); reinstall edgetl", folder)
            elif folder != user:
                log.warning("profile folder %s does not exist (%s, --profiles)", folder, PROFILE_PATH_ENV)
            continue
        for name, _, _ in files:
            try:
                profile = read_profile_file(Path(folder) / name)
            except ProfileError as exc:  # one broken file must not make every device unusable
                log.warning("skipping device profile %s", exc)
                broken[Path(name).stem.lower()] = str(exc)
                continue
            if profile.name in profiles:
                previous = profiles[profile.name].path
                log.debug("profile %s: %s overrides %s", profile.name, profile.path, previous)
            profiles[profile.name] = profile
    aliases: dict[str, str] = {}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        for alias in profile.aliases:
            other = aliases.get(alias) or (alias if alias in profiles else None)
            if other is not None:
                raise ProfileError(
                    f"alias '{alias}' of {profile.path} is already used by {profiles[other].path}; "
                    f"remove it from one of the two files"
                )
            aliases[alias] = profile.name
    log.debug("loaded %d device profiles from %d folders", len(profiles), len(snapshot))
    return _Registry(profiles, aliases, broken)


def _current() -> _Registry:
    return _registry(_snapshot(profile_search_path()))


def _copy(profile: DeviceProfile) -> DeviceProfile:
    # Callers may tune a profile (fitting efficiencies); never let that leak into the cache.
    return copy.deepcopy(profile)


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a device profile by name (``jetson-orin-nano``), alias (``jetson``, ``rpi``, ``x86``) or path.

    Raises:
        UnknownNameError: no profile has that name or alias (the message suggests close names).
        ProfileError: a profile file is malformed (the message names the file and the field).
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(
                f"{path}: no such profile file; check the path, or give a device name (see `edgetl devices`)"
            )
        return read_profile_file(path)
    registry = _current()
    key = text.strip().lower()
    if key in registry.broken:  # the user's file of that name is broken: do not fall back to another one
        raise ProfileError(registry.broken[key])
    name = key if key in registry.profiles else registry.aliases.get(key)
    if name is None:
        choices = sorted([*registry.profiles, *registry.aliases])
        raise UnknownNameError("device", text, choices, hint="see `edgetl devices`")
    return _copy(registry.profiles[name])


def family_device() -> str:
    """The built-in profile closest to this machine's CPU family (x86-64: x86-avx2; Arm: raspberry-pi-5)."""
    machine = platform.machine().lower()
    return "raspberry-pi-5" if machine in ("aarch64", "arm64", "armv8l") else "x86-avx2"


def default_device() -> str:
    """The device every stage targets when none is named, one rule for export, select and validate: this
    machine's calibrated profile when there is one (``edgetl device calibrate``), where a budget is judged
    on a measurement, else :func:`family_device`."""
    mine = [p.name for p in list_profiles() if p.is_this_machine()]
    return mine[0] if mine else family_device()


def threads_for(profile: DeviceProfile, requested: int | None) -> int | None:
    """The threads to run with: ``requested`` if given, else, on the machine ``profile`` was calibrated on, the
    threads it was calibrated with (a measurement then matches the profile's); else None (the runtime's default).
    """
    if requested is None and profile.is_this_machine():
        threads = (profile.calibrated or {}).get("threads")
        return None if threads is None else int(threads)
    return requested


def list_profiles() -> list[DeviceProfile]:
    """All profiles on the search path (later folders replacing earlier ones), sorted by name."""
    registry = _current()
    return [_copy(registry.profiles[n]) for n in sorted(registry.profiles)]


def profile_names(include_aliases: bool = True) -> list[str]:
    """The names (and aliases) that :func:`load_profile` accepts, sorted."""
    registry = _current()
    names = [*registry.profiles, *(registry.aliases if include_aliases else ())]
    return sorted(names)


def profile_path(name: str, path: str | os.PathLike[str]) -> Path:
    """The file a profile named ``name`` is saved to: ``path`` itself (a ``.yaml`` file named after the profile),
    or ``<path>/<name>.yaml`` for a folder. Cheap: callers check it before measuring anything.

    Raises:
        ProfileError: the file name is not the profile name.
    """
    path = Path(path).expanduser()
    if path.is_dir() or not path.suffix:
        path = path / f"{name}.yaml"
    if path.stem != name:
        raise ProfileError(f"{path}: the file name must be the profile name; save it as "
                           f"{path.with_name(name + '.yaml')}")
    return path


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as YAML atomically and return the file path.

    ``path`` is a ``.yaml`` file whose stem is the profile's name, or a folder (the file is then
    ``<folder>/<name>.yaml``). The text is parsed back and compared before anything is written.

    Raises:
        ProfileError: the file name does not match the profile name, or the profile does not round-trip.
    """
    path = profile_path(profile.name, path)
    text = profile_yaml(profile)
    try:
        again = _validate(parse_yaml(text, str(path), ProfileError), path)
    except ProfileError as exc:
        raise ProfileError(f"profile {profile.name} does not survive a YAML round trip: {exc}") from None
    if again.model_dump() != profile.model_dump():
        raise ProfileError(f"profile {profile.name} changes in a YAML round trip; this is an edgetl bug")
    atomic_write_text(path, text)
    log.debug("saved profile %s to %s", profile.name, path)
    return path
