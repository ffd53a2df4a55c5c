"""Full fine-tuning throughput: edgetl's training loop against a plain hand-written PyTorch loop.

Both train the same model (all layers, AdamW) on the same images with the same augmentation (random
resized crop, flip, small rotation), batch size and data-loading settings. Images/s is measured per
epoch, data loading included; the first epoch of each run is a warm-up and is left out. The runs are
interleaved (plain, edgetl, plain, edgetl, ...) because shared machines drift, and the best epoch of
each method is reported, with the median beside it.

    python tools/bench/train_throughput.py                 # resnet18, weights=None, 64 px
    python tools/bench/train_throughput.py --model mobilenet_v3_small --resolution 96 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models
from torchvision import transforms as T

from edgetl.catalog import get_card
from edgetl.data import make_demo_dataset
from edgetl.finetune import finetune


def plain_loop(args: argparse.Namespace, data: Path) -> list[float]:
    """A hand-written fine-tuning loop; returns images/s of each epoch after the first."""
    card = get_card(args.model)
    pre = card.preprocess.at_resolution(args.resolution)
    tf = T.Compose([
        T.RandomResizedCrop(pre.crop_size, scale=(0.5, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomRotation(10),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
    train_set = datasets.ImageFolder(str(data / "train"), tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    torch.manual_seed(args.seed)
    model = models.get_model(card.name, weights=None, num_classes=len(train_set.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(args.epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += labels.numel()
        if epoch:
            rates.append(seen / (time.perf_counter() - start))
    return rates


def edgetl_loop(args: argparse.Namespace, data: Path, out: Path) -> list[float]:
    """edgetl's full fine-tuning through the public API; returns images/s of each epoch after the first."""
    result = finetune(
        args.model, data, out, weights="none", strategy="full", augment="light", epochs=args.epochs,
        lr=args.lr, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed, device="cpu",
        workers=args.workers, patience=0, val_split=0.0, progress=False,
    )
    return [e["images_per_s"] for e in result.metrics["epochs"][1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=64, help="demo training images per class")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")

    plain: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # train/ only: both loops see exactly the same images (edgetl holds out nothing: val_split=0)
        demo = make_demo_dataset(Path(tmp) / "demo", num_classes=4, train_per_class=args.per_class,
                                 val_per_class=0, size=64, seed=args.seed)
        get_card(args.model)  # build the catalog cache outside the timings
        for i in range(args.repeats):
            plain += plain_loop(args, demo)
            ours += edgetl_loop(args, demo / "train", Path(tmp) / f"run{i}")

    print(f"\nfull fine-tuning throughput: {args.model}, {args.resolution} px, batch {args.batch_size}, "
          f"{4 * args.per_class} images, {args.workers} workers, {torch.get_num_threads()} threads, CPU")
    print(f"{'loop':<22}{'best img/s':>12}{'median img/s':>14}{'epochs':>8}")
    for name, rates in (("plain PyTorch", plain), ("edgetl", ours)):
        print(f"{name:<22}{max(rates):>12.1f}{statistics.median(rates):>14.1f}{len(rates):>8}")
    print(f"ratio edgetl / plain: {max(ours) / max(plain):.2f} (best), "
          f"{statistics.median(ours) / statistics.median(plain):.2f} (median)   (target: >= 1.0)")


if __name__ == "__main__":
    main()
