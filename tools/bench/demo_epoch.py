"""Epoch time on the demo data: this checkout's fine-tuning against another checkout's (e.g. an older commit).

Both train the demo's from-scratch configuration (``edgetl demo --weights none``: ResNet-18, random
weights, ``full``, 64 px, batch 32, the demo's LR) on the same demo dataset (4 texture classes, 48
training images each, 64 px, written once by this checkout), each with its own defaults for everything
else. Each run is a fresh process (``PYTHONPATH`` = the checkout) calling ``edgetl.finetune.finetune``;
the runs alternate (this, other, this, ...) because shared machines drift. The time of an epoch is
``metrics.json``'s ``epochs[*].seconds``: the training pass, data loading included, validation not.
The first epoch of each run is a warm-up and is left out.

Then the floor: this checkout's training steps alone, on the same number of in-memory images (random tensors
already on the device, no data loading), with edgetl's ``Trainer`` and the precision ``auto`` picks; an epoch
of the real loop cannot be faster than that.

    git worktree add /tmp/old <commit>
    python tools/bench/demo_epoch.py --against /tmp/old
    python tools/bench/demo_epoch.py --against /tmp/old --max-isa AVX2   # as on a CPU without bf16
    git worktree remove /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from conv_dtype import network, random_batches, trainer
from isa_cap import describe_isa, restart_with_isa_cap

from edgetl.data.synthetic import make_demo_dataset
from edgetl.demo import demo_config
from edgetl.finetune.precision import resolve_precision

HERE = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
import edgetl
from edgetl.finetune import finetune
print(edgetl.__file__)
finetune(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, **json.loads(sys.argv[4]))
"""


def run_once(checkout: Path, data: Path, out: Path, options: dict) -> dict:
    """Fine-tune in a fresh process with ``checkout`` first on the path; return its ``metrics.json``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", CHILD, "resnet18", str(data), str(out), json.dumps(options)],
                          env=env, cwd=checkout, check=True, stdout=subprocess.PIPE, text=True)
    imported = Path(done.stdout.splitlines()[0])
    if not imported.is_relative_to(checkout):
        raise SystemExit(f"the run meant for {checkout} imported {imported}")
    return json.loads((out / "metrics.json").read_text())


def describe(metrics: dict) -> str:
    """What a run trained in (older checkouts do not record it: fp32, NCHW, decoded every epoch)."""
    p = metrics.get("precision_train")
    if p is None:
        return "fp32, cache off (not recorded)"
    return f"{p['dtype']}{' NHWC' if p['channels_last'] else ''}, cache {'on' if metrics.get('image_cache') else 'off'}"


def steps_alone(options: dict, images: int, epochs: int) -> float:
    """The best epoch (s) of this checkout's training steps on ``images`` in-memory images: no data loading."""
    model, plan = network("resnet18")
    precision = resolve_precision("auto", "cpu")
    batches = random_batches(images, int(options["batch_size"]), int(options["resolution"]))
    loop = trainer(model, plan, "resnet18", precision, len(batches), epochs, float(options["lr"]))
    return min(loop.train_one_epoch(batches)["seconds"] for _ in range(epochs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="the root of the checkout to compare with")
    parser.add_argument("--epochs", type=int, default=8, help="per run (the demo's); the first is a warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each checkout")
    parser.add_argument("--train-per-class", type=int, default=48, help="the demo's")
    parser.add_argument("--max-isa", default=None,
                        help="cap oneDNN to this ISA (ONEDNN_MAX_CPU_ISA), e.g. AVX2: as on a CPU without bf16")
    args = parser.parse_args()
    restart_with_isa_cap(args.max_isa)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    options = demo_config(args.epochs, pretrained=False)["finetune"]
    checkouts = {"this": HERE, "other": args.against.resolve()}
    seconds: dict[str, list[float]] = {name: [] for name in checkouts}
    used: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        per = args.train_per_class  # the split sizes of edgetl.demo.write_demo
        data = make_demo_dataset(Path(tmp) / "data", num_classes=4, train_per_class=per,
                                 val_per_class=max(2, per // 3), test_per_class=max(2, per // 6), size=64, seed=0)
        for i in range(args.repeats):
            for name, checkout in checkouts.items():
                metrics = run_once(checkout, data, Path(tmp) / f"{name}-{i}", options)
                seconds[name] += [e["seconds"] for e in metrics["epochs"][1:]]
                used[name] = describe(metrics)
    print(f"\ndemo epoch time: resnet18 from scratch, {options['resolution']} px, batch {options['batch_size']}, "
          f"{4 * args.train_per_class} training images, {args.epochs} epochs x {args.repeats} runs ({describe_isa()})")
    print(f"{'checkout':<40}{'uses':<34}{'best s':>8}{'median s':>10}{'epochs':>8}")
    for name, checkout in checkouts.items():
        s = seconds[name]
        print(f"{checkout!s:<40}{used[name]:<34}{min(s):>8.2f}{statistics.median(s):>10.2f}{len(s):>8}")
    this, other = seconds["this"], seconds["other"]
    print(f"epoch time this / other: {min(this) / min(other):.2f} (best), "
          f"{statistics.median(this) / statistics.median(other):.2f} (median)")
    floor = steps_alone(options, 4 * args.train_per_class, args.epochs)
    print(f"this checkout's training steps alone (in-memory images, no data loading): best epoch {floor:.2f} s, "
          f"{floor / min(other):.2f} of the other checkout's best epoch")


if __name__ == "__main__":
    main()
