"""Bad inputs and faults, as a new user and a hostile one would try them, against the real CLI.

Every case runs the CLI's entry point in a process of its own (forked from a helper that imported
edgetl once, see :class:`Zygote`; without ``EDGETL_DEBUG``, so the user-facing error path is what
runs) and checks:

- the exit code;
- no traceback on stderr, and a message that names the problem;
- with ``--json``, stdout is one valid JSON document or empty (an error prints nothing on stdout);
- no user file changed: the case's folder and the shared dataset, run and artifact have the same
  files, sizes and modification times before and after.

A trained run and an INT8 artifact (mobilenet_v3_small, random weights, 32 px, one epoch) are made
once for the module; a case that tampers with one works on its own copy.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from clirun import cli_env as _env
from clirun import edgetl_cli as edgetl

from edgetl.cli import EdgetlGroup
from edgetl.data import make_demo_dataset, scan_dataset
from edgetl.data.splits import sorted_classes
from edgetl.errors import DataError, EdgetlError
from edgetl.export import bundle
from edgetl.folders import BUILD_LOCK_FILE, LOCK_FILE

MODEL = "mobilenet_v3_small"
TRAIN = ["--weights", "none", "--epochs", "1", "--resolution", "32", "--batch-size", "4"]


@dataclass
class World:
    root: Path
    data: Path
    run: Path
    art: Path

    def shared(self) -> list[Path]:
        return [self.data, self.run, self.art]


# Importing torch costs seconds per process on a busy 2-core machine, and the suite runs ~80 CLI
# processes. A helper process imports edgetl's stage modules once, then forks one child per case:
# the child chdirs, points its fds 1 and 2 at files and runs the console-script entry point
# ``edgetl.cli.main()`` with the case's argv, as ``python -m edgetl`` does, and exits with its code.
_ZYGOTE = r"""
import json, os, signal, sys
import edgetl.cli, edgetl.finetune.api, edgetl.export.api, edgetl.validate, edgetl.pipeline  # noqa: F401
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        os.environ.update(req.get("env", {}))
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["edgetl", *req["args"]]
        signal.alarm(req.get("timeout", 0))  # a case that must not hang is killed by SIGALRM (exit -14)
        code = 0
        try:
            edgetl.cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """One pre-imported Python process that forks a fresh CLI process per case (see ``_ZYGOTE``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env())

    def run(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 0) -> subprocess.CompletedProcess:
        out, err = cwd / ".." / f"{cwd.name}.stdout", cwd / ".." / f"{cwd.name}.stderr"
        request = {"args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "env": env or {},
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli_process():
    zygote = Zygote()
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A dataset, a trained run and an INT8 artifact with a C header, made once (through the Python API)."""
    import edgetl as api

    root = tmp_path_factory.mktemp("bad-inputs")
    data = make_demo_dataset(root / "data", num_classes=3, train_per_class=6, val_per_class=3, size=32)
    run = api.finetune(MODEL, data, root / "run", weights="none", epochs=1, resolution=32, batch_size=4,
                       progress=False).run_dir
    art = api.export(run, root / "art", precision="int8", device="x86", rounds=2, c_header=True,
                     calibration={"size": 8}).path
    return World(root, data, run, art)


# --- helpers that prepare a case --------------------------------------------------------------------


def _rehash(art: Path) -> None:
    """Re-sign a tampered artifact as export would: file hashes, then the manifest's digest.

    What remains is a self-consistent-looking manifest, so only validate's consistency checks can tell.
    """
    manifest = json.loads((art / bundle.MANIFEST_FILE).read_text())
    for name, record in manifest["files"].items() if isinstance(manifest.get("files"), dict) else ():
        if isinstance(record, dict) and (art / name).is_file():
            manifest["files"][name] = bundle.file_record(art / name)
    (art / bundle.MANIFEST_FILE).write_text(json.dumps(manifest))
    (art / bundle.DIGEST_FILE).write_text(bundle.manifest_digest(manifest) + "\n")


def _art(w: World, d: Path) -> Path:
    art = d / "art"
    shutil.copytree(w.art, art)
    return art


def _edit_manifest(art: Path, change: Callable[[dict], None], rehash: bool = True) -> None:
    manifest = json.loads((art / bundle.MANIFEST_FILE).read_text())
    change(manifest)
    (art / bundle.MANIFEST_FILE).write_text(json.dumps(manifest))
    if rehash:
        _rehash(art)


def _user_folder(d: Path) -> Path:
    folder = d / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / "model.onnx").write_text("not edgetl's\n")
    return folder


def _classes(d: Path, layout: dict[str, int], size: int = 32) -> Path:
    """Class folders ``{class: n_images}`` under ``d/data``, copied from the demo generator."""
    src = make_demo_dataset(d / "_gen", num_classes=max(2, len(layout)), train_per_class=max(layout.values()),
                            val_per_class=0, size=size)
    data = d / "data"
    for (name, n), gen in zip(layout.items(), sorted((src / "train").iterdir()), strict=False):
        (data / name).mkdir(parents=True)
        for img in sorted(gen.iterdir())[:n]:
            shutil.copy(img, data / name / img.name)
    shutil.rmtree(d / "_gen")
    return data


def _csv(w: World, d: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    path = d / "labels.csv"
    path.write_bytes("\n".join(rows).encode(encoding) + b"\n")
    return path


def _train_imgs(w: World, cls_index: int) -> list[Path]:
    folder = sorted((w.data / "train").iterdir())[cls_index]
    return sorted(folder.iterdir())


def _csv_rows(w: World) -> list[str]:
    return [f"{p},{p.parent.name}" for i in range(3) for p in _train_imgs(w, i)]


def _finetune(data: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["finetune", "--model", MODEL, "--data", str(data), "--out", str(out), *TRAIN, *extra]


def _build_file(d: Path, w: World, **overrides) -> Path:
    doc = {"device": "x86", "model": MODEL, "data": str(w.data), "out": str(d / "build"),
           "finetune": {"epochs": 1, "resolution": 32, "weights": "none"}}
    doc.update(overrides)
    path = d / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class _HeldLock:
    """A lock held by this (test) process, so the CLI subprocess meets a real second writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a+")  # noqa: SIM115 - held until the case ends
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


_held: list[_HeldLock] = []


def _hold(path: Path) -> None:
    _held.append(_HeldLock(path))


# --- setups: each returns the CLI arguments ---------------------------------------------------------


def _symlink_loop(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4, "c": 4})
    (data / "a" / "loop").symlink_to("..")  # a/loop/b/... would list b's images as a's
    return _finetune(data, d / "out")


def _link_to_other_class(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4, "c": 4})
    (data / "a" / "stolen.png").symlink_to(sorted((data / "b").iterdir())[0])
    return _finetune(data, d / "out")


def _hard_link_to_other_class(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4, "c": 4})
    os.link(sorted((data / "b").iterdir())[0], data / "a" / "stolen.png")
    return _finetune(data, d / "out")


def _copy_in_two_classes(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4, "c": 4})
    shutil.copy(sorted((data / "b").iterdir())[0], data / "a" / "copied.png")
    return _finetune(data, d / "out")


def _link_across_splits(w: World, d: Path) -> list[str]:
    data = d / "data"
    shutil.copytree(w.data, data)
    val_img = sorted((data / "val" / "circle").iterdir())[0] if (data / "val" / "circle").is_dir() else None
    val_img = val_img or sorted(sorted((data / "val").iterdir())[0].iterdir())[0]
    train_cls = data / "train" / val_img.parent.name
    (train_cls / "leak.png").symlink_to(val_img)
    return _finetune(data, d / "out")


def _non_utf8_file(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4})
    src = sorted((data / "a").iterdir())[0]
    os.rename(src, os.path.join(os.fsencode(data / "a"), b"caf\xe9.png"))
    return _finetune(data, d / "out")


def _non_utf8_class(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4})
    os.rename(data / "b", os.path.join(os.fsencode(data), b"\xff\xfeclass"))
    return _finetune(data, d / "out")


def _csv_latin1(w: World, d: Path) -> list[str]:
    rows = _csv_rows(w)
    rows[2] = rows[2] + "é"
    return _finetune(_csv(w, d, rows, "latin-1"), d / "out")


def _csv_two_labels(w: World, d: Path) -> list[str]:
    rows = _csv_rows(w)
    first = rows[0].split(",")[0]
    return _finetune(_csv(w, d, [*rows, f"{first},other"]), d / "out")


def _csv_two_splits(w: World, d: Path) -> list[str]:
    rows = [f"{r},train" for r in _csv_rows(w)]
    path, label = rows[0].split(",")[:2]
    return _finetune(_csv(w, d, [*rows, f"{path},{label},val"]), d / "out")


def _csv_missing_image(w: World, d: Path) -> list[str]:
    return _finetune(_csv(w, d, [*_csv_rows(w), "nowhere/ghost.png,a"]), d / "out")


def _one_class(w: World, d: Path) -> list[str]:
    return _finetune(_classes(d, {"only": 4}), d / "out")


def _empty_class(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4})
    (data / "empty").mkdir()
    return _finetune(data, d / "out")


def _data_is_a_file(w: World, d: Path) -> list[str]:
    (d / "notes.txt.bin").write_text("hello")
    return _finetune(d / "notes.txt.bin", d / "out")


def _evil_weights(w: World, d: Path) -> list[str]:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(d / "pwned"),))

    torch.save({"fc.weight": Evil()}, d / "evil.pt")
    args = _finetune(w.data, d / "out")
    args[args.index("none")] = str(d / "evil.pt")
    return args


def _finetune_onto_user_folder(w: World, d: Path) -> list[str]:
    return _finetune(w.data, _user_folder(d))


def _finetune_out_is_file(w: World, d: Path) -> list[str]:
    (d / "out").write_text("a file")
    return _finetune(w.data, d / "out")


def _finetune_onto_run(w: World, d: Path) -> list[str]:
    return _finetune(w.data, w.run)


def _two_finetunes(w: World, d: Path) -> list[str]:
    _hold(d / "out" / LOCK_FILE)
    return _finetune(w.data, d / "out")


def _resume_user_folder(w: World, d: Path) -> list[str]:
    return ["finetune", "--out", str(_user_folder(d)), "--resume"]


def _export_force_user_folder(w: World, d: Path) -> list[str]:
    return ["export", str(w.run), "--out", str(_user_folder(d)), "--force", "--precision", "fp32"]


def _export_force_run(w: World, d: Path) -> list[str]:
    run = d / "run"
    shutil.copytree(w.run, run)
    other = d / "other"
    shutil.copytree(w.run, other)
    return ["export", str(run), "--out", str(other), "--force", "--precision", "fp32"]


def _stale_staging(w: World, d: Path) -> list[str]:
    stale = d / ".art2.tmp-999999999-abcd"  # a pid that cannot run: its writer was killed
    stale.mkdir()
    (stale / "model.onnx").write_text("half written")
    return ["export", str(d / "no-such-run"), "--out", str(d / "art2")]


def _export_incomplete_run(w: World, d: Path) -> list[str]:
    run = d / "run"
    shutil.copytree(w.run, run)
    (run / "model.safetensors").unlink()
    (run / "checkpoint.json").unlink()
    return ["export", str(run), "--out", str(d / "art2")]


def _under_a_file(w: World, d: Path) -> Path:
    (d / "notes.txt").write_text("a file, not a folder")
    return d / "notes.txt"


def _export_out_under_file(w: World, d: Path) -> list[str]:
    return ["export", str(w.run), "--out", str(_under_a_file(w, d) / "art"), "--precision", "fp32"]


def _finetune_out_under_file(w: World, d: Path) -> list[str]:
    return _finetune(w.data, _under_a_file(w, d) / "run")


def _export_out_read_only(w: World, d: Path) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 folder")
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    return ["export", str(w.run), "--out", str(d / "ro" / "art"), "--precision", "fp32"]


def _cache_is_a_file(w: World, d: Path) -> list[str]:
    (d / "cache-file").write_text("not a folder")
    return ["select", "--device", "x86", "--top", "2", "--json", "--models", "resnet1*"]


def _cache_read_only(w: World, d: Path) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 folder")
    (d / "ro-cache").mkdir()
    (d / "ro-cache").chmod(0o555)
    return ["select", "--device", "x86", "--top", "2", "--json", "--models", "resnet1*"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(w: World, d: Path) -> list[str]:
    """``predict`` of a valid 20000 x 20000 PNG: 1-bit pixels, all black, about 50 KB on disk."""
    side = 20_000
    row, packer = bytes(1 + (side + 7) // 8), zlib.compressobj(9)  # filter byte 0, then the packed bits
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, not interlaced
    (d / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                                + _png_chunk(b"IEND", b""))
    return ["predict", str(w.art), str(d / "big.png")]


def _fifo(d: Path, name: str) -> Path:
    os.mkfifo(d / name)  # opening it would block until something writes to it
    return d / name


def _predict_fifo(w: World, d: Path) -> list[str]:
    return ["predict", str(w.art), str(_fifo(d, "fifo.png"))]


def _csv_row_names(kind: str) -> Callable[[World, Path], list[str]]:
    """A CSV dataset with one more row, naming a ``folder``, ``/dev/zero`` (a ``device``) or a ``fifo``."""

    def setup(w: World, d: Path) -> list[str]:
        if kind == "folder":
            (d / "folder.png").mkdir()
        target = {"folder": d / "folder.png", "device": Path("/dev/zero")}.get(kind) or _fifo(d, "pipe.png")
        rows = _csv_rows(w)
        return _finetune(_csv(w, d, [*rows, f"{target},{rows[0].split(',')[1]}"]), d / "out")

    return setup


def _class_names_like_options(w: World, d: Path) -> list[str]:
    return _finetune(_classes(d, {"--1": 4, "1 ² 3": 4}), d / "out", "--json")


def _nan_weights(w: World, d: Path) -> list[str]:
    import torch

    from edgetl.zoo.catalog import build_architecture

    state = build_architecture(MODEL).state_dict()
    state["features.1.block.0.0.weight"].view(-1)[3] = float("nan")
    torch.save(state, d / "nan.pt")
    args = _finetune(w.data, d / "out")
    args[args.index("none")] = str(d / "nan.pt")
    return args


def _art_with(files: dict[str, str | bytes], rehash: bool = False) -> Callable[[World, Path], list[str]]:
    """A setup: a copy of the artifact with ``files`` (relative name -> content) written into it."""

    def setup(w: World, d: Path) -> list[str]:
        art = _art(w, d)
        for name, content in files.items():
            (art / name).parent.mkdir(parents=True, exist_ok=True)
            (art / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if rehash:
            _rehash(art)
        return ["validate", str(art)]

    return setup


def _validate_symlink(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    outside = d / "outside.onnx"
    shutil.move(art / "model.onnx", outside)
    (art / "model.onnx").symlink_to(outside)
    return ["validate", str(art)]


def _manifest_edited(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    _edit_manifest(art, lambda m: m.update(precision="fp32"), rehash=False)
    return ["validate", str(art), "--json"]


def _precision_lie(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    _edit_manifest(art, lambda m: m.update(precision="fp32"))
    return ["validate", str(art)]


def _labels_vs_outputs(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    labels = json.loads((art / "labels.json").read_text())
    (art / "labels.json").write_text(json.dumps([*labels, "extra"]))
    _rehash(art)
    return ["validate", str(art)]


def _duplicate_labels(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    labels = json.loads((art / "labels.json").read_text())
    (art / "labels.json").write_text(json.dumps([labels[0], *labels[:-1]]))
    _rehash(art)
    return ["validate", str(art)]


def _preprocess(command: str, change: Callable[[dict], None]) -> Callable[[World, Path], list[str]]:
    """``command`` on a copy of the artifact whose preprocess.json is changed by ``change``, then re-hashed."""

    def setup(w: World, d: Path) -> list[str]:
        art = _art(w, d)
        pre = json.loads((art / "preprocess.json").read_text())
        change(pre)
        (art / "preprocess.json").write_text(json.dumps(pre))
        _rehash(art)
        return [command, str(art), *([str(_train_imgs(w, 0)[0])] if command == "predict" else [])]

    return setup


def _files_entry_string(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    _edit_manifest(art, lambda m: m["files"].update({"labels.json": "deadbeef"}))
    return ["validate", str(art)]


def _files_is_list(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    _edit_manifest(art, lambda m: m.update(files=list(m["files"])))
    return ["validate", str(art)]


def _device_null(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    _edit_manifest(art, lambda m: m.update(device=None))
    return ["validate", str(art), "--json"]


def _path_traversal(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    (d / "secret").write_text("x")
    _edit_manifest(art, lambda m: m["files"].update({"../secret": bundle.file_record(d / "secret")}))
    return ["validate", str(art)]


def _digest_missing(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    (art / bundle.DIGEST_FILE).unlink()
    return ["validate", str(art)]


def _header_other_manifest(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    text = (art / bundle.HEADER_FILE).read_text()
    start = text.index('EDGETL_MANIFEST_SHA256 "') + len('EDGETL_MANIFEST_SHA256 "')
    (art / bundle.HEADER_FILE).write_text(text[:start] + "0" * 64 + text[start + 64:])
    _rehash(art)
    return ["validate", str(art)]


def _tampered_model(w: World, d: Path) -> list[str]:
    art = _art(w, d)
    with open(art / "model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return ["validate", str(art)]


def _deep_manifest(command: str) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        art = _art(w, d)
        (art / bundle.MANIFEST_FILE).write_text("[" * 200_000 + "]" * 200_000)
        return [command, str(art), *([str(_train_imgs(w, 0)[0])] if command == "predict" else [])]

    return setup


def _predict_labels(labels: Callable[[list], list]) -> Callable[[World, Path], list[str]]:
    """``predict`` with an artifact whose labels.json is ``labels(old)``, re-hashed so only the content is wrong."""

    def setup(w: World, d: Path) -> list[str]:
        art = _art(w, d)
        (art / "labels.json").write_text(json.dumps(labels(json.loads((art / "labels.json").read_text()))))
        _rehash(art)
        return ["predict", str(art), str(_train_imgs(w, 0)[0])]

    return setup


def _csv_label(label: str) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        rows = _csv_rows(w)
        rows[1] = rows[1].split(",")[0] + "," + label
        return _finetune(_csv(w, d, rows), d / "out")

    return setup


def _class_folder_newline(w: World, d: Path) -> list[str]:
    data = _classes(d, {"a": 4, "b": 4})
    os.rename(data / "b", data / "b\nc")
    return _finetune(data, d / "out")


def _build_out_inside_data(w: World, d: Path) -> list[str]:
    data = d / "data"
    shutil.copytree(w.data, data)
    return ["build", str(_build_file(d, w, data=str(data), out=str(data / "build")))]


def _build_data_inside_out(w: World, d: Path) -> list[str]:
    data = d / "out" / "data"
    shutil.copytree(w.data, data)
    return ["build", str(_build_file(d, w, data=str(data), out=str(d / "out")))]


def _build_user_folder(w: World, d: Path) -> list[str]:
    return ["build", str(_build_file(d, w, out=str(_user_folder(d))))]


def _build_locked(w: World, d: Path) -> list[str]:
    _hold(d / "build" / BUILD_LOCK_FILE)
    return ["build", str(_build_file(d, w))]


def _build_nan(w: World, d: Path) -> list[str]:
    path = _build_file(d, w)
    path.write_text(path.read_text().replace("epochs: 1", "epochs: 1\n  lr: .nan"))
    return ["build", str(path), "--json"]


def _build_typo(w: World, d: Path) -> list[str]:
    return ["build", str(_build_file(d, w, finetune={"epoch": 1}))]


def _build_duplicate_key(w: World, d: Path) -> list[str]:
    path = _build_file(d, w)
    text = path.read_text()
    assert "  epochs: 1\n" in text
    path.write_text(text.replace("  epochs: 1\n", "  epochs: 1\n  epochs: 300\n"))  # the last one must not win
    return ["build", str(path)]


def _build_number(key: str, value: str) -> Callable[[World, Path], list[str]]:
    """A build file whose ``finetune.<key>`` is ``value``, as YAML writes it (``true``, ``1.0e+20``)."""

    def setup(w: World, d: Path) -> list[str]:
        path = _build_file(d, w)
        path.write_text(path.read_text().replace("  epochs: 1\n", f"  epochs: 1\n  {key}: {value}\n"
                                                 if key != "epochs" else f"  epochs: {value}\n"))
        return ["build", str(path)]

    return setup


def _profile_with(name: str, old: str, new: str) -> Callable[[World, Path], list[str]]:
    """A copy of the shipped x86-avx2 profile, renamed ``name``, with ``old`` replaced by ``new``."""

    def setup(w: World, d: Path) -> list[str]:
        text = (Path(__file__).parents[1] / "profiles" / "x86-avx2.yaml").read_text()
        assert old in text
        text = text.replace("name: x86-avx2", f"name: {name}").replace("aliases: [x86, avx2]", "aliases: []")
        (d / "profiles").mkdir()
        (d / "profiles" / f"{name}.yaml").write_text(text.replace(old, new))
        return ["--profiles", str(d / "profiles"), "select", "--device", name, "--json"]

    return setup


def _bench_many_threads(w: World, d: Path) -> list[str]:
    return ["bench", str(w.art / "model.onnx"), "--threads", "10000", "--iterations", "2", "--warmup", "0", "--json"]


def _build_not_mapping(w: World, d: Path) -> list[str]:
    (d / "pipeline.yaml").write_text("- just\n- a list\n")
    return ["build", str(d / "pipeline.yaml")]


def _demo_user_folder(w: World, d: Path) -> list[str]:
    return ["demo", "--out", str(_user_folder(d))]


def _broken_profile(w: World, d: Path) -> list[str]:
    (d / "profiles").mkdir()
    (d / "profiles" / "broken.yaml").write_text("name: broken\nfamily: [\n")
    return ["--profiles", str(d / "profiles"), "devices", "--json"]


def _broken_profile_asked(w: World, d: Path) -> list[str]:
    _broken_profile(w, d)
    return ["--profiles", str(d / "profiles"), "select", "--device", "broken"]


def _args(*args: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: [a.replace("{run}", str(w.run)).replace("{art}", str(w.art)).replace("{data}", str(w.data))
                         .replace("{d}", str(d)) for a in args]


@dataclass
class Case:
    id: str
    setup: Callable[[World, Path], list[str]]
    code: int
    message: str  # a regular expression the stderr must match
    json: bool = False
    env: dict[str, str] | None = None  # extra environment; "{d}" is the case's folder
    writes: tuple[str, ...] = ()  # what the command must write, relative to the case's folder (all else unchanged)
    stdout: str | None = None  # a regular expression the stdout must match
    timeout: int = 0  # seconds before the case's process is killed (SIGALRM): for what must not hang


FT = ("finetune", "--model", MODEL, "--data", "{data}", "--out", "{d}/out")
EX = ("export", "{run}", "--out", "{d}/art2")

CASES = [
    # numeric options: refused before anything is written (and before torch is imported)
    Case("lr-nan", _args(*FT, "--lr", "nan"), 1, r"--lr: .*finite"),
    Case("lr-negative", _args(*FT, "--lr", "-1"), 1, r"--lr: .*greater than 0"),
    Case("layer-decay-zero", _args(*FT, "--layer-decay", "0"), 1, r"--layer-decay: .*greater than 0"),
    Case("weight-decay-negative", _args(*FT, "--weight-decay", "-1"), 1, r"--weight-decay: "),
    Case("resolution-8000", _args(*FT, "--resolution", "8000"), 1, r"--resolution: .*4096"),
    Case("epochs-zero", _args(*FT, "--epochs", "0"), 1, r"--epochs: "),
    Case("seed-negative", _args(*FT, "--seed", "-1"), 1, r"--seed: "),
    Case("label-smoothing-one", _args(*FT, "--label-smoothing", "1"), 1, r"--label-smoothing: "),
    Case("batch-size-1-batchnorm", _args(*FT, "--weights", "none", "--resolution", "32", "--batch-size", "1"), 1,
         r"--batch-size 1 .*BatchNorm"),
    Case("export-latency-negative", _args(*EX, "--max-latency-ms", "-5"), 1, r"--max-latency-ms: .*greater than 0"),
    Case("export-drop-nan", _args(*EX, "--max-accuracy-drop", "nan"), 1, r"--max-accuracy-drop: .*finite"),
    Case("export-opset-99", _args(*EX, "--opset", "99"), 1, r"--opset: "),
    Case("export-resolution-8000", _args("export", MODEL, "--weights", "none", "--out", "{d}/a", "--resolution",
                                         "8000"), 1, r"--resolution: .*4096"),
    Case("validate-latency-nan-json", _args("validate", "{art}", "--max-latency-ms", "nan", "--json"), 1,
         r"--max-latency-ms: .*finite", json=True),
    Case("validate-iterations-zero", _args("validate", "{art}", "--iterations", "0"), 1, r"--iterations: "),
    Case("select-latency-inf", _args("select", "--device", "x86", "--max-latency-ms", "inf", "--json"), 1,
         r"--max-latency-ms: .*finite", json=True),
    Case("select-accuracy-101", _args("select", "--device", "x86", "--min-accuracy", "101"), 1, r"--min-accuracy: "),
    Case("bench-resolution-8000", _args("bench", MODEL, "--resolution", "8000"), 1, r"--resolution: .*4096"),
    Case("select-threads-zero", _args("select", "--device", "x86", "--threads", "0", "--json"), 1,
         r"--threads: .*greater than or equal to 1", json=True),
    Case("batch-size-billion", _args(*FT, "--batch-size", "1000000000"), 1, r"--batch-size: .*65536"),
    Case("select-batch-billion", _args("select", "--device", "x86", "--batch", "1000000000"), 1, r"--batch: .*65536"),
    Case("bench-batch-billion", _args("bench", "{art}/model.onnx", "--batch", "1000000000"), 2,
         r"'--batch': 1000000000 is not in the range 1<=x<=65536"),
    Case("bench-threads-capped", _bench_many_threads, 0, r"10000 threads asked for, but this machine has \d+ "
         r"cores; using \d+", json=True),
    Case("validate-threads-capped", _args("validate", "{art}", "--threads", "10000", "--iterations", "2", "--warmup",
                                          "0", "--report", "{d}/report.json", "--json"), 0,
         r"10000 threads asked for, but this machine has \d+ cores; using \d+", json=True, writes=("report.json",)),
    Case("build-epochs-true", _build_number("epochs", "true"), 1,
         r"finetune\.epochs: expected a number, got the boolean true"),
    Case("build-batch-1e20", _build_number("batch_size", "1.0e+20"), 1, r"finetune\.batch_size: .*1e\+20"),
    Case("build-batch-1e20-string", _build_number("batch_size", "1e20"), 1, r"finetune\.batch_size: .*'1e20'"),
    Case("profile-compute-inf", _profile_with("infbox", "fp32: {value: 384,", "fp32: {value: .inf,"), 1,
         r"infbox\.yaml: compute\.fp32\.value: .*finite", json=True),
    Case("profile-overhead-inf", _profile_with("infoh", "kernel_overhead_us: {value: 2,",
                                               "kernel_overhead_us: {value: .inf,"), 1,
         r"infoh\.yaml: kernel_overhead_us\.value: .*finite", json=True),
    Case("profile-bandwidth-inf", _profile_with("infbw", "bandwidth_gbs: {value: 51.2,",
                                                "bandwidth_gbs: {value: .inf,"), 1,
         r"infbw\.yaml: memory\.bandwidth_gbs\.value: .*finite", json=True),
    Case("profile-bandwidth-bool", _profile_with("boolbw", "bandwidth_gbs: {value: 51.2,",
                                                 "bandwidth_gbs: {value: true,"), 1,
         r"boolbw\.yaml: memory\.bandwidth_gbs\.value: expected a number, got the boolean true", json=True),
    Case("unknown-device", _args("select", "--device", "raspbery-pi-5"), 1, r"unknown device .*raspberry-pi-5"),
    Case("unknown-model", _args("finetune", "--model", "resnet181", "--data", "{data}", "--out", "{d}/o"), 1,
         r"unknown model .*resnet18"),
    # data: links, names, CSVs
    Case("symlink-loop", _symlink_loop, 1, r"same file as .*one label"),
    Case("link-to-other-class", _link_to_other_class, 1, r"same file as .*stolen\.png \(class 'a'\)"),
    Case("hard-link-to-other-class", _hard_link_to_other_class, 1, r"same file as .*stolen\.png \(class 'a'\)"),
    Case("copy-in-two-classes", _copy_in_two_classes, 1,
         r"byte-identical copy of .*copied\.png \(class 'a'\); an image has one label"),
    Case("link-across-splits", _link_across_splits, 1, r"two splits leaks validation data"),
    Case("non-utf8-file-name", _non_utf8_file, 1, r"caf\\xe9\.png.* not valid UTF-8"),
    Case("non-utf8-class-name", _non_utf8_class, 1, r"not valid UTF-8"),
    Case("csv-not-utf8", _csv_latin1, 1, r"labels\.csv line 3 is not UTF-8"),
    Case("csv-two-labels", _csv_two_labels, 1, r"one label"),
    Case("csv-two-splits", _csv_two_splits, 1, r"two splits"),
    Case("csv-missing-image", _csv_missing_image, 1, r"ghost\.png' does not exist"),
    Case("csv-row-folder", _csv_row_names("folder"), 1,
         r"labels\.csv row \d+: image '.*folder\.png' is a folder, not a file; fix or remove the row"),
    Case("csv-row-dev-zero", _csv_row_names("device"), 1,
         r"labels\.csv row \d+: image '/dev/zero' is a device, not a file; fix or remove the row"),
    Case("csv-row-fifo", _csv_row_names("fifo"), 1,
         r"labels\.csv row \d+: image '.*pipe\.png' is a named pipe \(FIFO\), not a file", timeout=60),
    Case("class-folders-like-options", _class_names_like_options, 0, r"epoch 1/1", json=True, writes=("out",),
         stdout=r'"classes": \[\s*"--1",\s*"1 (\\u00b2|²) 3"\s*\]'),
    Case("one-class", _one_class, 1, r"class"),
    Case("empty-class-folder", _empty_class, 1, r"empty has no images"),
    Case("data-not-csv", _data_is_a_file, 1, r"not a CSV"),
    Case("code-carrying-pickle", _evil_weights, 1, r"pickled objects other than tensors .*state_dict"),
    Case("weights-missing", _args(*FT, "--weights", "{d}/nope.pt", "--resolution", "32"), 1,
         r"nope\.pt does not exist"),
    Case("weights-nan", _nan_weights, 1,
         r"nan\.pt\) hold non-finite values in features\.1\.block\.0\.0\.weight \(1 NaN"),
    # folders that are not edgetl's, and concurrent writers
    Case("finetune-onto-user-folder", _finetune_onto_user_folder, 1, r"files that edgetl did not write"),
    Case("finetune-out-is-file", _finetune_out_is_file, 2, r"is a file"),
    Case("finetune-onto-run", _finetune_onto_run, 1, r"already holds a run.*--resume"),
    Case("two-finetunes", _two_finetunes, 1, r"another edgetl finetune is writing"),
    Case("resume-user-folder", _resume_user_folder, 1, r"files that edgetl did not write"),
    Case("export-force-user-folder", _export_force_user_folder, 1, r"files that edgetl did not write"),
    Case("export-force-onto-run", _export_force_run, 1, r"edgetl run folder"),
    Case("export-no-force", _args(*EX[:3], "{art}"), 1, r"already exists; pass --force"),
    Case("export-out-is-run", _args("export", "{run}", "--out", "{run}", "--force"), 1, r"holds the run"),
    Case("export-stale-staging", _stale_staging, 1, r"no-such-run"),
    Case("export-incomplete-run", _export_incomplete_run, 1, r"run"),
    Case("export-int8-on-nano", _args(*EX, "--device", "jetson-nano", "--precision", "int8"), 1, r"INT8|int8"),
    # the OS refuses a write: one line naming the path and the fix
    Case("export-out-under-a-file", _export_out_under_file, 1, r"notes\.txt: is a file, not a folder"),
    Case("finetune-out-under-a-file", _finetune_out_under_file, 1,
         r"notes\.txt(/run)?: (a part of the path )?is a file, not a folder"),
    Case("export-out-read-only", _export_out_read_only, 1, r"ro.*(permission denied|read-only).*writable folder"),
    Case("cache-dir-is-a-file", _cache_is_a_file, 0, r"cache folder .*cache-file is not writable.*EDGETL_CACHE_DIR",
         json=True, env={"EDGETL_CACHE_DIR": "{d}/cache-file"}),
    Case("cache-dir-read-only", _cache_read_only, 0, r"cache folder .*ro-cache is not writable.*EDGETL_CACHE_DIR",
         json=True, env={"EDGETL_CACHE_DIR": "{d}/ro-cache"}),
    Case("export-tensorrt-missing", _args(*EX, "--tensorrt"), 1, r"TensorRT|tensorrt"),
    # validate: consistency, not only hashes
    Case("validate-symlink-outside", _validate_symlink, 1, r"model\.onnx .* is a symbolic link"),
    Case("validate-subfolder", _art_with({"extra/model.onnx": "x"}), 1, r"extra/ .* is a subfolder"),
    Case("validate-dotfile", _art_with({".payload": "x"}), 1, r"hidden file \.payload"),
    Case("validate-manifest-edited", _manifest_edited, 1, r"does not match manifest\.sha256", json=True),
    Case("validate-precision-lie", _precision_lie, 1, r"says fp32, but model\.onnx is an int8 graph"),
    Case("validate-labels-vs-outputs", _labels_vs_outputs, 1, r"has 3 outputs, labels\.json names 4"),
    Case("validate-duplicate-labels", _duplicate_labels, 1, r"names a class twice"),
    Case("validate-preprocess-shape", _preprocess("validate", lambda p: p["crop"].update(size=[224, 224])), 1,
         r"preprocess\.json gives \[1, 3, 224, 224\]"),
    Case("validate-files-entry-string", _files_entry_string, 1, r"no sha256 for labels\.json"),
    Case("validate-files-is-list", _files_is_list, 1, r"lists no files"),
    Case("validate-device-null", _device_null, 1, r"'device' must be a mapping", json=True),
    Case("validate-path-traversal", _path_traversal, 1, r"path outside the artifact: \.\./secret"),
    Case("validate-digest-missing", _digest_missing, 1, r"missing file manifest\.sha256"),
    Case("validate-header-other-manifest", _header_other_manifest, 1, r"model_data\.h .* digest"),
    Case("validate-tampered-model", _tampered_model, 1, r"sha256 mismatch for model\.onnx"),
    Case("validate-unlisted-file", _art_with({"model.engine": "engine"}), 1,
         r"model\.engine .* is not in manifest\.json"),
    Case("validate-manifest-not-json", _art_with({"manifest.json": "{not json"}), 1, r"not valid JSON"),
    Case("validate-model-not-onnx", _art_with({"model.onnx": b"\x00garbage" * 10}, rehash=True), 1,
         r"not an ONNX model"),
    Case("validate-missing-folder", _args("validate", "{d}/nothing"), 1, r"does not exist"),
    Case("validate-int8-on-nano", _args("validate", "{art}", "--device", "jetson-nano"), 1, r"does not run"),
    # strict loaders: a depth limit on JSON, labels without control characters, labels as long as the outputs
    Case("validate-manifest-200000-deep", _deep_manifest("validate"), 1, r"manifest\.json is nested too deeply"),
    Case("predict-manifest-200000-deep", _deep_manifest("predict"), 1, r"manifest\.json is nested too deeply"),
    Case("predict-labels-too-many", _predict_labels(lambda old: [*old, "extra"]), 1,
         r"has 3 outputs, labels\.json names 4"),
    Case("predict-labels-too-few", _predict_labels(lambda old: old[:2]), 1, r"has 3 outputs, labels\.json names 2"),
    Case("predict-resize-100000", _preprocess("predict", lambda p: p["resize"].update(size=100_000)), 1,
         r"preprocess\.json: 'resize\.size' must be a whole number of pixels from 1 to 8192, got 100000"),
    Case("predict-20000x20000-png", _huge_png, 1,
         r"big\.png: is 400 megapixels, over the 89-megapixel limit for an image; downscale it"),
    Case("predict-fifo", _predict_fifo, 1, r"fifo\.png: is a named pipe \(FIFO\), not a file", timeout=60),
    Case("predict-label-newline", _predict_labels(lambda old: [old[0] + "\nfake: 99%", *old[1:]]), 1,
         r"labels\.json entry 0: .*control character"),
    Case("csv-label-nul", _csv_label("cat\x00dog"), 1, r"labels\.csv row 2: .*control character '\\x00'"),
    Case("csv-label-131073-chars", _csv_label("x" * 131_073), 1, r"labels\.csv row 2: .*at most 256"),
    Case("class-folder-newline", _class_folder_newline, 1, r"class folder .*control character '\\n'; rename"),
    # build and demo
    Case("build-out-inside-data", _build_out_inside_data, 1, r"out: .* overlaps data:"),
    Case("build-data-inside-out", _build_data_inside_out, 1, r"out: .* overlaps data:"),
    Case("build-out-user-folder", _build_user_folder, 1, r"files that edgetl did not write"),
    Case("build-locked", _build_locked, 1, r"another edgetl build is writing"),
    Case("build-nan", _build_nan, 1, r"finetune\.lr: .*finite", json=True),
    Case("build-typo", _build_typo, 1, r"finetune\.epoch: unknown key; did you mean 'epochs'"),
    Case("build-duplicate-key", _build_duplicate_key, 1,
         r"pipeline\.yaml:\d+:3: invalid YAML: duplicate key 'epochs'; remove one of them"),
    Case("build-not-mapping", _build_not_mapping, 1, r"expected a mapping"),
    Case("build-file-missing", _args("build", "{d}/nope.yaml"), 1, r"nope\.yaml"),
    Case("demo-user-folder", _demo_user_folder, 1, r"files that edgetl did not write"),
    # cheap checks before expensive work: refused in a second, nothing measured or written
    Case("calibrate-out-other-name", _args("device", "calibrate", "--name", "box", "--out", "{d}/cal/other.yaml"), 1,
         r"other\.yaml: the file name must be the profile name; save it as .*box\.yaml"),
    Case("demo-unknown-device", _args("demo", "--out", "{d}/demo", "--device", "nosuchdevice"), 1,
         r"unknown device 'nosuchdevice'"),
    Case("demo-epochs-zero", _args("demo", "--out", "{d}/demo", "--epochs", "0"), 2, r"--epochs"),
    # profiles
    Case("broken-profile-skipped", _broken_profile, 0, r"skipping device profile .*broken\.yaml", json=True),
    Case("broken-profile-asked", _broken_profile_asked, 1, r"broken\.yaml:3:1: invalid YAML"),
]


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` (links not followed): size and modification time."""
    snap: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                snap[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, cli_process: Zygote, tmp_path: Path) -> None:
    args = case.setup(world, tmp_path)
    roots = [tmp_path, *world.shared()]
    before = _snapshot(roots)
    try:
        env = {k: v.replace("{d}", str(tmp_path)) for k, v in (case.env or {}).items()}
        result = cli_process.run(args, cwd=tmp_path, env=env, timeout=case.timeout)
    finally:
        while _held:
            _held.pop().fh.close()
    stderr = result.stderr
    assert result.returncode == case.code, f"{args}\nstdout: {result.stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr
    assert re.search(case.message, stderr, re.S), stderr
    assert case.stdout is None or re.search(case.stdout, result.stdout), result.stdout
    if case.code == 1:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr
    if case.json:
        assert result.stdout.strip() == "" or json.loads(result.stdout) is not None
        if case.code == 0:
            json.loads(result.stdout)
    after = _snapshot(roots)
    for name in case.writes:
        assert (tmp_path / name).exists(), f"{name} not written"
        after = {k: v for k, v in after.items() if not Path(k).is_relative_to(tmp_path / name)}
    if case.id == "export-stale-staging":  # edgetl's own leftovers of a killed run are what it removes
        before = {k: v for k, v in before.items() if ".art2.tmp-" not in k}
        assert not list(tmp_path.glob(".art2.tmp-*"))
    assert after == before, f"files changed: {set(after) ^ set(before) or 'modification times'}"
    assert not (tmp_path / "pwned").exists()


def test_a_fresh_interpreter_gives_the_same_one_line_error(world: World, tmp_path: Path) -> None:
    """``python -m edgetl`` itself, without the pre-imported helper."""
    result = edgetl("validate", str(tmp_path / "nothing"), "--json", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: artifact folder") and "Traceback" not in result.stderr


def test_validate_report_elsewhere_leaves_the_artifact_untouched(world: World, cli_process: Zygote,
                                                                  tmp_path: Path) -> None:
    """``--report PATH``: a read-only artifact can be validated (the shared artifact is not written to)."""
    before = _snapshot([world.art])
    (tmp_path / "reports").mkdir()
    for target, written in (("one.json", "one.json"), ("reports", "reports/validation.json")):
        result = cli_process.run(["validate", str(world.art), "--report", str(tmp_path / target), "--iterations", "2",
                                  "--warmup", "0", "--json"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / written).read_text())["hashes_ok"] is True
    assert _snapshot([world.art]) == before


def test_validate_of_an_artifact_it_cannot_write_to_succeeds_with_a_note(world: World, tmp_path: Path,
                                                                          monkeypatch, caplog) -> None:
    import importlib

    import edgetl as api

    validate_module = importlib.import_module("edgetl.validate")  # edgetl.validate is the function

    def read_only(path, obj, indent=2):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(validate_module, "atomic_write_json", read_only)
    with caplog.at_level("WARNING"):
        report = api.validate(world.art, iterations=2, warmup=0)
    assert any("could not write" in n and "validation.json" in n and "--report" in n for n in report.notes)
    assert "could not write" in caplog.text
    with pytest.raises(OSError):  # a --report the user chose that cannot be written: the CLI says so in one line
        api.validate(world.art, iterations=2, warmup=0, report=tmp_path / "r.json")


def test_at_least_fifty_cases() -> None:
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)


# --- in-process checks of the mechanisms ------------------------------------------------------------


def _boom_group() -> EdgetlGroup:
    import click

    @click.group(cls=EdgetlGroup)
    @click.option("-v", "--verbose", count=True)
    def group(verbose: int) -> None:
        pass

    @group.command()
    def boom() -> None:
        raise RuntimeError("disk on fire\nsecond line")

    return group


def test_unexpected_exception_is_one_line_and_exit_1(monkeypatch) -> None:
    monkeypatch.delenv("EDGETL_DEBUG", raising=False)
    result = CliRunner().invoke(_boom_group(), ["boom"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: unexpected RuntimeError: disk on fire; run again with -v for the traceback, "
        "and report it if the input looks valid"
    )


def test_unexpected_exception_reaches_tests_and_verbose_users(monkeypatch) -> None:
    monkeypatch.setenv("EDGETL_DEBUG", "1")
    result = CliRunner().invoke(_boom_group(), ["boom"])
    assert isinstance(result.exception, RuntimeError)
    monkeypatch.delenv("EDGETL_DEBUG")
    result = CliRunner().invoke(_boom_group(), ["-v", "boom"])
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize(("code", "fix"), [
    (errno.ENOSPC, "free some space"), (errno.EROFS, "choose a writable folder"),
    (errno.EACCES, "check its permissions"), (errno.ENOTDIR, "parent folders are folders"),
])
def test_an_os_error_a_user_can_fix_is_one_line_naming_the_path(monkeypatch, code: int, fix: str) -> None:
    import click

    @click.group(cls=EdgetlGroup)
    def group() -> None:
        pass

    @group.command()
    def write() -> None:
        raise OSError(code, os.strerror(code), "/media/card/art/model.onnx")

    monkeypatch.setenv("EDGETL_DEBUG", "1")  # a user error even when debugging: not re-raised
    result = CliRunner().invoke(group, ["write"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /media/card/art/model.onnx: ") and fix in lines[0]


def test_an_unwritable_cache_falls_back_to_a_temporary_one(monkeypatch, tmp_path, caplog) -> None:
    from edgetl import _io

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "file"))
    monkeypatch.setattr(_io.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level("WARNING", logger="edgetl"):
        path = _io.cache_dir("catalog")
    assert path.is_dir() and path.is_relative_to(tmp_path / "tmp")
    assert "EDGETL_CACHE_DIR" in caplog.text
    monkeypatch.setattr(_io.tempfile, "tempdir", str(tmp_path / "file"))  # no temporary folder either
    with pytest.raises(EdgetlError, match="set EDGETL_CACHE_DIR to a writable folder"):
        _io.cache_dir("other")


def test_class_folders_that_look_like_numbers_but_are_not_are_sorted_as_text(tmp_path) -> None:
    data = _classes(tmp_path, {"--1": 3, "1 ² 3": 3, "2": 3})
    assert scan_dataset(data, val_split=0.34).classes == ["--1", "1 ² 3", "2"]
    assert sorted_classes(["10", "-1", "2"]) == ["-1", "2", "10"] and sorted_classes(["²", "1"]) == ["1", "²"]


def test_a_link_back_to_the_class_folder_is_read_once(tmp_path) -> None:
    data = _classes(tmp_path, {"a": 3, "b": 3})
    (data / "a" / "again").symlink_to(".")
    (data / "b" / "twice.png").symlink_to(sorted((data / "b").iterdir())[0])
    splits = scan_dataset(data, val_split=0.34)
    assert len(splits.train) + len(splits.val) == 6


def test_a_link_to_a_parent_folder_is_refused_not_followed_forever(tmp_path) -> None:
    data = _classes(tmp_path, {"a": 3, "b": 3})
    (data / "b" / "up").symlink_to("../..")
    with pytest.raises(DataError, match="same file"):
        scan_dataset(data)


def test_sigterm_during_finetune_saves_the_last_epoch(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "edgetl", *_finetune(world.data, out, "--epochs", "200", "--checkpoint-interval",
                                                        "0")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while not (out / "last.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "training interrupted after epoch" in stderr, stderr
    assert json.loads((out / "last.json").read_text())
