"""--strategy lp-ft: the probe phase stops on a plateau and keeps its best head; the run then fine-tunes from it."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from edgetl.data import make_demo_dataset
from edgetl.errors import TrainingInterrupted
from edgetl.export.api import export
from edgetl.finetune.api import finetune
from edgetl.finetune.distributed import EpochSampler
from edgetl.finetune.features import FeatureBatches, FeatureCache
from edgetl.finetune.lpft import FT_LR_SCALE, PATIENCE, fit_probe, weight_norm
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.strategy import choose_strategy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _separable(n: int, seed: int) -> FeatureCache:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.eye(3, 8) * 1.5  # overlapping classes: the validation loss bottoms out
    return FeatureCache(centres[labels] + torch.randn(n, 8, generator=g), labels)


def test_probe_stops_when_the_validation_loss_plateaus_and_keeps_the_best_head_at_its_initial_norm():
    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    initial = weight_norm(head)
    train, val = _separable(96, 1), _separable(48, 2)
    result = fit_probe(head, FeatureBatches(train, 16, EpochSampler(96, 0)), FeatureBatches(val, 16), lr=0.05,
                       weight_decay=0.0, label_smoothing=0.0, device=torch.device("cpu"), num_classes=3, seed=0)
    assert result.monitored == "val_loss" and result.accuracy >= 0.6
    assert result.epochs == result.best_epoch + PATIENCE < 100  # a plateau ended it, not the epoch limit
    # cross-entropy grew the head; it is handed to fine-tuning at the norm it was made with, logits scaled alike
    assert result.head_norm > 1.5 * initial and weight_norm(head) == pytest.approx(initial, rel=1e-5)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(head(val.features) / result.scale, val.labels).item()
    assert loss == pytest.approx(result.loss, rel=1e-5)  # the head left behind is the best epoch's, scaled


def test_lp_ft_decision_trains_the_top_blocks():
    d = choose_strategy("lp-ft", num_blocks=12)
    assert (d.strategy, d.unfreeze) == ("lp-ft", 3) and "a linear probe, then training the last 3" in d.reason


def test_lp_ft_run_probes_then_fine_tunes_the_top_blocks(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    out = tmp_path / "run"
    result = finetune("mobilenet_v3_small", data, out, weights="none", strategy="lp-ft", unfreeze=2, epochs=1,
                      lr=1e-2, resolution=32, batch_size=8, device="cpu", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    probe = metrics["linear_probe"]
    assert result.strategy.strategy == "lp-ft" and probe["monitored"] == "val_loss"
    assert 1 <= probe["best_epoch"] <= probe["epochs"] and probe["epochs"] <= probe["best_epoch"] + PATIENCE
    # the second phase runs at FT_LR_SCALE x --lr (its first step, in warm-up, at most that)
    assert 0 < metrics["epochs"][0]["lr"] <= 1e-2 * FT_LR_SCALE
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert ckpt["linear_probe"] == probe and ckpt["strategy"]["unfreeze"] == 2
    state = load_file(out / "model.safetensors")
    assert state["classifier.3.weight"].shape == (3, 1024)
    # the run (FrozenBatchNorm in its frozen blocks during training) exports like any other
    artifact = export(out, tmp_path / "artifact", precision="fp32", rounds=3, device="x86")
    assert artifact.passed and (artifact.path / "model.onnx").is_file()
    assert artifact.to_dict()["parity"]["max_abs_diff"] <= 1e-4


def test_lp_ft_resumes_into_its_second_phase_without_probing_again(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    opts = dict(weights="none", strategy="lp-ft", unfreeze=2, epochs=2, resolution=32, batch_size=8, device="cpu",
                progress=False)
    full = finetune("mobilenet_v3_small", data, tmp_path / "full", **opts)

    def interrupt(epoch, _record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted):
        finetune("mobilenet_v3_small", data, out, callbacks=(interrupt,), **opts)
    saved = json.loads((out / "last.json").read_text())["linear_probe"]
    resumed = finetune(out=out, resume=True, device="cpu", progress=False)
    assert resumed.resumed_from == 1
    assert resumed.metrics["linear_probe"] == saved  # read back from the checkpoint (its time too): not probed again
    probe = full.metrics["linear_probe"]
    assert {k: v for k, v in probe.items() if k != "seconds"} == {k: v for k, v in saved.items() if k != "seconds"}
    a, b = load_file(RunDir(tmp_path / "full").last_weights), load_file(RunDir(out).last_weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lp_ft_keeps_its_probe_when_no_fine_tuning_epoch_beats_it(tmp_path, monkeypatch):
    """A fine-tuning phase that only hurts (each epoch ends by scrambling the unfrozen blocks: an injected fault)
    must not replace the probe: the best epoch is 0, and the run reports and ships the probe's accuracy."""
    from edgetl.finetune import trainer as trainer_module

    honest = trainer_module.Trainer.train_one_epoch

    def scrambling(self, loader, epoch):
        stats = honest(self, loader, epoch)
        if not isinstance(self.model, nn.Linear):  # the probe trains the bare head: leave it alone
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn_like(p) * p.std().clamp(min=1e-3) * 3)
        return stats

    monkeypatch.setattr(trainer_module.Trainer, "train_one_epoch", scrambling)
    data = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    out = tmp_path / "run"
    result = finetune("mobilenet_v3_small", data, out, weights="none", strategy="lp-ft", unfreeze=2, epochs=2,
                      lr=1e-2, resolution=32, batch_size=8, device="cpu", progress=False, patience=0)
    metrics = json.loads((out / "metrics.json").read_text())
    probe = json.loads((out / "checkpoint.json").read_text())
    assert result.best_epoch == 0 and probe["epoch"] == 0 and probe["epoch_metrics"]["phase"] == "linear probe"
    scores = [e["val_accuracy"] for e in metrics["epochs"]]
    assert len(scores) == 2 and all(s <= probe["epoch_metrics"]["val_accuracy"] for s in scores), scores
    assert result.val_accuracy == pytest.approx(probe["epoch_metrics"]["val_accuracy"])  # what ships is the probe
