"""The CUDA path: automatic mixed precision (bf16, or fp16 with a GradScaler) and channels-last."""

from __future__ import annotations

import pytest
import torch

from edgetl.data import make_demo_dataset
from edgetl.finetune.api import finetune, load_trained_model
from edgetl.finetune.precision import cuda_has_native_bf16
from edgetl.finetune.strategy import apply_strategy, build_param_groups, choose_strategy
from edgetl.finetune.trainer import TrainConfig, Trainer, make_scheduler
from edgetl.zoo.catalog import build_architecture, get_card, replace_head


@pytest.mark.gpu
def test_amp_trainer_on_cuda():
    card = get_card("resnet18")
    model = build_architecture("resnet18")
    replace_head(model, card, 3)
    plan = apply_strategy(model, card, choose_strategy("full", len(card.block_paths)))
    model.cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(build_param_groups(model, plan, card, lr=1e-3))
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, 2, 1, 0), TrainConfig(epochs=1, progress=False),
                      torch.device("cuda"), num_classes=3)
    expected = torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    assert trainer.amp_dtype == expected and trainer.channels_last
    assert (trainer.scaler is not None) == (expected == torch.float16)
    batches = [(torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,))) for _ in range(2)]
    stats = trainer.train_one_epoch(batches)
    assert stats["train_images"] == 16 and torch.isfinite(torch.tensor(stats["train_loss"]))
    result = trainer.evaluate(batches)
    assert result.images == 16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # AMP keeps float32 master weights


@pytest.mark.gpu
def test_finetune_on_cuda(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    result = finetune("resnet18", data, tmp_path / "run", weights="none", strategy="full", epochs=2,
                      resolution=32, batch_size=8, device="cuda", progress=False)
    assert result.epochs_run == 2
    trained = load_trained_model(tmp_path / "run")  # loads on the CPU
    assert next(trained.parameters()).device.type == "cpu"
