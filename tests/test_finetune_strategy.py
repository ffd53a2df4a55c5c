"""Strategy choice, freezing (FrozenBatchNorm, no dropout) and stage-wise LR groups."""

from __future__ import annotations

import dataclasses
import io
import itertools

import pytest
import torch
from torch import nn

from edgetl.errors import ConfigError
from edgetl.finetune.stages import stages
from edgetl.finetune.strategy import (
    DOMAIN_CONFIDENCE_THRESHOLD,
    SMALL_MAX_IMAGES,
    DomainEstimate,
    FrozenBatchNorm,
    apply_strategy,
    build_param_groups,
    choose_strategy,
    default_unfreeze,
    describe_param_groups,
    estimate_domain,
)
from edgetl.finetune.trainer import TrainConfig, Trainer, make_scheduler
from edgetl.zoo.catalog import build_architecture, get_card, list_models, replace_head

SIMILAR = DomainEstimate("similar", "user")
DIFFERENT = DomainEstimate("different", "user")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("num_train", "domain", "expected", "words"),
    [
        (400, SIMILAR, "linear", ["small dataset", "400 training images < 1000", "domain similar"]),
        (400, DIFFERENT, "partial", ["small dataset", "domain different"]),
        (20_000, SIMILAR, "partial", ["large dataset", "domain similar"]),
        (20_000, DIFFERENT, "full", ["large dataset", "domain different"]),
    ],
)
def test_auto_strategy_follows_the_table(num_train, domain, expected, words):
    decision = choose_strategy("auto", num_blocks=10, num_train=num_train, num_classes=10, domain=domain)
    assert decision.strategy == expected
    assert decision.requested == "auto"
    assert decision.reason.endswith(f"-> {expected}") or f"-> {expected}," in decision.reason
    for word in words:
        assert word in decision.reason
    assert decision.unfreeze == {"linear": 0, "partial": default_unfreeze(10), "full": 10}[expected]
    assert decision.to_dict()["domain"]["domain"] == domain.domain


def test_small_means_few_images_or_few_per_class():
    many_classes = choose_strategy("auto", 10, num_train=5_000, num_classes=100, domain=SIMILAR)
    assert many_classes.size == "small" and "50 images per class < 100" in many_classes.reason
    at_threshold = choose_strategy("auto", 10, num_train=SMALL_MAX_IMAGES, num_classes=2, domain=SIMILAR)
    assert at_threshold.size == "large"


def test_explicit_strategy_and_unfreeze():
    d = choose_strategy("partial", num_blocks=10, unfreeze=4)
    assert (d.strategy, d.unfreeze, d.requested) == ("partial", 4, "partial")
    assert "requested" in d.reason and "last 4 of 10 blocks" in d.reason
    assert default_unfreeze(10) == 3 and default_unfreeze(14) == 4 and default_unfreeze(2) == 1
    with pytest.raises(ConfigError, match="out of range"):
        choose_strategy("partial", num_blocks=10, unfreeze=11)
    with pytest.raises(ConfigError, match="unknown strategy"):
        choose_strategy("everything", num_blocks=10)


class _FixedLogits(nn.Module):
    """A 'classifier' whose logits put ``p`` on class 0 for every image (softmax of log-probabilities)."""

    def __init__(self, p: float, classes: int = 1000) -> None:
        super().__init__()
        rest = (1 - p) / (classes - 1)
        self.register_buffer("logits", torch.log(torch.tensor([p] + [rest] * (classes - 1))))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_domain_measured_from_imagenet_confidence():
    batches = [(torch.zeros(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))] * 4
    similar = estimate_domain("auto", _FixedLogits(0.9), batches, max_images=20)
    assert similar.domain == "similar" and similar.source == "measured"
    assert similar.confidence == pytest.approx(0.9, abs=1e-5) and similar.samples == 20
    assert "0.90 >= 0.50" in similar.reason
    different = estimate_domain("auto", _FixedLogits(0.2), batches)
    assert different.domain == "different" and different.confidence < DOMAIN_CONFIDENCE_THRESHOLD
    no_weights = estimate_domain("auto", None)
    assert no_weights.domain == "different" and "no pretrained weights" in no_weights.reason
    assert estimate_domain("similar").source == "user"


def _resnet(num_classes: int = 3) -> tuple[nn.Module, object]:
    card = get_card("resnet18")
    torch.manual_seed(0)
    model = build_architecture("resnet18")
    replace_head(model, card, num_classes)
    return model, card


def test_requires_grad_per_strategy_resnet():
    for strategy, trainable_prefixes in (
        ("linear", ("fc.",)),
        ("partial", ("fc.", "layer4.0.", "layer4.1.")),
        ("full", ("",)),
    ):
        model, card = _resnet()
        unfreeze = 2 if strategy == "partial" else None
        apply_strategy(model, card, choose_strategy(strategy, len(card.block_paths), unfreeze=unfreeze))
        for name, p in model.named_parameters():
            assert p.requires_grad == name.startswith(trainable_prefixes), (strategy, name)


def test_vit_params_outside_blocks_train_only_under_full():
    card = get_card("vit_b_16")
    for strategy, expected in (("partial", False), ("full", True)):
        model = build_architecture("vit_b_16", meta=True)
        replace_head(model, card, 5)
        plan = apply_strategy(model, card, choose_strategy(strategy, len(card.block_paths), unfreeze=3))
        params = dict(model.named_parameters())
        assert params["encoder.pos_embedding"].requires_grad is expected
        assert params["class_token"].requires_grad is expected
        assert params["heads.head.weight"].requires_grad
        assert params["encoder.ln.weight"].requires_grad  # the top block
        assert params["encoder.layers.encoder_layer_11.mlp.0.weight"].requires_grad
        assert params["encoder.layers.encoder_layer_9.mlp.0.weight"].requires_grad is expected
        if strategy == "partial":
            assert plan.trainable_blocks == card.block_paths[-3:]


def test_frozen_batchnorm_running_stats_are_bitwise_unchanged():
    model, card = _resnet()
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    plan = apply_strategy(model, card, choose_strategy("partial", len(card.block_paths), unfreeze=2))
    modules = dict(model.named_modules())
    frozen = {n for n in bn_names if not n.startswith("layer4.")}
    assert all(isinstance(modules[n], FrozenBatchNorm) for n in frozen)
    assert all(isinstance(modules[n], nn.BatchNorm2d) for n in bn_names if n not in frozen)
    stats = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    optimizer = torch.optim.AdamW(build_param_groups(model, plan, card, lr=1e-2))
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, 3, 1, 0), TrainConfig(epochs=1, progress=False),
                      torch.device("cpu"), num_classes=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g) * 3 + 1, torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    trainer.train_one_epoch(batches)

    after = model.state_dict()
    assert set(after) == set(before)  # same keys as BatchNorm2d: checkpoints load into the plain architecture
    for name in bn_names:
        same = all(torch.equal(before[f"{name}.{k}"], after[f"{name}.{k}"]) for k in stats)
        assert same == (name in frozen), name
    assert after["conv1.weight"].equal(before["conv1.weight"]) and not after["fc.weight"].equal(before["fc.weight"])


def test_frozen_batchnorm_computes_what_eval_batchnorm_computes():
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(), bn.bias.uniform_()
    x = torch.randn(2, 6, 5, 5)
    frozen = FrozenBatchNorm.from_batch_norm(bn).train()
    assert torch.equal(frozen(x), bn.eval()(x))
    assert not list(frozen.parameters()) and set(frozen.state_dict()) == set(bn.state_dict())


@pytest.mark.parametrize("strategy", ["linear", "partial", "full"])
def test_every_strategy_pickles_and_loads_into_the_plain_architecture(strategy):
    card = get_card("mobilenet_v3_small")
    model = build_architecture("mobilenet_v3_small")
    replace_head(model, card, 4)
    apply_strategy(model, card, choose_strategy(strategy, len(card.block_paths)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), model.eval()(x))
    plain = build_architecture("mobilenet_v3_small")
    replace_head(plain, card, 4)
    plain.load_state_dict(model.state_dict())  # strict: the same keys
    assert torch.equal(plain.eval()(x), model(x))


def test_linear_probe_freezes_the_whole_trunk():
    card = get_card("mobilenet_v3_small")
    model = build_architecture("mobilenet_v3_small")
    replace_head(model, card, 4)
    plan = apply_strategy(model, card, choose_strategy("linear", len(card.block_paths)))
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    expected = model(x)
    model.train()  # frozen BatchNorm, no dropout: training mode computes what eval mode computes
    assert torch.equal(model(x), expected)
    assert isinstance(model.classifier[2], nn.Identity)  # the dropout before the head
    assert "classifier.2" in plan.locked and "classifier.3" not in plan.locked


def test_auto_with_random_weights_trains_everything():
    no_weights = estimate_domain("auto", None)
    for num_train in (100, 50_000):
        d = choose_strategy("auto", num_blocks=10, num_train=num_train, num_classes=2, domain=no_weights)
        assert (d.strategy, d.unfreeze) == ("full", 10)
        assert "no pretrained weights" in d.reason


def test_param_groups_by_stage_and_no_weight_decay_on_norms_and_biases():
    model, card = _resnet()
    plan = apply_strategy(model, card, choose_strategy("partial", len(card.block_paths), unfreeze=3))
    groups = build_param_groups(model, plan, card, lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == [
        "head/decay", "head/no_decay", "layer4/decay", "layer4/no_decay", "layer3/decay", "layer3/no_decay",
    ]
    assert by_name["head/decay"]["lr"] == pytest.approx(1e-3)  # the head at --lr, no extra factor
    assert by_name["layer4/decay"]["lr"] == pytest.approx(5e-4)
    assert by_name["layer3/no_decay"]["lr"] == pytest.approx(2.5e-4)
    params = dict(model.named_parameters())
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert id(params["fc.weight"]) in ids["head/decay"] and id(params["fc.bias"]) in ids["head/no_decay"]
    assert id(params["layer4.1.conv1.weight"]) in ids["layer4/decay"]
    assert id(params["layer4.0.conv1.weight"]) in ids["layer4/decay"]
    assert id(params["layer3.1.conv1.weight"]) in ids["layer3/decay"]
    assert id(params["layer4.1.bn1.weight"]) in ids["layer4/no_decay"]
    for g in groups:
        assert g["weight_decay"] == (0.05 if g["name"].endswith("/decay") else 0.0)
    # exactly the trainable parameters, each once
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    described = describe_param_groups(groups)
    assert [(d["name"], d["lr_scale"]) for d in described] == [("head", 1.0), ("layer4", 0.5), ("layer3", 0.25)]
    assert described[0]["params"] == params["fc.weight"].numel() + params["fc.bias"].numel()
    with pytest.raises(ConfigError, match="layer-decay"):
        build_param_groups(model, plan, card, lr=1e-3, layer_decay=1.5)


def test_resnet_stages_are_the_stem_and_four_layers():
    model, card = _resnet()
    below, head = stages(model, card)
    assert [s.name for s in below] == ["conv1..bn1", "layer1", "layer2", "layer3", "layer4"]
    assert head.params == ("fc.weight", "fc.bias")


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv4_conv_small", "vit_small_patch16_224",
                                  "convnext_atto", "fastvit_t8"])
def test_timm_models_are_grouped_by_their_own_group_matcher(arch):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=3)
    card = dataclasses.replace(get_card("resnet18"), name=arch, family="timm", block_paths=(),
                               head_path=model.default_cfg["classifier"])
    below, head = stages(model, card)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for s in [*below, head] for n in s.params) == sorted(names)  # each parameter once
    assert 3 <= len(below) <= 8 and 0.7 ** len(below) >= 0.05
    assert any(s.name.startswith(("blocks", "stages")) for s in below)  # timm's block/stage names, not ours
    assert f"{card.head_path}.weight" in head.params


def _architectures():
    seen, out = set(), []
    for card in list_models():
        if card.name not in seen:
            seen.add(card.name)
            out.append(card)
    return out


def test_every_catalog_model_trains_its_bottom_stage_at_5_percent_or_more():
    """With the default decay of 0.7, no model's bottom group falls under 0.05 of the head's LR."""
    worst = {}
    for card in _architectures():
        model = build_architecture(card.id, meta=True)
        replace_head(model, card, 3)
        plan = apply_strategy(model, card, choose_strategy("full", len(card.block_paths)))
        groups = build_param_groups(model, plan, card, lr=1e-3)
        scales = [d["lr_scale"] for d in describe_param_groups(groups)]
        assert scales[0] == 1.0 and scales == sorted(scales, reverse=True), card.name
        assert len(scales) >= 3, f"{card.name}: {scales}"  # a head and at least two stages
        grouped = sum(len(g["params"]) for g in groups)
        assert grouped == len(list(model.parameters())), card.name
        worst[card.name] = scales[-1]
    name = min(worst, key=worst.get)
    assert worst[name] >= 0.05, f"{name}'s bottom stage trains at {worst[name]:.3f} of the head's LR"


def test_warmup_then_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] < 0.01


def test_frozen_timm_norm_act_keeps_its_activation_and_keys():
    """timm's BatchNormAct2d normalises, then applies its activation: freezing must keep both."""
    import timm

    from edgetl.finetune.strategy import freeze_modules

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    keys = set(model.state_dict())
    assert freeze_modules(model, "") > 0
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert set(model.state_dict()) == keys
