"""The suite runs as a hostile terminal would: a narrow terminal (``COLUMNS=40``) and a temporary folder whose
path is 200 characters long, so that no test and no message can depend on the terminal's width or the temp
path's length (a wrapped warning once split a file name). ``--basetemp`` given on the command line is kept."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edgetl.device.machine import fingerprint, read_cpu
from edgetl.device.profiles import load_profile, save_profile, user_profile_dir

HOSTILE_COLUMNS = "40"
HOSTILE_TEMP_CHARS = 200
_long_temp_root: Path | None = None


def pytest_configure(config):
    global _long_temp_root
    os.environ["COLUMNS"] = HOSTILE_COLUMNS
    if config.option.basetemp or hasattr(config, "workerinput"):
        return
    _long_temp_root = Path(tempfile.mkdtemp(prefix="edgetl-tests-"))
    pad = HOSTILE_TEMP_CHARS - len(str(_long_temp_root)) - 1
    long_temp = _long_temp_root / ("long-temp-path-" + "x" * max(pad - 15, 1))[:max(pad, 1)]
    long_temp.mkdir()
    os.environ["TMPDIR"] = str(long_temp)
    tempfile.tempdir = str(long_temp)
    config.option.basetemp = str(long_temp / "pytest")


def pytest_sessionfinish(session, exitstatus):
    if _long_temp_root is not None and exitstatus == 0:
        shutil.rmtree(_long_temp_root, ignore_errors=True)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    has_trt = importlib.util.find_spec("tensorrt") is not None and has_cuda
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    skip_trt = pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("tensorrt") and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session shares one throwaway cache and config folder, never the user's."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(base / "edgetl-cache"))
    monkeypatch.setenv("EDGETL_CONFIG_DIR", str(base / "edgetl-config"))
    monkeypatch.delenv("EDGETL_PROFILE_PATH", raising=False)
    # The CLI turns an unexpected exception into one line; under test it re-raises it (see EdgetlGroup).
    monkeypatch.setenv("EDGETL_DEBUG", "1")


@pytest.fixture
def one_torch_thread():
    """Tiny models at 32 px gain nothing from intra-op threads, and lose a lot when cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def this_box(tmp_path, monkeypatch):
    """A profile of this machine as `device calibrate` stores it (calibrating takes minutes): the generic x86
    figures, this CPU's ISA and the fingerprint that makes it this machine's; in a config folder of this test only."""
    monkeypatch.setenv("EDGETL_CONFIG_DIR", str(tmp_path / "config"))
    cpu = read_cpu()
    base = load_profile("x86-avx2")
    data = base.model_dump(mode="json", exclude_none=True)
    data.update(name="this-box", aliases=[], family="custom",
                cpu={**data["cpu"], "cores": cpu.cores, "threads": max(cpu.cores, 1), "isa": cpu.isa},
                calibrated={"host": "renamed-container", "cpu": cpu.model, "threads": 1,
                            "runtime": "onnxruntime", "fingerprint": fingerprint(cpu)})
    profile = type(base).model_validate(data)
    save_profile(profile, user_profile_dir() / "this-box.yaml")
    return load_profile("this-box")
