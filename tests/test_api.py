"""The public API: every stage is reachable from ``import edgetl``, lazily, and stays a function."""

import subprocess
import sys

import edgetl

STAGES = ("select", "finetune", "export", "validate", "build")


def test_stage_functions_are_public():
    for name in (*STAGES, "load_profile", "list_profiles", "list_models"):
        assert name in edgetl.__all__
        assert callable(getattr(edgetl, name)), name
    assert issubclass(edgetl.BudgetExceededError, edgetl.EdgetlError)
    assert edgetl.BudgetExceededError.exit_code == 3


def test_importing_a_stage_submodule_keeps_the_function():
    code = (
        "import sys, edgetl, edgetl.export.onnx, edgetl.finetune.strategy, edgetl.validate, edgetl.pipeline\n"
        "assert all(callable(getattr(edgetl, n)) and not isinstance(getattr(edgetl, n), type(sys))"
        f" for n in {STAGES!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_edgetl_does_not_import_torch():
    code = "import sys, edgetl\nedgetl.build; edgetl.validate\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)
