"""``validate --on ssh://`` against ``validate`` here, on the same artifact: does the board loop measure what a local
run measures, and what does the trip cost?

The "board" is this machine behind a real OpenSSH server on 127.0.0.1, with a Python that has numpy, Pillow and
ONNX Runtime only (``tests/sshboard.py``), so both runs time the same CPU and any difference is the loop's. Local and
remote runs alternate (local, remote, local, remote, ...; ``--repeats`` pairs) so drift on a shared machine hits
both alike. Printed: p50 both ways (median over the repeats, with the spread min-max), the ratio, top-1 on a small
labelled set, the golden verdict, the overhead (the remote run's wall time minus the local run's), and how many
images ``predict`` and ``predict --on`` give the same top-1.

Targets: p50 within 10%, the same top-1 and golden verdict, overhead <= 5 s for a small model.

    python tools/bench/remote_validate.py                       # resnet18 at 64 px, 3 pairs of 100 runs
    python tools/bench/remote_validate.py --model mobilenet_v3_small --resolution 96 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from sshboard import loopback_board, skip_reason

from edgetl.export.api import export
from edgetl.predict import predict
from edgetl.runtime.ssh import CONFIG_ENV
from edgetl.validate import validate


def _dataset(root: Path, labels: list[str], per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name in labels[:2]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _once(artifact: Path, data: Path, report: Path, args: argparse.Namespace, **remote: str) -> dict:
    start = time.perf_counter()
    r = validate(artifact, data=data, iterations=args.iterations, warmup=args.warmup, report=report, check=False,
                 **remote)
    return {"seconds": time.perf_counter() - start, "p50_ms": r.latency["p50_ms"], "cv": r.latency["cv"],
            "top1": r.accuracy["top1"], "golden": r.golden["status"], "memory_mb": r.memory["runtime_mb"]}


def _agreement(artifact: Path, images: list[Path], board) -> int:
    """Images whose top-1 is the same from ``predict`` here and ``predict --on`` the board."""
    here = predict(artifact, images, top=1)
    there = predict(artifact, images, top=1, on=board.url, device_python=str(board.python))
    return sum(a.label == b.label for a, b in zip(here, there, strict=True))


def _summary(runs: list[dict]) -> dict:
    p50 = [r["p50_ms"] for r in runs]
    return {"p50_ms": statistics.median(p50), "p50_min": min(p50), "p50_max": max(p50),
            "seconds": statistics.median(r["seconds"] for r in runs), "top1": sorted({r["top1"] for r in runs}),
            "golden": sorted({r["golden"] for r in runs}), "memory_mb": [r["memory_mb"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (local, then remote)")
    parser.add_argument("--images", type=int, default=10, help="images per class (2 classes)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    reason = skip_reason()
    if reason:
        sys.exit(f"no loopback board: {reason}")
    with tempfile.TemporaryDirectory() as tmp, loopback_board() as board:
        root = Path(tmp)
        art = export(args.model, root / "artifact", precision="fp32", weights="none", resolution=args.resolution,
                     rounds=2, simplify=False)
        labels = json.loads((art.path / "labels.json").read_text())
        data = _dataset(root / "data", labels, args.images)
        os.environ[CONFIG_ENV] = str(board.config)
        local, remote = [], []
        for i in range(args.repeats):
            local.append(_once(art.path, data, root / f"local{i}.json", args))
            remote.append(_once(art.path, data, root / f"remote{i}.json", args, on=board.url,
                                device_python=str(board.python)))
            print(f"pair {i + 1}: local p50 {local[-1]['p50_ms']:.3f} ms in {local[-1]['seconds']:.1f} s; remote "
                  f"p50 {remote[-1]['p50_ms']:.3f} ms in {remote[-1]['seconds']:.1f} s", flush=True)
        images = sorted(data.rglob("*.png"))
        agree = _agreement(art.path, images, board)
    here, there = _summary(local), _summary(remote)
    ratio = there["p50_ms"] / here["p50_ms"]
    overhead = statistics.median(r["seconds"] - h["seconds"] for h, r in zip(local, remote, strict=True))
    print(f"\n{args.model} at {args.resolution} px, fp32, {args.iterations} runs + {args.warmup} warm-up, "
          f"{2 * args.images} images, {args.repeats} interleaved pairs")
    for name, s in (("local", here), ("--on", there)):
        print(f"{name:6s} p50 {s['p50_ms']:.3f} ms (spread {s['p50_min']:.3f}-{s['p50_max']:.3f}), top-1 "
              f"{s['top1']}, golden {s['golden']}, memory {s['memory_mb']} MB, wall {s['seconds']:.1f} s")
    print(f"p50 remote/local {ratio:.3f} (target 0.90-1.10); same top-1: {here['top1'] == there['top1']}; "
          f"same golden verdict: {here['golden'] == there['golden']}; overhead {overhead:.1f} s (target <= 5 s)")
    print(f"predict here and --on: the same top-1 on {agree}/{len(images)} images (weights are random, so top-1 "
          "against the folders means little; the per-image agreement is what says both ran the same model)")
    if args.json:
        args.json.write_text(json.dumps({"local": local, "remote": remote, "ratio": ratio, "overhead_s": overhead,
                                         "top1_agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
