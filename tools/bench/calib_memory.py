"""Peak memory of INT8 calibration against the number of calibration images.

Runs ``edgetl export MODEL --weights none --precision int8 --calib-method METHOD --calib-size N``
(random weights: memory does not depend on them) once per N, each in its own process under
``/usr/bin/time -v``, on a synthetic class-folder dataset at the model's resolution, and reads the
process's peak RSS ("Maximum resident set size"). Calibration streams one batch at a time into ONNX
Runtime's calibrator (running min/max, merged histograms), so the peak should not grow with N.

Targets (issue 12): resnet50 at 224 px, entropy, 300 images: peak RSS under 3 GB and under 1.5x
the peak with 50 images.

    python tools/bench/calib_memory.py                      # resnet50, entropy, 50 and 300 images
    python tools/bench/calib_memory.py --sizes 50 300 --method percentile --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetl.data import make_demo_dataset

TARGET_GB = 3.0
TARGET_RATIO = 1.5
_RSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


def peak_rss_gb(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd`` under ``/usr/bin/time -v``; return (peak RSS in GB, wall seconds, exit code)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    match = _RSS.search(proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", proc.stderr)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.group(1).split(":")))) if wall else 0.0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
    return (int(match.group(1)) / 2**20 if match else float("nan")), seconds, proc.returncode


def export_cmd(model: str, method: str, size: int, data: Path, out: Path, resolution: int) -> list[str]:
    """The export command line that calibrates ``size`` images of ``data``."""
    return [sys.executable, "-m", "edgetl", "export", model, "--out", str(out), "--weights", "none",
            "--precision", "int8", "--calib-method", method, "--calib-size", str(size), "--calib-data",
            str(data), "--resolution", str(resolution), "--rounds", "3", "--force"]


def main() -> None:
    """Measure, print one line per size, and check the targets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--method", default="entropy", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 300])
    ap.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetl-calib-mem-") as tmp:
        per_class = -(-max(args.sizes) // 4)
        data = make_demo_dataset(Path(tmp) / "demo", num_classes=4, train_per_class=per_class, val_per_class=0,
                                 size=args.resolution) / "train"
        for n in args.sizes:
            cmd = export_cmd(args.model, args.method, n, data, Path(tmp) / f"art-{n}", args.resolution)
            gb, seconds, code = peak_rss_gb(cmd)
            rows.append({"images": n, "peak_rss_gb": round(gb, 3), "seconds": round(seconds, 1), "exit": code})
            print(f"{args.model} {args.resolution}px {args.method} {n:4d} images: peak RSS {gb:.2f} GB, "
                  f"{seconds:.0f} s, exit {code}", flush=True)
    smallest, largest = rows[0], rows[-1]
    ratio = largest["peak_rss_gb"] / smallest["peak_rss_gb"]
    ok = largest["peak_rss_gb"] < TARGET_GB and ratio < TARGET_RATIO
    print(f"{largest['images']} vs {smallest['images']} images: {ratio:.2f}x (target < {TARGET_RATIO}x), "
          f"{largest['peak_rss_gb']:.2f} GB (target < {TARGET_GB} GB): {'met' if ok else 'MISSED'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": args.model, "method": args.method,
                                                   "resolution": args.resolution, "rows": rows,
                                                   "ratio": round(ratio, 3), "targets_met": ok}, indent=2))


if __name__ == "__main__":
    main()
