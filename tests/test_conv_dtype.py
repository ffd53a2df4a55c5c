"""Grouped convolutions in fp32 under bf16 autocast: the mode that runs them, the calls recorded, the timed choice."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgetl._io import cache_dir
from edgetl.finetune import conv_dtype
from edgetl.finetune.conv_dtype import (
    FP32_MARGIN,
    Fp32Convs,
    choose_fp32_convs,
    record_grouped_convs,
    trainable_grouped_convs,
)
from edgetl.finetune.precision import resolve_precision
from edgetl.finetune.strategy import apply_strategy, choose_strategy
from edgetl.zoo.catalog import build_architecture, get_card, replace_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def dtypes_of(model: nn.Sequential, fp32: list[torch.Tensor]) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in model]
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), Fp32Convs(fp32):
        out = model(x)
    out.float().sum().backward()
    for h in handles:
        h.remove()
    return seen


def test_the_listed_convolutions_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1))
    assert dtypes_of(model, []) == [torch.bfloat16, torch.bfloat16]
    model.zero_grad()
    assert dtypes_of(model, [model[0].weight]) == [torch.float32, torch.bfloat16]
    assert model[0].weight.grad.dtype == torch.float32 and model[0].weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16), Fp32Convs([model[0].weight]):
        reference = nn.functional.conv2d(torch.ones(1, 8, 6, 6, dtype=torch.bfloat16), model[0].weight.float(),
                                         model[0].bias, padding=1, groups=8)
    x = torch.ones(1, 8, 6, 6, dtype=torch.bfloat16)
    expected = nn.functional.conv2d(x.float(), model[0].weight, model[0].bias, padding=1, groups=8)
    assert torch.equal(reference, expected)  # computed from the fp32 weights, not their bf16 copy


def lite0(strategy: str, unfreeze: int | None = None) -> nn.Module:
    card = get_card("timm/tf_efficientnet_lite0")
    torch.manual_seed(0)
    model = build_architecture(card.id)
    replace_head(model, card, 3)
    apply_strategy(model, card, choose_strategy(strategy, len(card.block_paths), unfreeze=unfreeze))
    return model.to(memory_format=torch.channels_last).train()


def test_every_trainable_grouped_convolution_is_recorded_as_conv2d_sees_it():
    model = lite0("partial", unfreeze=8)
    trainable = trainable_grouped_convs(model)
    every = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert 0 < len(trainable) < len(every)  # the frozen trunk's depthwise convolutions are not candidates
    calls = record_grouped_convs(model, 64, CPU, channels_last=True)
    assert set(calls) == set(trainable)
    assert all(m.training for m in model.modules())  # the eval-mode forward left the training flags as they were
    for name, call in calls.items():
        conv = model.get_submodule(name)
        assert call.weight_shape == tuple(conv.weight.shape) and call.groups == conv.groups == call.input_shape[0]
    # TensorFlow's "same" padding of a stride-2 convolution pads the input before conv2d: the call sees it padded
    strided = {n: c for n, c in calls.items() if c.stride == (2, 2)}
    assert strided and all(c.padding in (0, (0, 0)) and c.input_shape[1] % 2 == 1 for c in strided.values())


def test_the_choice_is_timed_once_per_machine_and_recorded(monkeypatch):
    model = lite0("full")
    fp32 = resolve_precision("fp32", "cpu")
    assert choose_fp32_convs(model, fp32, 32, 4, CPU) is fp32  # nothing to choose without autocast
    bf16 = resolve_precision("bf16", "cpu")
    chosen = choose_fp32_convs(model, bf16, 32, 4, CPU)
    candidates = trainable_grouped_convs(model)
    distinct = set(record_grouped_convs(model, 32, CPU, channels_last=True).values())
    assert set(chosen.fp32_convs) <= set(candidates)
    assert len(chosen.conv_timings) == len(distinct) and sum(r["count"] for r in chosen.conv_timings) == len(candidates)
    for row in chosen.conv_timings:
        assert row["bf16_ms"] > 0 and row["fp32_ms"] > 0
        assert row["fp32"] == (row["fp32_ms"] <= FP32_MARGIN * row["bf16_ms"])
    assert f"of {len(candidates)} trainable grouped convolutions in fp32" in chosen.reason
    assert json.dumps(chosen.to_dict())  # metrics.json holds it

    cache = json.loads((cache_dir("conv_dtype") / "timings.json").read_text())
    assert len(cache) >= len(distinct)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again: the cache was not used")

    monkeypatch.setattr(conv_dtype, "time_conv", no_timing)
    again = choose_fp32_convs(model, bf16, 32, 4, CPU)
    assert again.fp32_convs == chosen.fp32_convs and again.conv_timings == chosen.conv_timings


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"key": "not a timing"}'])
def test_a_damaged_timing_cache_is_timed_again_and_rewritten(damage):
    model = lite0("partial", unfreeze=5)
    path = cache_dir("conv_dtype") / "timings.json"
    path.write_text(damage)
    chosen = choose_fp32_convs(model, resolve_precision("bf16", "cpu"), 32, 2, CPU)
    assert chosen.conv_timings and all(r["bf16_ms"] > 0 for r in chosen.conv_timings)
    assert isinstance(json.loads(path.read_text()), dict)
