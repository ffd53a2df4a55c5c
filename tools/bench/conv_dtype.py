"""Training steps of depthwise and grouped networks on the CPU: fp32, bf16 everywhere, and bf16 with the grouped
convolutions edgetl times faster in fp32 kept in fp32 (what ``--precision-train auto`` does on a bf16 CPU).

Each model (random weights, every layer trained, channels-last, AdamW) trains on the same in-memory batches with
edgetl's ``Trainer``: no data loading, so the figures are the step itself. The three variants are separate copies
of one model; their epochs alternate (fp32, bf16, bf16 + fp32 grouped, fp32, ...) because shared machines drift,
and the best epoch of each is reported as ms per step. The time the choice took (timing the distinct grouped
convolutions, with an empty timing cache) is reported beside it.

    python tools/bench/conv_dtype.py
    python tools/bench/conv_dtype.py --models mobilenet_v2 --resolution 64
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from edgetl.finetune.conv_dtype import choose_fp32_convs, trainable_grouped_convs
from edgetl.finetune.precision import TrainPrecision, cpu_has_native_bf16, resolve_precision
from edgetl.finetune.strategy import FreezePlan, apply_strategy, build_param_groups, choose_strategy
from edgetl.finetune.trainer import TrainConfig, Trainer, make_scheduler
from edgetl.zoo.catalog import build_architecture, get_card, replace_head

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "timm/tf_efficientnet_lite0",
          "regnet_y_400mf", "resnext50_32x4d", "resnet18")
CPU = torch.device("cpu")


def network(name: str, classes: int = 4) -> tuple[torch.nn.Module, FreezePlan]:
    """The catalog model with random weights and a new head, every layer training, channels-last."""
    card = get_card(name)
    torch.manual_seed(0)
    model = build_architecture(card.id)
    replace_head(model, card, classes)
    plan = apply_strategy(model, card, choose_strategy("full", len(card.block_paths)))
    return model.to(memory_format=torch.channels_last), plan


def trainer(model: torch.nn.Module, plan: FreezePlan, name: str, precision: TrainPrecision, steps: int,
            epochs: int = 1, lr: float = 1e-3, classes: int = 4) -> Trainer:
    """edgetl's training loop over ``model`` (fused AdamW on the plan's groups, warm-up-free cosine)."""
    optimizer = torch.optim.AdamW(build_param_groups(model, plan, get_card(name), lr=lr), fused=True)
    config = TrainConfig(epochs=epochs, lr=lr, progress=False, precision=precision)
    return Trainer(model, optimizer, make_scheduler(optimizer, steps, epochs, 0), config, CPU, classes)


def random_batches(images: int, batch: int, resolution: int, classes: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``images`` random images in batches of ``batch`` (the last one smaller), already in memory."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(min(batch, images - i), 3, resolution, resolution, generator=gen),
             torch.randint(0, classes, (min(batch, images - i),), generator=gen)) for i in range(0, images, batch)]


def bench(name: str, args: argparse.Namespace) -> None:
    base, plan = network(name)
    bf16 = resolve_precision("bf16", "cpu")
    start = time.perf_counter()
    chosen = choose_fp32_convs(base, bf16, args.resolution, args.batch_size, CPU)
    choice_s = time.perf_counter() - start
    variants = {"fp32": resolve_precision("fp32", "cpu"), "bf16": bf16, "bf16 + fp32 grouped": chosen}
    trainers = {k: trainer(copy.deepcopy(base), plan, name, p, args.steps) for k, p in variants.items()}
    batches = random_batches(args.steps * args.batch_size, args.batch_size, args.resolution)
    best = dict.fromkeys(trainers, float("inf"))
    for epoch in range(args.epochs + 1):
        for k, t in trainers.items():
            s = t.train_one_epoch(batches)["seconds"] * 1e3 / args.steps
            if epoch:  # the first epoch warms up
                best[k] = min(best[k], s)
    n = len(trainable_grouped_convs(base))
    print(f"{name:<28}{n:>4} {len(chosen.fp32_convs):>4} {choice_s:>8.2f}"
          + "".join(f"{best[k]:>10.1f}" for k in variants)
          + f"{best['bf16'] / best['bf16 + fp32 grouped']:>9.2f}x{best['fp32'] / best['bf16 + fp32 grouped']:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant, after one warm-up")
    args = parser.parse_args()
    os.environ["EDGETL_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgetl-bench-")  # time the choice from scratch
    print(f"training steps at {args.resolution} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}; best epoch of {args.epochs}, ms per step")
    print(f"{'model':<28}{'grp':>4} {'fp32':>4} {'choice s':>8}{'fp32':>10}{'bf16':>10}{'bf16+grp':>10}"
          f"{'vs bf16':>10}{'vs fp32':>9}")
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
