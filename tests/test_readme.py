"""Every command in README.md runs, in order, in one folder, so the README cannot rot.

Each ```bash block runs as one ``bash -euo pipefail`` script and each ```python block as one Python
program, in the order they appear and in the same working folder (later commands use the files of
earlier ones). Rules:

- A line ending in ``# needs: ...`` (network, gpu, tensorrt, several minutes) is not run; the README
  says so next to it.
- A line ending in ``# exits N`` must exit with code N.
- The two commands at the top are the README's contract with CI and users and must stay exactly as
  they are. The test command (``python -m pytest -q``) is what is running this test, so it is not run
  again. The main-job command is run with the cheap substitutions in :data:`QUICKSTART_SUBSTITUTIONS`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

QUICKSTART = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && edgetl select --device jetson '
    "&& edgetl demo"
)
TEST_COMMAND = "python -m pytest -q"
QUICKSTART_SUBSTITUTIONS = (
    # CI has already created the environment and installed the project into it.
    ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && ', ""),
    # Tracing all 115 catalog models from a cold cache costs a minute of CPU; a few take the same path.
    ("edgetl select --device jetson ", "edgetl select --device jetson --filter 'mobilenet_v3*' "),
    # The demo's 8 epochs on 192 images become 1 epoch on 24: the same pipeline, in seconds.
    ("edgetl demo", "edgetl demo --epochs 1 --train-per-class 6"),
)
_NEEDS = re.compile(r"#\s*needs:")
_EXITS = re.compile(r"#\s*exits\s+(\d+)")


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """The ```bash and ```python blocks of a markdown text, as (language, code), in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def logical_lines(code: str) -> list[str]:
    """Lines with backslash continuations joined."""
    lines, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def bash_script(code: str) -> str:
    """A README bash block as a script: ``# needs:`` lines dropped, ``# exits N`` lines checked."""
    out = []
    for line in logical_lines(code):
        if _NEEDS.search(line):
            continue
        expected = _EXITS.search(line)
        if expected:
            command = line[: expected.start()].strip()
            out.append(f"set +e; {command}; rc=$?; set -e")
            out.append(f'[ "$rc" -eq {expected.group(1)} ] || {{ echo "expected exit {expected.group(1)}, '
                       f'got $rc: {command}" >&2; exit 1; }}')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def test_top_commands_are_unchanged():
    blocks = readme_blocks(README.read_text())
    lang, first = blocks[0]
    commands = [line for line in first.splitlines() if line.strip() and not line.startswith("#")]
    assert lang == "bash" and commands == [QUICKSTART, TEST_COMMAND]


def test_marks_are_explained():
    text = README.read_text()
    assert "end in `# needs: …`" in text
    for _lang, code in readme_blocks(text):
        for line in logical_lines(code):
            if _NEEDS.search(line):
                assert re.search(r"#\s*needs:\s*(network|gpu|tensorrt|several minutes|the calibration|a board)",
                                 line), line


def _env(tmp: Path) -> dict[str, str]:
    """This Python's folder first on PATH (python, torchrun, edgetl), edgetl importable, a shim for the
    `edgetl` console script when the project is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if shutil.which("edgetl", path=path) is None:
        bin_dir = tmp / ".bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "edgetl"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edgetl "$@"\n')
        shim.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{path}"
    env["PATH"] = path
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tools").symlink_to(ROOT / "tools")  # the README's tools/ commands run from a checkout
    env = _env(tmp_path)
    blocks = readme_blocks(README.read_text())
    ran = 0
    for index, (lang, code) in enumerate(blocks):
        if index == 0:
            for old, new in QUICKSTART_SUBSTITUTIONS:
                assert old in code, old
                code = code.replace(old, new)
            code = "\n".join(line for line in code.splitlines() if line.strip() != TEST_COMMAND)
        script = ["bash", "-euo", "pipefail", "-c", bash_script(code)]
        cmd = script if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README block {index} ({lang}):\n{code}\n--- stderr:\n{proc.stderr[-4000:]}"
        ran += 1
    assert ran >= 10
    # what the tutorial promises exists
    assert (work / "edgetl-demo" / "build" / "report.md").is_file()
    assert (work / "artifacts" / "lite0" / "model_data.h").is_file()
    assert (work / "weights" / "timm" / "tf_efficientnet_lite0.in1k.safetensors").is_file()
    assert json.loads((work / "predictions.json").read_text())[0]["top"][0]["label"] in ("checker", "dots", "rings",
                                                                                          "stripes")
    # the demo transferred: the pretrained run and its from-scratch baseline are both in the report
    report = (work / "edgetl-demo" / "build" / "report.md").read_text()
    assert "Transfer against training from scratch" in report and "timm/tf_efficientnet_lite0" in report
    assert (work / "firmware" / "include" / "model_data.h").is_file()
    assert (work / "pareto.png").is_file() and (work / "ranking.csv").is_file()
    # after the demo nothing changed, so `--rerun validate` reruns validate alone, as the README says
    statuses = {s["stage"]: s["status"] for s in json.loads((work / "build.json").read_text())["stages"]}
    assert statuses == {"select": "skipped", "finetune": "skipped", "export": "skipped", "validate": "ran"}
