import math
import subprocess
import sys

import pytest
import torch
from torchvision import models as tvm

from edgetl.errors import EdgetlError, UnknownNameError
from edgetl.zoo import catalog


def _torchvision_entries():
    out = []
    for name in tvm.list_models(module=tvm):
        for w in tvm.get_model_weights(name):
            if "ImageNet-1K" in w.meta.get("_metrics", {}):
                out.append((name, w))
    return out


def test_catalog_holds_every_imagenet_weight_entry_of_torchvision():
    cards = {c.id for c in catalog.list_models(zoo="torchvision")}
    expected = {f"{name}.{w.name}" for name, w in _torchvision_entries()}
    assert cards == expected
    assert len(cards) >= 100  # 115 in torchvision 0.29


def test_figures_come_from_torchvision_metadata():
    for name, w in _torchvision_entries():
        card = catalog.get_card(f"{name}.{w.name}")
        meta = w.meta
        tf = w.transforms()
        acc1, acc5 = meta["_metrics"]["ImageNet-1K"]["acc@1"], meta["_metrics"]["ImageNet-1K"]["acc@5"]
        assert card.top1 == (None if math.isnan(acc1) else acc1)
        assert card.top5 == (None if math.isnan(acc5) else acc5)
        assert card.params == meta["num_params"]
        assert card.gflops == meta["_ops"]
        assert card.file_mb == meta["_file_size"]
        assert card.preprocess.crop_size == tf.crop_size[0]
        assert card.preprocess.resize_size == tf.resize_size[0]
        assert card.preprocess.mean == tuple(tf.mean)
        assert card.preprocess.std == tuple(tf.std)
        assert card.url == w.url


def test_name_resolution_default_and_tags():
    assert catalog.get_card("resnet50").weights == tvm.ResNet50_Weights.DEFAULT.name
    assert catalog.get_card("resnet50.DEFAULT").is_default
    assert catalog.get_card("resnet50.imagenet1k_v1").weights == "IMAGENET1K_V1"
    assert catalog.get_card("ResNet50").name == "resnet50"


def test_unknown_model_suggests_closest_names():
    with pytest.raises(UnknownNameError) as info:
        catalog.get_card("resnt50")
    assert isinstance(info.value, EdgetlError)
    assert "resnet50" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_tag_lists_the_tags_of_the_model():
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        catalog.get_card("resnet50.IMAGENET1K_V9")


def test_filter_glob():
    cards = catalog.list_models("mobilenet_v3*")
    assert {c.name for c in cards} == {"mobilenet_v3_small", "mobilenet_v3_large"}
    assert all(c.is_default for c in catalog.list_models("resnet*", default_only=True))


@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_head_and_blocks_exist_for_every_architecture(zoo):
    for card in catalog.list_models(default_only=True, zoo=zoo):
        model = catalog.build_architecture(card.name, meta=True)
        head = model.get_submodule(card.head_path)
        out = getattr(head, "out_features", None) or getattr(head, "out_channels", None)
        assert out == 1000, card.name
        assert card.block_paths, card.name
        for path in card.block_paths:
            block = model.get_submodule(path)
            assert any(True for _ in block.parameters()), (card.name, path)
            assert not card.head_path.startswith(path + "."), (card.name, path)


@pytest.mark.parametrize("name", [
    "resnet18", "mobilenet_v3_small", "squeezenet1_1", "vit_b_32",
    "timm/mobilenetv4_conv_small", "timm/repvit_m0_9", "timm/efficientformerv2_s0", "timm/efficientvit_b0",
    "timm/fastvit_t8", "timm/convnext_atto", "timm/mobilevitv2_050", "timm/ghostnetv2_100",
])
def test_replace_head(name):
    card = catalog.get_card(name)
    model = catalog.build_architecture(name, meta=True)
    old = model.get_submodule(card.head_path)
    new = catalog.replace_head(model, card, 7)
    assert model.get_submodule(card.head_path) is new
    assert new.weight.shape[0] == 7
    assert new.weight.shape[1] == old.weight.shape[1]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "timm/repvit_m0_9", "timm/lcnet_050", "timm/efficientvit_b0"])
def test_replace_head_runs_forward(name):
    card = catalog.get_card(name)
    model = catalog.build_architecture(card.name)
    head = catalog.replace_head(model, card, 3)
    assert model.get_submodule(card.head_path) is head
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_regnet_builds_on_meta():
    model = catalog.build_architecture("regnet_y_400mf", meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_warm_catalog_does_not_import_torch(tmp_path):
    catalog._zoo_cards.cache_clear()  # an earlier test may have listed the zoos under another cache folder
    catalog.list_models()  # warm the session's cache
    code = (
        "import sys\nfrom edgetl.zoo import catalog\ncs = catalog.list_models()\n"
        "assert len(cs) > 180 and catalog.get_card('timm/repvit_m1').zoo == 'timm'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'timm' not in sys.modules, 'timm was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
