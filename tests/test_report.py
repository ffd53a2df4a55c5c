"""``report.md``: what the build report says is what the stages measured, from the files they wrote."""

from __future__ import annotations

import json

import pytest

from edgetl.export.api import export
from edgetl.pipeline import config_from_dict
from edgetl.report import write_report
from edgetl.validate import MEASURED_FRESH, validate


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A build folder holding a real artifact (resnet18, random weights, 32 px, FP32) and its validation."""
    out = tmp_path_factory.mktemp("report") / "build"
    export("resnet18", out / "artifact", precision="fp32", weights="none", resolution=32, rounds=2, simplify=False)
    validate(out / "artifact", iterations=3, warmup=0, check=False)
    return out


def test_the_memory_row_is_what_validate_measured_and_says_how(build_dir):
    config = config_from_dict({"device": "x86", "data": str(build_dir)})
    report = write_report(build_dir, config, [], []).read_text()
    memory = json.loads((build_dir / "artifact" / "validation.json").read_text())["memory"]
    row = (f"| memory: {MEASURED_FRESH} | {memory['runtime_mb']} MB vs budget {memory['budget_mb']:g} MB: pass "
           f"(model file {memory['model_file_mb']:.1f} MB) |")
    assert row in report, report
    assert memory["runtime_mb"] >= memory["model_file_mb"]
