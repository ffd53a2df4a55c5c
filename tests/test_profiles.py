"""Device profiles: schema, provenance of every figure, search path, errors, CLI listing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.device.profiles import (
    DeviceProfile,
    builtin_profile_dir,
    list_profiles,
    load_profile,
    profile_search_path,
    save_profile,
    user_profile_dir,
)
from edgetl.errors import ProfileError, UnknownNameError

REQUIRED = {
    "jetson-nano",
    "jetson-xavier-nx",
    "jetson-agx-xavier",
    "jetson-orin-nano",
    "jetson-orin-nano-super",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "x86-avx2",
    "x86-avx512-vnni",
}
URL = re.compile(r"^https?://")


@pytest.fixture(autouse=True)
def _isolated_profile_path(tmp_path, monkeypatch):
    """No test sees the user's own profile folders."""
    monkeypatch.setenv("EDGETL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("EDGETL_PROFILE_PATH", raising=False)


def builtin_text(name: str) -> str:
    return (builtin_profile_dir() / f"{name}.yaml").read_text()


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_every_builtin_profile_loads():
    profiles = list_profiles()
    names = [p.name for p in profiles]
    assert set(names) >= REQUIRED
    assert names == sorted(names)
    for p in profiles:
        assert p.path is not None and p.path.stem == p.name and p.path.parent == builtin_profile_dir()
        assert set(p.compute) == set(p.precisions)
        for prec in p.precisions:
            assert p.peak_gflops(prec) > 0
        assert p.memory.model_budget_mb.value <= p.memory.ram_mb.value


def test_figures_in_the_builtin_files_match_devices_md():
    orin = load_profile("jetson-orin-nano")
    assert orin.memory.bandwidth_gbs.value == 68
    assert orin.peak_gflops("int8") == 20000  # 40 TOPS sparse / 2
    assert orin.peak_gflops("fp32") == pytest.approx(1024 * 0.625 * 2)
    assert load_profile("jetson-nano").peak_gflops("fp16") == 472
    assert load_profile("jetson-agx-orin-64gb").peak_gflops("int8") == 171_000 / 2
    x86 = load_profile("x86-avx2")
    assert x86.peak_gflops("int8") == x86.peak_gflops("fp32")  # no VNNI: no int8 advantage
    vnni = load_profile("x86-avx512-vnni")
    assert vnni.peak_gflops("int8") == 4 * vnni.peak_gflops("fp32")
    assert vnni.has_isa("AVX512-VNNI") and not x86.has_isa("avx512_vnni") and x86.has_isa("avx2")


@pytest.mark.parametrize(
    ("device", "model", "precision", "latency_ms", "metric"),
    [
        ("jetson-nano", "resnet18", "fp16", 11.4, "mean"),
        ("jetson-agx-xavier", "resnet18", "fp16", 1.64, "mean"),
        ("jetson-agx-xavier", "resnet50", "fp16", 3.37, "mean"),
        ("jetson-agx-orin-64gb", "resnet50", "int8", 0.640, "p90"),
        ("jetson-orin-nx-16gb", "resnet50", "int8", 1.08, "p90"),
        ("raspberry-pi-4", "resnet18", "fp32", 100.3, "mean"),
        ("raspberry-pi-5", "resnet18", "int8", 8.75, "p50"),
    ],
)
def test_reference_measurements_from_devices_md(device, model, precision, latency_ms, metric):
    profile = load_profile(device)
    hits = [
        r for r in profile.reference
        if r.model == model and r.precision == precision and r.latency_ms == latency_ms
    ]
    assert len(hits) == 1, profile.reference
    ref = hits[0]
    assert (ref.batch, ref.resolution, ref.metric) == (1, 224, metric)
    assert ref.source in profile.sources


def test_every_figure_has_exactly_one_provenance_and_known_sources():
    for p in list_profiles():
        raw = yaml.safe_load(p.path.read_text())
        figures = [raw["kernel_overhead_us"], raw["efficiency"], *raw["compute"].values(),
                   *raw["memory"].values(), *raw.get("reference", [])]
        if raw.get("cpu"):
            figures.append(raw["cpu"])
        for fig in figures:
            assert ("source" in fig) != ("derived" in fig), (p.name, fig)
            src = fig.get("source")
            if src is not None:
                assert src in raw["sources"] or URL.match(src), (p.name, src)
            else:
                assert len(fig["derived"]) > 10, (p.name, fig)


def test_aliases_resolve():
    assert load_profile("jetson").name == "jetson-orin-nano"
    assert load_profile("rpi").name == "raspberry-pi-5"
    assert load_profile("raspberry-pi").name == "raspberry-pi-5"
    assert load_profile("x86").name == "x86-avx2"
    assert load_profile("  Jetson-Nano ").name == "jetson-nano"


def test_unknown_device_suggests_close_names():
    with pytest.raises(UnknownNameError) as err:
        load_profile("jetsn")
    message = str(err.value)
    assert "jetson" in err.value.suggestions
    assert "did you mean" in message and "edgetl devices" in message and "\n" not in message


def test_jetson_nano_rejects_int8_and_lists_supported():
    nano = load_profile("jetson-nano")
    with pytest.raises(ProfileError, match=r"^jetson-nano does not support int8; supported: fp32, fp16$"):
        nano.check_precision("int8")
    with pytest.raises(ProfileError, match="unknown precision 'bf16'"):
        nano.check_precision("bf16")
    assert nano.check_precision("FP16") == "fp16"
    assert not nano.supports("int8")


def test_broken_yaml_in_profile_path_names_file_and_field(tmp_path, monkeypatch):
    text = builtin_text("jetson-orin-nano").replace("  bandwidth_gbs: {value: 68, source: jetson-modules}\n", "")
    path = write(tmp_path / "extra", "jetson-orin-nano", text)
    monkeypatch.setenv("EDGETL_PROFILE_PATH", str(tmp_path / "extra"))
    assert load_profile("x86").name == "x86-avx2"  # one broken file does not make every device unusable
    with pytest.raises(ProfileError) as err:
        load_profile("jetson-orin-nano")  # but asking for it names the file and the field
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: memory.bandwidth_gbs: field required; add `bandwidth_gbs: {{value:")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = builtin_text("x86-avx2").replace("runtime: onnxruntime", "runtime: [onnxruntime")
    path = write(tmp_path, "x86-avx2", text)
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    line = 1 + text.splitlines().index("runtime: [onnxruntime")
    message = str(err.value)
    assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: invalid YAML: ", message)
    assert f"flow sequence at line {line}" in message and "\n" not in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("bandwidth_gbs:", "bandwith_gbs:", "memory.bandwith_gbs: unknown key; did you mean 'bandwidth_gbs'?"),
        ("runtime: onnxruntime", "runtime: onnxruntime\nturbo: true", "turbo: unknown key"),
        ("{value: 51.2, derived:", "{value: 51.2, colour: red, derived:", "memory.bandwidth_gbs.colour: unknown key"),
        ("  conv: 0.5\n", "  conv: 0.5\n  conv3d: 0.5\n", "efficiency.conv3d: unknown key"),
        ("{value: 384, derived:", "{value: 384, source: ort-quantization, derived:", "compute.fp32: give exactly one"),
        (
            '{value: 16384, derived: "generic: 16 GB assumed"}',
            "{value: 16384, source: ort-quantisation}",
            "memory.ram_mb.source: unknown source id 'ort-quantisation'; did you mean 'ort-quantization'?",
        ),
        ("conv: 0.5", "conv: 1.5", "efficiency.conv: input should be less than or equal to 1"),
        ("precisions: [fp32, int8]", "precisions: [fp32]", "compute.int8: int8 is not in `precisions`"),
        ("name: x86-avx2", "name: x86-avx3", "name: 'x86-avx3' does not match the file name"),
        ("cores: 4, threads: 8", "cores: 4, threads: 2", "cpu: threads (2) must be at least cores (4)"),
        ("family: x86", "family: x86\nfamily: x86", "duplicate key 'family'"),
    ],
)
def test_schema_rejects_bad_profiles_in_one_line(tmp_path, old, new, expected):
    text = builtin_text("x86-avx2")
    assert old in text
    path = write(tmp_path, "x86-avx2", text.replace(old, new, 1))
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_extra_folder_overrides_builtin_and_user_dir(tmp_path, monkeypatch, caplog):
    user = user_profile_dir()
    assert user == tmp_path / "config" / "profiles"
    write(user, "x86-avx2", builtin_text("x86-avx2").replace("value: 51.2", "value: 40"))
    assert load_profile("x86").memory.bandwidth_gbs.value == 40
    assert load_profile("x86").path == user / "x86-avx2.yaml"

    first, second = tmp_path / "first", tmp_path / "second"
    write(second, "x86-avx2", builtin_text("x86-avx2").replace("value: 51.2", "value: 30"))
    write(first, "x86-avx2", builtin_text("x86-avx2").replace("value: 51.2", "value: 20"))
    monkeypatch.setenv("EDGETL_PROFILE_PATH", f"{first}{os.pathsep}{second}")
    assert profile_search_path() == [builtin_profile_dir(), user, second, first]
    with caplog.at_level("DEBUG", logger="edgetl.device.profiles"):
        profile = load_profile("x86-avx2")
    assert profile.memory.bandwidth_gbs.value == 20  # like PATH: the first entry wins
    assert profile.path == first / "x86-avx2.yaml"
    assert "overrides" in caplog.text
    assert sum(p.name == "x86-avx2" for p in list_profiles()) == 1


def test_new_profile_in_extra_folder_and_alias_clash(tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    text = builtin_text("raspberry-pi-4").replace("name: raspberry-pi-4", "name: my-pi")
    write(extra, "my-pi", text.replace("aliases: [rpi4, pi4]", "aliases: [mypi]"))
    monkeypatch.setenv("EDGETL_PROFILE_PATH", str(extra))
    assert load_profile("mypi").name == "my-pi"

    clash = write(extra, "my-pi", text.replace("aliases: [rpi4, pi4]", "aliases: [rpi]"))
    with pytest.raises(ProfileError) as err:
        load_profile("my-pi")
    message = str(err.value)
    assert "alias 'rpi'" in message and str(clash) in message and "raspberry-pi-5.yaml" in message


def test_returned_profiles_are_copies():
    profile = load_profile("jetson-orin-nano")
    profile.efficiency.conv = 0.99
    assert load_profile("jetson-orin-nano").efficiency.conv != 0.99


def test_save_and_load_round_trip(tmp_path):
    for original in list_profiles():
        path = save_profile(original, tmp_path)
        assert path == tmp_path / f"{original.name}.yaml"
        again = load_profile(str(path))
        assert again.model_dump() == original.model_dump()
        assert again.path == path
    nano = load_profile("nano")
    with pytest.raises(ProfileError, match="file name must be the profile name"):
        save_profile(nano, tmp_path / "other.yaml")
    assert not (tmp_path / "other.yaml").exists()


def test_saved_profile_is_found_in_user_dir():
    profile = load_profile("x86-avx2").model_copy(update={"name": "my-box", "aliases": [], "family": "custom"})
    profile = DeviceProfile.model_validate(profile.model_dump())
    path = save_profile(profile, user_profile_dir())
    assert load_profile("my-box").path == path
    assert "my-box" in {p.name for p in list_profiles()}


def test_devices_json_lists_every_profile():
    result = CliRunner().invoke(cli, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {d["name"] for d in data} >= REQUIRED
    for item in data:
        DeviceProfile.model_validate(item)


def test_devices_table_and_profiles_option(tmp_path):
    extra = tmp_path / "extra"
    text = builtin_text("raspberry-pi-4").replace("name: raspberry-pi-4", "name: my-pi")
    write(extra, "my-pi", text.replace("aliases: [rpi4, pi4]", "aliases: []"))
    result = CliRunner().invoke(cli, ["--profiles", str(extra), "devices"], terminal_width=250)
    assert result.exit_code == 0, result.output
    for name in (*REQUIRED, "my-pi"):
        assert name in result.stdout


def test_devices_skips_broken_profile_with_a_warning(tmp_path, caplog):
    write(tmp_path, "broken", "name: broken\nfamily: [\n")
    result = CliRunner().invoke(cli, ["--profiles", str(tmp_path), "devices", "--json"])
    assert result.exit_code == 0, result.output
    assert "x86-avx2" in {p["name"] for p in json.loads(result.stdout)}
    assert any("broken.yaml:" in r.getMessage() and "invalid YAML" in r.getMessage() for r in caplog.records)
    result = CliRunner().invoke(cli, ["--profiles", str(tmp_path), "select", "--device", "broken"])
    assert result.exit_code == 1 and "broken.yaml:" in result.stderr and "invalid YAML" in result.stderr


def test_a_reference_without_its_runtime_is_rejected(tmp_path):
    text = builtin_text("jetson-nano")
    old = "latency_ms: 20.2, runtime: tensorrt, "
    assert old in text
    path = write(tmp_path, "jetson-nano", text.replace(old, "latency_ms: 20.2, ", 1))
    with pytest.raises(ProfileError, match=r"reference\[1\]\.runtime: field required"):
        load_profile(str(path))
