"""--precision-train: detecting native bf16 from the CPU flags, and training under bf16 autocast on the CPU."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from edgetl.data import make_demo_dataset
from edgetl.errors import ConfigError, TrainingInterrupted
from edgetl.export.api import export
from edgetl.finetune import precision as precision_module
from edgetl.finetune.api import finetune
from edgetl.finetune.conv_dtype import trainable_grouped_convs
from edgetl.finetune.precision import cpu_flags, cpu_has_native_bf16, resolve_precision
from edgetl.finetune.strategy import apply_strategy, build_param_groups, choose_strategy
from edgetl.finetune.trainer import TrainConfig, Trainer, make_scheduler
from edgetl.zoo.catalog import build_architecture, get_card, replace_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8
processor\t: 1
"""
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"


@pytest.mark.parametrize(("text", "native"), [(XEON, True), (EPYC, False), (GRAVITON3, True), ("", False)])
def test_cpu_flags_name_the_bf16_units(tmp_path, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    flags = cpu_flags(info)
    assert bool(flags & {"amx_bf16", "avx512_bf16", "bf16"}) == native
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolve_on_the_cpu():
    auto = resolve_precision("auto", "cpu")
    assert auto.dtype == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert auto.channels_last and not auto.grad_scaler  # oneDNN convolves channels-last, in fp32 too
    bf16 = resolve_precision("bf16", "cpu")
    assert bf16.autocast_dtype == torch.bfloat16 and bf16.channels_last
    fp32 = resolve_precision("fp32", "cpu")
    assert fp32.autocast_dtype is None and fp32.channels_last
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_trains_float32_weights_on_the_cpu():
    card = get_card("resnet18")
    torch.manual_seed(0)
    model = build_architecture("resnet18")
    replace_head(model, card, 3)
    plan = apply_strategy(model, card, choose_strategy("full", len(card.block_paths)))
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(build_param_groups(model, plan, card, lr=1e-3))
    config = TrainConfig(epochs=1, progress=False, precision=resolve_precision("bf16", "cpu"))
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, 2, 1, 0), config, torch.device("cpu"), 3)
    logits_dtypes = []
    model.fc.register_forward_hook(lambda _m, _i, out: logits_dtypes.append(out.dtype))
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    before = model.conv1.weight.detach().clone()
    stats = trainer.train_one_epoch(batches)
    assert logits_dtypes[0] == torch.bfloat16  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert torch.isfinite(torch.tensor(stats["train_loss"])) and not model.conv1.weight.equal(before)


def test_fp16_training_on_the_cpu_is_a_one_line_error(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=4, val_per_class=2, size=32)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU") as info:
        finetune("mobilenet_v3_small", data, tmp_path / "run", weights="none", device="cpu", precision_train="fp16",
                 progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("cap", "native"), [
    ("AVX2", False), ("avx512_core_vnni", False), (" sse41 ", False), ("AVX2_VNNI_2", False),
    ("AVX512_CORE_BF16", None), ("avx512_core_amx", None), ("DEFAULT", None), ("all", None), ("", None),
])
def test_an_onednn_isa_cap_below_bf16_means_no_native_bf16(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA=AVX2 stops oneDNN using the bf16 units, so auto trains in fp32 (None: the CPU decides)."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu_has_native_bf16.cache_clear()
    try:
        assert cpu_has_native_bf16() is (True if native is None else native)
        auto = resolve_precision("auto", "cpu")
        assert auto.dtype == ("bf16" if native is None else "fp32") and auto.channels_last
        if native is False:
            assert cap.strip().upper() in auto.reason
    finally:
        cpu_has_native_bf16.cache_clear()  # the next caller reads the real environment


def test_the_older_dnnl_name_caps_too(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    cpu_has_native_bf16.cache_clear()
    try:
        assert not cpu_has_native_bf16()
    finally:
        cpu_has_native_bf16.cache_clear()


def test_an_fp32_run_trains_channels_last_and_exports_as_usual(tmp_path):
    """channels-last is a memory layout: the saved weights are plain contiguous tensors and the export matches."""
    data = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    out = tmp_path / "run"
    finetune("resnet18", data, out, weights="none", strategy="full", epochs=1, resolution=32, batch_size=8,
             device="cpu", precision_train="fp32", progress=False)
    used = json.loads((out / "metrics.json").read_text())["precision_train"]
    assert used["dtype"] == "fp32" and used["channels_last"]
    state = load_file(out / "model.safetensors")
    assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["conv1.weight"].is_contiguous()
    artifact = export(out, tmp_path / "artifact", precision="fp32", rounds=3, device="x86")
    assert artifact.passed and artifact.to_dict()["parity"]["max_abs_diff"] <= 1e-4


def test_bf16_runs_record_their_fp32_convolutions_and_a_resumed_run_keeps_them(tmp_path):
    """The timed choice is in metrics.json and the checkpoint; --resume reuses the checkpoint's, not a new timing."""
    data = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=8, val_per_class=2, size=32)
    out = tmp_path / "run"

    def interrupt_after_first_epoch(epoch, record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune("mobilenet_v3_small", data, out, weights="none", strategy="full", epochs=2, resolution=32,
                 batch_size=8, device="cpu", precision_train="bf16", progress=False,
                 callbacks=(interrupt_after_first_epoch,))
    last = json.loads((out / "last.json").read_text())
    candidates = sorted(trainable_grouped_convs(build_architecture("mobilenet_v3_small")))
    assert set(last["fp32_convs"]) <= set(candidates)
    different = [] if last["fp32_convs"] else candidates[:1]  # what the timing did not choose
    (out / "last.json").write_text(json.dumps({**last, "fp32_convs": different}))

    resumed = finetune(out=out, resume=True, device="cpu", progress=False)
    used = resumed.metrics["precision_train"]
    assert used["dtype"] == "bf16" and used["fp32_convs"] == different
    assert f"{len(different)} of {len(candidates)} trainable grouped convolutions in fp32 (kept" in used["reason"]
