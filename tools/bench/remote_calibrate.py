"""``device calibrate --on ssh://`` against ``device calibrate`` here: do the two profiles predict the same latency?

Calibrates this machine and a board over SSH with the same models, threads, rounds and kernel samples, then predicts
every architecture ``select`` ranks with each profile (through :func:`edgetl.select.select` itself: the prediction
select uses, at the resolution it uses) and compares the two: the share within ±5% and ±10%, the median ratio
(board / local), the worst 5, the time each calibration took, and, for the board, what it sent and the time its jobs
spent beyond measuring (sending, unpacking, connecting, starting the runner). Target (issue 22): within 10% for 90%
of the catalog, against a board that is this machine (``--loopback``).

With ``--repeat-local`` the second calibration is a local one too: the same figures for two calibrations in a row
(issue 24), i.e. the noise a board comparison is judged against.

    python tools/bench/remote_calibrate.py --loopback           # a board on 127.0.0.1 (tests/sshboard.py: OpenSSH's
                                                                # sshd, a Python with numpy, Pillow, onnxruntime only)
    python tools/bench/remote_calibrate.py --on ssh://pi@raspberrypi.local --device-python python3   # needs: a board
    python tools/bench/remote_calibrate.py --repeat-local       # two local calibrations in a row
    python tools/bench/remote_calibrate.py --loopback --models resnet18 mobilenet_v3_small squeezenet1_1 \\
        shufflenet_v2_x0_5 --kernel-models resnet18 mobilenet_v3_small --resolution 64 --kernel-samples 8 --rounds 3
                                                                # a smoke run (a minute or two; no figures)

A loopback board shares this machine's cores with the local calibration, one after the other: run it on a quiet
machine. The board's files are cached on it (``~/.cache/edgetl/board-models``; the loopback board's cache goes with
it), so a second run against the same real board sends nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from edgetl.board.calibrate import calibrate_on_board
from edgetl.board.jobs import Remote
from edgetl.calibrate.api import CALIBRATION_MODELS, CalibrationResult, calibrate
from edgetl.options import KERNEL_SAMPLES
from edgetl.runtime.ssh import CONFIG_ENV
from edgetl.select import select


@contextlib.contextmanager
def _board(args: argparse.Namespace) -> Iterator[Remote]:
    """The board to calibrate: ``--on``, or a loopback one started here for the run."""
    if not args.loopback:
        yield Remote(args.on, args.device_python)
        return
    from sshboard import loopback_board, skip_reason

    reason = skip_reason()
    if reason:
        sys.exit(f"no loopback board: {reason}")
    with loopback_board() as board:
        before = os.environ.get(CONFIG_ENV)
        os.environ[CONFIG_ENV] = str(board.config)
        try:
            yield Remote(board.url, board.python)
        finally:
            if before is None:
                del os.environ[CONFIG_ENV]
            else:
                os.environ[CONFIG_ENV] = before


def _predictions(result: CalibrationResult, resolution: int | None) -> dict[str, float]:
    """Predicted latency (ms) of every architecture select ranks with this profile, by its catalog name."""
    ranking = select(device=result.profile, precision="fp32", max_latency_ms="none",
                     **({"resolution": resolution} if resolution else {}))
    return {row.card.name: row.latency_ms for row in ranking.candidates}


def _compare(first: dict[str, float], second: dict[str, float], label: str) -> None:
    """Print how far ``second``'s predictions are from ``first``'s."""
    ratios = {m: second[m] / first[m] for m in first if m in second and first[m] > 0}
    if not ratios:
        print("no architecture predicted by both profiles")
        return
    within = {p: 100 * sum(abs(r - 1) <= p for r in ratios.values()) / len(ratios) for p in (0.05, 0.10)}
    print(f"\n{label}: {len(ratios)} architectures (every one select ranks), batch 1, fp32")
    print(f"  within ±5%: {within[0.05]:.1f}%   within ±10%: {within[0.10]:.1f}% (target: 90%)   "
          f"median ratio: {statistics.median(ratios.values()):.3f}")
    print("  worst 5 (ratio, local ms, other ms): " + ", ".join(
        f"{m} {r:.2f} ({first[m]:.2f}, {second[m]:.2f})"
        for m, r in sorted(ratios.items(), key=lambda kv: -abs(kv[1] - 1))[:5]))


def _calibrate_here(name: str, folder: Path, args: argparse.Namespace) -> tuple[CalibrationResult, float]:
    start = time.monotonic()
    result = calibrate(name=name, out=folder / f"{name}.yaml", models=args.models, threads=args.threads,
                       rounds=args.rounds, resolution=args.resolution, kernel_models=args.kernel_models,
                       kernel_samples=args.kernel_samples)
    return result, time.monotonic() - start


def _calibrate_there(folder: Path, args: argparse.Namespace) -> tuple[CalibrationResult, float]:
    start = time.monotonic()
    with _board(args) as remote:
        result, sent = calibrate_on_board(remote, "bench-board", folder / "bench-board.yaml", models=args.models,
                                          threads=args.threads, rounds=args.rounds, resolution=args.resolution,
                                          kernel_samples=args.kernel_samples, kernel_models=args.kernel_models)
    seconds = time.monotonic() - start
    print(f"board calibration: {seconds:.0f} s; sent {sent.files} files ({sent.megabytes:.0f} MB); its jobs took "
          f"{sent.jobs_s:.0f} s, of which {sent.board_s:.0f} s measuring on the board and {sent.overhead_s:.0f} s "
          "beyond (sending, unpacking, connecting, starting the runner)")
    return result, seconds


def _noise(result: CalibrationResult) -> str:
    return result.noise.text() + (" (NOISY)" if result.noise.noisy else "") if result.noise else "no kernel timings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--on", help="the board: ssh://[user@]host[:port]")
    where.add_argument("--loopback", action="store_true", help="start a board on 127.0.0.1 for the run")
    where.add_argument("--repeat-local", action="store_true", help="two local calibrations in a row, no board")
    parser.add_argument("--device-python", default=None, help="the board's interpreter (with --on)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads [default: every core]")
    parser.add_argument("--rounds", type=int, default=25, help="timed runs per model")
    parser.add_argument("--resolution", type=int, default=None,
                        help="calibrate and predict at this size [default: each model's own]")
    parser.add_argument("--models", nargs="+", default=list(CALIBRATION_MODELS), help="calibration models")
    parser.add_argument("--kernel-models", nargs="+", default=None,
                        help="models the micro-graphs are sampled from [default: the whole catalog]")
    parser.add_argument("--kernel-samples", type=int, default=KERNEL_SAMPLES, help="micro-graphs to time")
    parser.add_argument("--keep", type=Path, default=None, help="write the two profiles into this folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgetl-bench-cal-") as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        local, local_s = _calibrate_here("bench-local", Path(tmp), args)
        print(f"local calibration: {local_s:.0f} s; noise: {_noise(local)}")
        if args.repeat_local:
            other, other_s = _calibrate_here("bench-local-again", Path(tmp), args)
            print(f"second local calibration: {other_s:.0f} s; noise: {_noise(other)}")
            label = "two local calibrations in a row (second / first)"
        else:
            other, other_s = _calibrate_there(Path(tmp), args)
            print(f"board noise: {_noise(other)}")
            label = "board calibration against the local one (board / local)"
        _compare(_predictions(local, args.resolution), _predictions(other, args.resolution), label)


if __name__ == "__main__":
    main()
