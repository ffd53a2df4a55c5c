"""The firmware build step of tools/build_artifact.sh, through the Python API.

    python tools/api_example.py PIPELINE.yaml FIRMWARE_DIR [--out BUILD_OUT]

Runs ``edgetl.build`` (select -> finetune -> export -> validate, skipping unchanged stages), stops with
exit code 3 when the model misses a budget (the firmware tree is left untouched), and otherwise copies
the artifact into ``FIRMWARE_DIR/model/`` (assembled beside it and swapped in whole, so no file of an older
artifact survives) and ``model_data.h`` into ``FIRMWARE_DIR/include/`` (a temporary name, then a rename).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import edgetl
from edgetl.errors import EdgetlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def install_file(src: Path, dest_dir: Path) -> Path:
    """Copy ``src`` into ``dest_dir`` atomically: a temporary name in the same folder, then a rename."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", dir=dest_dir)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, dest_dir / src.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest_dir / src.name


def install_folder(files: list[Path], dest: Path) -> None:
    """Put exactly ``files`` in ``dest``: assembled in a hidden folder beside it and swapped in whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        for file in files:
            install_file(file, stage)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
            os.replace(stage, dest)
            shutil.rmtree(old)
        else:
            os.replace(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="the build file (PIPELINE.yaml), with export: {c_header: true}")
    parser.add_argument("firmware", type=Path, help="the firmware tree to copy the artifact into")
    parser.add_argument("--out", default=None, help="build folder [default: the build file's out:]")
    args = parser.parse_args(argv)

    try:
        result = edgetl.build(args.pipeline, out=args.out, check=False, progress=lambda m: print(m, file=sys.stderr))
    except EdgetlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    for stage in result.stages:
        print(f"{stage.name:9s} {stage.status:8s} {stage.reason}")
    if not result.passed:
        print(f"budget missed: {'; '.join(result.failures)}; firmware not updated (see {result.report})",
              file=sys.stderr)
        return 3

    header = result.artifact / "model_data.h"
    if not header.is_file():
        print(f"error: {result.artifact} has no model_data.h; set 'export: {{c_header: true}}' in {args.pipeline}",
              file=sys.stderr)
        return 1
    files = [f for f in sorted(result.artifact.iterdir()) if f.is_file() and f.name != header.name]
    install_folder(files, args.firmware / "model")
    install_file(header, args.firmware / "include")
    latency = result.validation["latency"]
    print(f"copied {result.artifact} into {args.firmware}: {result.model}, p50 {latency['p50_ms']} ms here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
