"""edgetl's cached linear probe against the naive loop, on the same data, seed and epochs.

The naive way (the "ConvNet as fixed feature extractor" tutorial loop): freeze the backbone, replace
the head, and run a full forward pass over every image in every epoch, training only the head.
edgetl's linear probe runs the backbone once, caches the features and trains the head on the cache.
Both keep the frozen backbone in eval mode, train the same head with AdamW for the same number of
epochs, and evaluate on the validation set after every epoch. Wall-clock time covers everything a
user waits for: building the model, reading the images, training, evaluating (and, for edgetl,
checkpoints, metrics and plots).

    python tools/bench/linear_probe.py                        # resnet18, weights=None, 64 px, 10 epochs
    python tools/bench/linear_probe.py --threads 1 --skip-uncached
    python tools/bench/linear_probe.py --resolution 112 --data DIR --weights imagenet
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models
from torchvision import transforms as T

from edgetl.data import make_demo_dataset
from edgetl.finetune import finetune
from edgetl.zoo.catalog import get_card
from edgetl.zoo.weights import load_model


def naive_linear_probe(args: argparse.Namespace, data: Path) -> tuple[float, float]:
    """The tutorial loop; returns (seconds, final validation accuracy)."""
    start = time.perf_counter()
    card = get_card(args.model)
    pre = card.preprocess.at_resolution(args.resolution)
    tf = T.Compose([
        T.Resize(pre.resize_size, antialias=True), T.CenterCrop(pre.crop_size), T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
    train_set = datasets.ImageFolder(str(data / "train"), tf)
    val_set = datasets.ImageFolder(str(data / "val"), tf)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=g)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size)

    torch.manual_seed(args.seed)
    if args.weights == "none":
        model = models.get_model(card.name, weights=None)
    else:  # the same weights edgetl loads (offline folder / torch hub cache)
        model = load_model(card, args.weights).model
    for p in model.parameters():
        p.requires_grad = False
    torch.manual_seed(args.seed)
    model.fc = nn.Linear(model.fc.in_features, len(train_set.classes))
    optimizer = torch.optim.AdamW(model.fc.parameters(), lr=args.lr, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss()
    accuracy = 0.0
    for _ in range(args.epochs):
        model.eval()  # frozen BatchNorm stays in eval mode; only the head trains
        for images, labels in train_loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
                total += labels.numel()
        accuracy = correct / total
    return time.perf_counter() - start, accuracy


def edgetl_linear_probe(
    args: argparse.Namespace, data: Path, out: Path, cache: bool = True
) -> tuple[float, float, dict]:
    """edgetl's probe through the public API; returns (seconds, val accuracy, result)."""
    start = time.perf_counter()
    result = finetune(
        args.model, data, out, weights=args.weights, strategy="linear", epochs=args.epochs, lr=args.lr,
        resolution=args.resolution, batch_size=args.batch_size, seed=args.seed, device="cpu", patience=0,
        feature_cache=cache, progress=False,
    )
    return time.perf_counter() - start, result.val_accuracy, result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a catalog model whose head is `fc` (resnets)")
    parser.add_argument("--weights", default="none", help="none, imagenet (needs the file offline) or PATH")
    parser.add_argument("--data", type=Path, default=None, help="a folder with train/ and val/ [default: demo]")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=64, help="demo training images per class (val: half)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    parser.add_argument("--skip-uncached", action="store_true",
                        help="skip edgetl without the cache (the same computation, to show the accuracy is equal)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_demo_dataset(Path(tmp) / "demo", num_classes=4, train_per_class=args.per_class,
                                              val_per_class=args.per_class // 2, size=64, seed=args.seed)
        get_card(args.model)  # build the catalog cache outside the timings
        naive_s, naive_acc = naive_linear_probe(args, data)
        rows.append(("naive loop (forward every epoch)", naive_s, naive_acc))
        cached_s, cached_acc, result = edgetl_linear_probe(args, data, Path(tmp) / "cached")
        assert result["feature_cache"], "the linear probe did not use the feature cache"
        rows.append(("edgetl (feature cache)", cached_s, cached_acc))
        if not args.skip_uncached:
            s, acc, _ = edgetl_linear_probe(args, data, Path(tmp) / "uncached", cache=False)
            rows.append(("edgetl --no-feature-cache", s, acc))

    print(f"\nlinear probe: {args.model} (weights={args.weights}), {args.resolution} px, {args.epochs} epochs, "
          f"batch {args.batch_size}, seed {args.seed}, {torch.get_num_threads()} threads, CPU, "
          f"{result['classes'].__len__()} classes")
    print(f"{'method':<34}{'wall-clock (s)':>16}{'val accuracy':>15}{'speed-up':>10}")
    for name, seconds, acc in rows:
        print(f"{name:<34}{seconds:>16.2f}{100 * acc:>14.1f}%{naive_s / seconds:>9.1f}x")
    print(f"edgetl cache vs naive: {naive_s / cached_s:.1f}x faster, accuracy {100 * (cached_acc - naive_acc):+.1f} "
          "points (target: >= 5x, within 1 point)")


if __name__ == "__main__":
    main()
