"""The timm zoo: which entries, where each figure comes from, names, and the distillation-head fold.

Nothing is downloaded: architectures are built with random weights (or on the meta device).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

from edgetl.errors import UnknownNameError
from edgetl.zoo import catalog, model_cost
from edgetl.zoo import timm as zoo_timm

SHARED_CSV = Path("/work/shared/reference/timm/results-imagenet.csv")


def _timm_cards():
    return catalog.list_models(zoo="timm")


def test_at_least_80_entries_from_every_family():
    cards = _timm_cards()
    assert len(cards) >= 80
    assert {c.family for c in cards} == set(zoo_timm.FAMILIES)
    assert all(c.name.startswith("timm/") and c.zoo == "timm" for c in cards)
    assert all(c.is_default for c in catalog.list_models(zoo="timm", default_only=True))


def test_every_in1k_tag_with_a_published_row_is_in_the_catalog():
    shared = zoo_timm.read_results(SHARED_CSV) if SHARED_CSV.exists() else zoo_timm.read_results()
    expected = {f"timm/{e.hub_id}" for e in zoo_timm.entries(shared)}
    assert {c.id for c in _timm_cards()} == expected


def test_catalog_equals_the_vendored_csv():
    rows = zoo_timm.read_results()
    used = set()
    for card in _timm_cards():
        key = (card.id.removeprefix("timm/"), card.resolution)
        row = rows[key]
        used.add(key)
        assert card.top1 == float(row["top1"]) and card.top5 == float(row["top5"]), card.id
    assert used == set(rows), "the vendored file holds rows the catalog does not use"


def test_vendored_file_has_provenance_and_matches_timm_results():
    lines = zoo_timm.RESULTS_FILE.read_text().splitlines()
    assert lines[0].startswith("# source: huggingface/pytorch-image-models, commit ")
    assert lines[1] == "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation"
    if not SHARED_CSV.exists():
        pytest.skip("timm's results-imagenet.csv is not on this machine")
    with open(SHARED_CSV, newline="") as fh:
        shared = {(r["model"], r["img_size"]): r for r in csv.DictReader(fh)}
    for row in csv.DictReader(lines[1:]):
        assert shared[(row["model"], row["img_size"])] == row


def test_resolution_and_preprocessing_come_from_pretrained_cfg():
    for card in _timm_cards():
        cfg = get_pretrained_cfg(card.id.removeprefix("timm/")).to_dict()
        size = (cfg.get("test_input_size") or cfg["input_size"])[-1]
        crop_pct = cfg.get("test_crop_pct") or cfg["crop_pct"] if cfg.get("test_input_size") else cfg["crop_pct"]
        pre = card.preprocess
        assert pre.crop_size == size == card.resolution, card.id
        assert pre.resize_size == int(size / crop_pct), card.id
        assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"]), card.id
        assert pre.interpolation == cfg["interpolation"], card.id
    lite0 = catalog.get_card("timm/tf_efficientnet_lite0")
    assert lite0.preprocess.mean == lite0.preprocess.std == (0.5, 0.5, 0.5)
    assert catalog.get_card("timm/convnext_atto").resolution == 288  # the test size, with its row


def test_names_follow_the_hub():
    default = catalog.get_card("timm/mobilenetv4_conv_small")
    assert default.id == "timm/mobilenetv4_conv_small.e2400_r224_in1k" and default.is_default
    assert catalog.get_card("timm/MobileNetV4_Conv_Small.E1200_R224_IN1K").weights == "e1200_r224_in1k"
    assert catalog.get_card("resnet50").zoo == "torchvision"
    assert {c.zoo for c in catalog.list_models("mobilenetv4*")} == {"timm"}
    assert catalog.list_models("timm/lcnet_0*", zoo="torchvision") == []


def test_unknown_timm_names_suggest():
    with pytest.raises(UnknownNameError, match="timm/mobilenetv4_conv_small"):
        catalog.get_card("timm/mobilenetv4_conv_smal")
    with pytest.raises(UnknownNameError, match="e2400_r224_in1k"):
        catalog.get_card("timm/mobilenetv4_conv_small.e9999_in1k")
    with pytest.raises(UnknownNameError, match="timm/repvit_m1"):
        catalog.get_card("repvit_m1")  # a timm name without its zoo prefix


def test_params_and_gflops_are_of_the_reparameterised_network():
    card = catalog.get_card("timm/mobileone_s0")
    unfused = sum(p.numel() for p in catalog.build_architecture(card.id, meta=True).parameters())
    trace = model_cost.trace_model(card)
    assert card.params == trace.params < unfused
    assert card.gflops == pytest.approx(trace.flops / 2e9, rel=1e-3)
    on_cpu = zoo_timm.build("mobileone_s0", meta=False, deploy=True)  # fused with real tensors
    assert sum(p.numel() for p in on_cpu.parameters()) == card.params
    # a plain convnet is unchanged by re-parameterisation
    lcnet = catalog.get_card("timm/lcnet_050")
    assert lcnet.params == sum(p.numel() for p in catalog.build_architecture(lcnet.id, meta=True).parameters())


def test_timm_ops_are_classified():
    by = model_cost.trace_model("timm/mobilenetv4_hybrid_medium").by_class()
    assert by["attention"]["flops"] > 0 and by["depthwise"]["flops"] > 0
    ops = {o.op: o.cls for o in model_cost.trace_model("timm/mobilevitv2_050").ops}
    assert ops.get("upsample_bilinear2d", "data_movement") == "data_movement"
    assert ops["silu"] == "elementwise"
    hs = [o for o in model_cost.trace_model("timm/lcnet_050").ops if o.op.startswith("hardswish")]
    assert hs and all(o.fused for o in hs)


@pytest.mark.parametrize(("arch", "kwargs"), [("repvit_m0_9", {}), ("efficientformerv2_s0", {})])
def test_distillation_heads_fold_exactly(arch, kwargs):
    torch.manual_seed(0)
    original = timm.create_model(arch, pretrained=False, **kwargs).eval()
    state = original.state_dict()
    for key in state:  # give the heads' BatchNorm statistics something to fold
        if "running_var" in key or "running_mean" in key:
            state[key] = torch.rand_like(state[key]) + 0.5
    original.load_state_dict(state)
    ours = catalog.build_architecture(f"timm/{arch}")
    ours.load_state_dict(zoo_timm.adapt_state_dict(arch, state))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-4, atol=1e-4)


def test_deployed_model_is_fused_and_equivalent():
    card = catalog.get_card("timm/mobileone_s0")
    torch.manual_seed(0)
    model = catalog.build_architecture(card.id)
    catalog.replace_head(model, card, 4)
    fused = catalog.deployed_model(model, card)
    assert fused is not model
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-3, atol=1e-3)
    plain = catalog.get_card("resnet18")
    net = catalog.build_architecture("resnet18", meta=True)
    assert catalog.deployed_model(net, plain) is net


def test_a_pattern_that_names_no_timm_entry_does_not_load_the_timm_zoo():
    catalog._zoo_cards.cache_clear()
    try:
        assert {c.name for c in catalog.list_models("resnet1*")} == {"resnet18", "resnet101", "resnet152"}
        assert catalog._zoo_cards.cache_info().currsize == 1  # torchvision's only
        assert not catalog._timm_may_match("resnet*") and catalog._timm_may_match("*lite0*")
    finally:
        catalog._zoo_cards.cache_clear()
