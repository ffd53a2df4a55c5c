"""The one latency-budget rule: export and validate judge the same artifact alike, on the target or elsewhere."""

import platform
from pathlib import Path

import pytest

from edgetl.data import make_demo_dataset
from edgetl.device import budget
from edgetl.device.profiles import (
    default_device,
    family_device,
    load_profile,
    threads_for,
)
from edgetl.errors import ConfigError
from edgetl.export.api import SPEED_MARGIN, export
from edgetl.runtime.bench import BenchResult
from edgetl.select import select
from edgetl.validate import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_calibrated_threads_apply_on_that_machine_only(this_box):
    assert threads_for(this_box, None) == 1  # this machine: time as it was calibrated
    assert threads_for(this_box, 3) == 3  # an explicit request wins
    assert threads_for(load_profile("x86-avx2"), None) is None  # another device: the runtime's default


def _verdicts(tmp_path, device, max_latency_ms):
    art = export("resnet18", tmp_path / device, precision="fp32", weights="none", resolution=32, rounds=3,
                 simplify=False, device=device, max_latency_ms=max_latency_ms, check=False)
    rep = validate(art.path, iterations=5, warmup=1, max_latency_ms=max_latency_ms, check=False, write=False)
    return art, rep


def test_this_machine_is_judged_on_its_measurement_by_export_and_validate(tmp_path, this_box):
    profile = this_box
    assert profile.is_this_machine()  # by fingerprint, though the stored host name is another one
    for limit, passed in ((1e-4, False), (1e4, True)):
        art, rep = _verdicts(tmp_path / str(limit), "this-box", limit)
        for lat in (art.latency, rep.latency):
            assert lat["basis"] == "measured on target" and lat["on_target"] is True
            assert lat["judged_on"].startswith("p50 measured on this-box") and lat["pass"] is passed
        assert art.passed is passed and rep.passed is passed and rep.this_machine
        assert art.manifest["selection"]["ranked_on"].startswith("min and p25 latency measured on this-box")


@pytest.mark.parametrize("device", ["raspberry-pi-5", "jetson-orin-nano"])
def test_a_remote_device_is_judged_on_its_prediction_by_export_and_validate(tmp_path, device):
    predicted = budget.predicted_ms("resnet18", 32, load_profile(device), "fp32")
    limit = predicted / 2  # the case: half the device's prediction
    art, rep = _verdicts(tmp_path, device, limit)
    for lat in (art.latency, rep.latency):
        assert lat["basis"] == "predicted" and lat["on_target"] is False and lat["pass"] is False
        assert lat["judged_ms"] == pytest.approx(predicted, rel=1e-3) and "for information only" in lat["note"]
    assert not art.passed and not rep.passed
    assert art.failures[0] == rep.failures[0]  # the same sentence: same figure, same basis, same budget


def test_a_measurement_with_another_runtime_is_not_on_the_target(this_box):
    profile = this_box
    stats = {"p50_ms": 1.0, "min_ms": 0.9}
    assert budget.judge_latency(profile, "onnxruntime", stats, 5.0, 2.0)["pass"] is True
    other = budget.judge_latency(profile, "tensorrt", stats, 5.0, 2.0)
    assert other["basis"] == "predicted" and other["pass"] is False
    nothing = budget.judge_latency(load_profile("raspberry-pi-5"), "onnxruntime", stats, None, 0.5)
    assert nothing["basis"] == "measured here" and nothing["pass"] is False
    assert "no latency prediction" in nothing["note"]


def test_percentiles_are_reported_only_where_the_runs_support_them():
    stats = budget.latency_stats(BenchResult.from_times([0.001 * (1 + i % 7) for i in range(60)]))
    assert {"p25_ms", "p50_ms", "p90_ms"} <= stats.keys() and "p99_ms" not in stats
    assert "p99" in stats["omitted"] and stats["runs"] == 60
    assert "p99_ms" in budget.latency_stats(BenchResult.from_times([0.001] * 100))
    with pytest.raises(ConfigError, match="p99 budget needs at least 100 timed runs"):
        budget.check_metric("p99", 60)


def test_the_readme_states_the_speed_margin_the_code_applies():
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    rule = f"at least {100 * SPEED_MARGIN:.0f}% faster to be chosen, on both the minimum and the 25th percentile"
    assert rule in text


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("calib") / "demo", num_classes=2, train_per_class=4,
                             val_per_class=0, size=32) / "train"


@pytest.mark.parametrize(("device", "shipped"), [("x86-avx2", "fp32"), ("raspberry-pi-5", "int8")])
def test_auto_on_a_host_that_is_not_the_target_ranks_on_the_targets_prediction(tmp_path, calib_images, device,
                                                                              shipped):
    art = export("resnet18", tmp_path / "art", precision="auto", weights="none", resolution=32, rounds=3,
                 simplify=False, device=device, calibration={"data": calib_images}, max_accuracy_drop=100)
    selection = art.manifest["selection"]
    assert selection["ranked_on"].startswith(f"latency predicted for {device} (this machine is not it)")
    by = {c["precision"]: c for c in art.candidates}
    assert set(by) == {"fp32", "int8"} and by["int8"]["latency"]["min_ms"] > 0  # timed here, for information
    # AVX2 without VNNI: INT8 gains nothing, whatever this host's INT8 kernels do; Pi 5: SDOT makes it 4x
    assert art.precision == shipped


def test_one_default_device_for_every_stage(this_box, monkeypatch, tmp_path):
    assert default_device() == "this-box"  # a calibrated profile of this machine: budgets are measured
    monkeypatch.setenv("EDGETL_CONFIG_DIR", str(tmp_path / "empty"))
    assert default_device() == family_device() == ("raspberry-pi-5" if platform.machine() in ("aarch64", "arm64")
                                                    else "x86-avx2")
    assert select(models="resnet18").profile.name == family_device()  # select() and export share the rule
