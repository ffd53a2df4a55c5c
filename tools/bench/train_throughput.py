"""Full fine-tuning throughput: edgetl's training loop against a plain hand-written fp32 PyTorch loop.

All loops train the same model (all layers, AdamW) on the same images with the same augmentation
(random resized crop, flip, small rotation), batch size and data-loading settings:

- **plain fp32**: torchvision ImageFolder + PIL transforms, NCHW float32, as a tutorial writes it;
- **edgetl fp32**: edgetl with ``precision_train="fp32"`` (channels-last) and ``image_cache=False``: the
  images are decoded every epoch, as the plain loop does;
- **edgetl fp32 + cache**: the same with the decoded-image cache: what ``auto`` does on a CPU without
  native bf16;
- **edgetl auto**: edgetl's defaults: bf16 autocast where the CPU has native bf16 (AMX or AVX-512 BF16),
  fp32 elsewhere, channels-last either way, and the decoded-image cache when the images fit a quarter of
  free RAM.

``--max-isa AVX2`` runs every loop as oneDNN would run it on an AVX2 CPU without bf16 (the ISA, not that
CPU's clocks or caches): it sets ``ONEDNN_MAX_CPU_ISA`` (and ATen's and MKL's matching caps, see
``isa_cap.py``) and restarts the script with them set (the libraries read them when they load).
edgetl's ``auto`` then trains in fp32.

Images/s is measured per epoch, data loading included; the first epoch of each run is a warm-up and
is left out. The runs are interleaved (plain, edgetl fp32, edgetl auto, plain, ...) because shared
machines drift; the best epoch of each loop is reported, with the median and the median epoch time.

    python tools/bench/train_throughput.py                 # resnet18, weights=None, 160 px
    python tools/bench/train_throughput.py --max-isa AVX2     # as on a CPU without bf16
    python tools/bench/train_throughput.py --model mobilenet_v3_small --resolution 96 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from isa_cap import describe_isa, restart_with_isa_cap
from torch import nn
from torchvision import datasets, models
from torchvision import transforms as T

from edgetl.data import make_demo_dataset
from edgetl.finetune import finetune
from edgetl.zoo.catalog import get_card


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


def edgetl_loop(args: argparse.Namespace, data: Path, out: Path, **options: object) -> tuple[list[float], str]:
    """edgetl's full fine-tuning through the public API.

    Returns:
        images/s of each epoch after the first, and what the run used (precision, image cache).
    """
    result = finetune(
        args.model, data, out, weights="none", strategy="full", augment="light", epochs=args.epochs,
        lr=args.lr, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed, device="cpu",
        workers=args.workers, patience=0, val_split=0.0, progress=False, **options,
    )
    m = result.metrics
    p = m["precision_train"]
    used = f"{p['dtype']}{' NHWC' if p['channels_last'] else ''}, cache {'on' if m['image_cache'] else 'off'}"
    return [e["images_per_s"] for e in m["epochs"][1:]], used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=64, help="demo training images per class")
    parser.add_argument("--image-size", type=int, default=192, help="side of the generated demo images")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    parser.add_argument("--max-isa", default=None,
                        help="cap oneDNN to this ISA (ONEDNN_MAX_CPU_ISA), e.g. AVX2: as on a CPU without bf16")
    args = parser.parse_args()
    restart_with_isa_cap(args.max_isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")

    images = 4 * args.per_class
    rates: dict[str, list[float]] = {"plain fp32": [], "edgetl fp32": [], "edgetl fp32+cache": [], "edgetl auto": []}
    used: dict[str, str] = {"plain fp32": "fp32, PIL every epoch"}
    with tempfile.TemporaryDirectory() as tmp:
        # train/ only: every loop sees exactly the same images (edgetl holds out nothing: val_split=0)
        demo = make_demo_dataset(Path(tmp) / "demo", num_classes=4, train_per_class=args.per_class,
                                 val_per_class=0, size=args.image_size, seed=args.seed)
        get_card(args.model)  # build the catalog cache outside the timings
        for i in range(args.repeats):
            rates["plain fp32"] += plain_loop(args, demo)
            r, used["edgetl fp32"] = edgetl_loop(args, demo / "train", Path(tmp) / f"fp32-{i}",
                                                 precision_train="fp32", image_cache=False)
            rates["edgetl fp32"] += r
            r, used["edgetl fp32+cache"] = edgetl_loop(args, demo / "train", Path(tmp) / f"cache-{i}",
                                                       precision_train="fp32", image_cache=True)
            rates["edgetl fp32+cache"] += r
            r, used["edgetl auto"] = edgetl_loop(args, demo / "train", Path(tmp) / f"auto-{i}")
            rates["edgetl auto"] += r
    _report(args, rates, used, images)


def _report(args: argparse.Namespace, rates: dict[str, list[float]], used: dict[str, str], images: int) -> None:
    print(f"\nfull fine-tuning throughput: {args.model}, {args.resolution} px (images {args.image_size} px), "
          f"batch {args.batch_size}, {images} images, {args.workers} workers, {torch.get_num_threads()} threads, CPU "
          f"({describe_isa()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()})")
    print(f"{'loop':<18}{'uses':<28}{'best img/s':>11}{'median img/s':>14}{'median epoch s':>16}{'epochs':>8}")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"{name:<18}{used[name]:<28}{max(r):>11.1f}{med:>14.1f}{images / med:>16.2f}{len(r):>8}")
    base = rates["plain fp32"]
    for name in ("edgetl fp32", "edgetl fp32+cache", "edgetl auto"):
        print(f"ratio {name} / plain fp32: {max(rates[name]) / max(base):.2f} (best), "
              f"{statistics.median(rates[name]) / statistics.median(base):.2f} (median)")


if __name__ == "__main__":
    main()
