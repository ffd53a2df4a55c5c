"""The wheel ships the device profiles, and a plain (non-editable) install finds them."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("edgetl-*.whl")
    return path


def test_wheel_lists_profiles_and_modules(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("edgetl/profile_data/") and n.endswith(".yaml")}
    in_repo = {p.name for p in (ROOT / "profiles").glob("*.yaml")}
    assert shipped == in_repo and len(shipped) >= 10
    for module in ("edgetl/cli/__init__.py", "edgetl/zoo/catalog.py", "edgetl/select.py", "edgetl/__main__.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgetl = edgetl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_plain_install_finds_builtin_profiles(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import edgetl, edgetl.device.profiles as p\n"
        f"assert edgetl.__file__.startswith({str(target)!r}), edgetl.__file__\n"
        "names = [x.name for x in p.list_profiles()]\n"
        "assert 'jetson-orin-nano' in names and len(names) >= 10, names\n"
        "print(p.load_profile('jetson').path)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    assert str(target) in out.stdout


def test_python_dash_m_and_console_script_help():
    out = subprocess.run([sys.executable, "-m", "edgetl", "--help"], capture_output=True, text=True, check=True)
    for command in ("select", "models", "devices"):
        assert command in out.stdout
