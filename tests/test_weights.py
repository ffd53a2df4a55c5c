"""Pretrained weights offline: EDGETL_WEIGHTS_DIR, the torch hub cache, PATH, and the error when missing.

No test downloads anything: weights files are state_dicts of ``weights=None`` models saved under
torchvision's file names in temporary folders.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from edgetl.cli import cli
from edgetl.errors import WeightsError
from edgetl.zoo.catalog import build_architecture, get_card
from edgetl.zoo.weights import (
    expected_hash_prefix,
    find_weights_file,
    load_model,
    weights_file_name,
)


@pytest.fixture(autouse=True)
def _empty_torch_hub(tmp_path, monkeypatch):
    """Point torch.hub's cache at an empty folder and clear edgetl's weights settings."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("EDGETL_WEIGHTS_DIR", "EDGETL_OFFLINE", "EDGETL_VERIFY_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def _fake_torchvision_file(folder, name="resnet18", seed=1):
    """A real torchvision-format weights file (a pickled-tensor state_dict) of a random model."""
    torch.manual_seed(seed)
    state = build_architecture(name).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weights_file_name(get_card(name))
    torch.save(state, path)
    return path, state


def test_file_name_and_hash_prefix_follow_torchvision():
    card = get_card("resnet18")
    assert weights_file_name(card) == "resnet18-f37072fd.pth"
    assert expected_hash_prefix("resnet18-f37072fd.pth") == "f37072fd"
    assert expected_hash_prefix("mine.pth") is None


def test_offline_and_not_cached_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(WeightsError) as info:
        load_model("resnet18", "imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert "resnet18-f37072fd.pth" in msg
    assert "edgetl weights pull resnet18.IMAGENET1K_V1" in msg
    assert "~/.cache/torch/hub/checkpoints" in msg and "EDGETL_WEIGHTS_DIR" in msg
    assert "--weights PATH" in msg and "--weights none" in msg


def test_edgetl_offline_never_downloads(monkeypatch):
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    with pytest.raises(WeightsError, match="edgetl weights pull"):
        load_model("mobilenet_v3_small", "imagenet")


def test_weights_dir_env_loads_through_torchvision(tmp_path, monkeypatch, caplog):
    path, state = _fake_torchvision_file(tmp_path / "weights")
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert find_weights_file(get_card("resnet18")) == path
    loaded = load_model("resnet18", "imagenet")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert loaded.pretrained and loaded.file == path and loaded.weights == "imagenet"
    assert not loaded.model.training
    # the file's hash does not match torchvision's prefix: used (it matches the architecture), with a warning
    assert loaded.verified == "architecture (sha256 prefix mismatch)"
    assert loaded.sha256 and "does not match the sha256 prefix" in caplog.text


def test_weights_dir_option_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "empty"))
    path, _ = _fake_torchvision_file(tmp_path / "option")
    assert load_model("resnet18", "imagenet", weights_dir=tmp_path / "option").file == path


def test_strict_policy_refuses_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    _fake_torchvision_file(tmp_path / "weights")
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("EDGETL_VERIFY_WEIGHTS", "strict")
    with pytest.raises(WeightsError, match="does not match the sha256 prefix f37072fd"):
        load_model("resnet18", "imagenet")


def test_torch_hub_cache_is_used(tmp_path):
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    path, state = _fake_torchvision_file(hub)
    loaded = load_model("resnet18", "imagenet")
    assert loaded.file == path and loaded.verified == "torch-hub-cache"
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"])


def test_a_file_for_another_architecture_is_rejected(tmp_path, monkeypatch):
    wrong = tmp_path / "weights" / weights_file_name(get_card("resnet18"))
    wrong.parent.mkdir()
    torch.save(build_architecture("mobilenet_v3_small").state_dict(), wrong)
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(wrong.parent))
    with pytest.raises(WeightsError, match="does not match the resnet18 architecture"):
        load_model("resnet18", "imagenet")


class Payload:  # any non-tensor object: weights_only loading must refuse to unpickle it
    pass


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="cannot read weights") as err:
        load_model("resnet18", path)
    assert "pickled objects other than tensors" in str(err.value)
    assert "likely succeed" not in str(err.value) and "weights_only" not in str(err.value)  # not torch's advice


def test_weights_path_safetensors_with_another_head(tmp_path):
    torch.manual_seed(3)
    state = build_architecture("resnet18", num_classes=7).state_dict()
    path = tmp_path / "mine.safetensors"
    save_file(state, path)
    loaded = load_model("resnet18", str(path))
    assert loaded.weights == str(path) and loaded.pretrained
    got = loaded.model.state_dict()
    assert torch.equal(got["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert got["fc.weight"].shape == (1000, 512)  # the 7-class head is left out


def test_cli_offline_error_is_one_line(tmp_path, monkeypatch):
    from edgetl.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=4, val_per_class=2, size=32)
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "weights"))
    result = CliRunner().invoke(cli, ["finetune", "--model", "resnet18", "--data", str(data),
                                      "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "edgetl weights pull resnet18" in lines[0]


def test_pull_refuses_to_download_under_edgetl_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    (tmp_path / "w").mkdir()
    stale = tmp_path / "w" / "resnet18-f37072fd.pth"
    stale.write_bytes(b"not the weights")  # present, but its bytes do not match the name's sha256 prefix
    result = CliRunner().invoke(cli, ["weights", "pull", "resnet18", "--dir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "EDGETL_OFFLINE is set" in result.stderr and "resnet18-f37072fd.pth" in result.stderr
    assert stale.read_bytes() == b"not the weights"


# --- timm ------------------------------------------------------------------------------------


def _timm_file(folder, arch="lcnet_050", seed=1):
    """A timm-layout weights file (``timm/<arch>.<tag>.safetensors``) of a random timm model."""
    import timm

    torch.manual_seed(seed)
    state = timm.create_model(arch, pretrained=False).state_dict()
    path = folder / weights_file_name(get_card(f"timm/{arch}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path, state


def test_timm_weights_dir_layout():
    assert weights_file_name(get_card("timm/lcnet_050")) == "timm/lcnet_050.ra2_in1k.safetensors"
    card = get_card("timm/mobilenetv4_conv_small.e1200_r224_in1k")
    assert weights_file_name(card) == "timm/mobilenetv4_conv_small.e1200_r224_in1k.safetensors"


def test_timm_offline_and_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(WeightsError) as info:
        load_model("timm/lcnet_050", "imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert "timm/lcnet_050.ra2_in1k.safetensors" in msg
    assert "edgetl weights pull timm/lcnet_050.ra2_in1k" in msg


def test_timm_loads_from_the_weights_dir(tmp_path):
    path, state = _timm_file(tmp_path / "weights")
    loaded = load_model("timm/lcnet_050", "imagenet", weights_dir=tmp_path / "weights")
    got = loaded.model.state_dict()
    assert loaded.file == path and loaded.pretrained and loaded.verified == "architecture"
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_timm_distilled_file_loads_into_one_head(tmp_path):
    _timm_file(tmp_path / "weights", arch="repvit_m0_9")
    model = load_model("timm/repvit_m0_9", "imagenet", weights_dir=tmp_path / "weights").model
    assert not hasattr(model.head, "head_dist")


def test_timm_pull_keeps_a_present_file_and_never_downloads_offline(tmp_path, monkeypatch):
    from edgetl.zoo.weights import pull_weights

    path, _ = _timm_file(tmp_path / "w")
    assert pull_weights("timm/lcnet_050", dir=tmp_path / "w") == path
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"EDGETL_OFFLINE is set, so timm/lcnet_075\.ra2_in1k\.safetensors"):
        pull_weights("timm/lcnet_075", dir=tmp_path / "w")


def test_timm_efficientformerv2_is_sized_for_the_training_resolution(tmp_path):
    loaded = load_model("timm/efficientformerv2_s0", "none", resolution=128)
    assert loaded.arch_kwargs == {"distillation": False, "img_size": 128}
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)
    assert load_model("timm/lcnet_050", "none", resolution=96).arch_kwargs == {}
