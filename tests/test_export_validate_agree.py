"""Export and validate agree on one artifact: the latency predicted for the device (INT8 with layers kept
in float included), the budget verdict, and the statistic the budget is judged on (every --budget-metric)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.data import make_demo_dataset
from edgetl.device import budget
from edgetl.device.profiles import load_profile
from edgetl.errors import BudgetExceededError, ConfigError
from edgetl.export import bundle
from edgetl.export.api import export
from edgetl.options import BUDGET_METRICS
from edgetl.validate import validate
from edgetl.zoo.weights import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL, RES, DEVICE = "squeezenet1_1", 32, "raspberry-pi-5"  # Pi 5: INT8 predicted ~2.5x faster than FP32
FAST = dict(weights="none", resolution=RES, simplify=False)


@pytest.fixture(scope="module")
def outlier_weights(tmp_path_factory):
    """SqueezeNet weights that plain INT8 breaks and one layer kept in float repairs (the trick of
    test_export_quantize's OutlierNet): the stem's channel 0 is dead after its ReLU, and the first squeeze
    conv weighs it by 1000 in every output channel, so per-channel INT8 rounds that conv's other weights to
    zero. Only 4 classes have weights, so that the top-1 has margins INT8 noise does not flip."""
    torch.manual_seed(0)
    state = load_model(MODEL, weights="none").model.state_dict()
    with torch.no_grad():
        state["features.0.weight"][0] = 0
        state["features.0.bias"][0] = -1.0
        state["features.3.squeeze.weight"][:, 0, 0, 0] = 1e3
        head = state["classifier.1.weight"]
        kept = head[1:5] * 10
        head.zero_()
        head[1:5] = kept
    base = tmp_path_factory.mktemp("agree")
    torch.save(state, base / "outlier.pt")
    calib = make_demo_dataset(base / "demo", num_classes=2, train_per_class=8, val_per_class=0, size=RES)
    return base / "outlier.pt", calib / "train"


def _predictions():
    profile = load_profile(DEVICE)
    return (budget.predicted_ms(MODEL, RES, profile, "int8"), budget.predicted_ms(MODEL, RES, profile, "fp32"))


@pytest.fixture(scope="module")
def int8_over_budget(outlier_weights, tmp_path_factory):
    """The INT8 artifact for the Pi 5, exported with a latency budget just above the plain INT8 prediction
    (1% of the way to FP32's): export must fail it, since the layer kept in float moves the figure further."""
    weights, calib = outlier_weights
    plain, fp32 = _predictions()
    limit = plain + 0.01 * (fp32 - plain)
    with pytest.raises(BudgetExceededError) as caught:
        export(MODEL, tmp_path_factory.mktemp("art") / "int8", precision="int8", weights=str(weights),
               resolution=RES, simplify=False, rounds=3, device=DEVICE, max_accuracy_drop=25,
               calibration={"data": calib, "size": 16}, max_latency_ms=limit)
    return caught.value.artifact, limit


def test_export_and_validate_predict_the_same_adjusted_latency_and_fail_the_same_budget(int8_over_budget):
    art, limit = int8_over_budget
    quant = art.manifest["quantization"]
    assert art.precision == "int8" and quant["accuracy_control"]["passed"]
    kept, ranked = budget.layers_in_float(quant)
    assert 1 <= kept < ranked  # accuracy control kept some of the quantized layers in float
    plain, fp32 = _predictions()
    exported = art.latency["predicted_ms"]
    assert plain < limit < exported < fp32  # moved towards FP32, past a budget the plain prediction passes

    result = CliRunner().invoke(cli, ["validate", str(art.path), "--iterations", "5", "--warmup", "1", "--json",
                                      "--max-latency-ms", repr(limit)])
    assert result.exit_code == 3, result.output  # BudgetExceededError, as export raised
    lat = json.loads(result.stdout)["latency"]
    assert lat["predicted_ms"] == exported and lat["predicted_for"] == DEVICE
    for judged in (art.latency, lat):
        assert judged["basis"] == "predicted" and judged["judged_ms"] == exported and judged["pass"] is False
        assert judged["budget_metric"] == "p50"
    assert art.failures == json.loads(result.stdout)["failures"]  # one sentence: same figure, basis, budget


def test_an_artifact_without_the_records_predicts_and_judges_as_before(int8_over_budget, tmp_path):
    """A manifest written before export recorded the metric and the layers kept in float (or edited to look
    so): validate reads it, predicts plain INT8 and judges on p50."""
    art, limit = int8_over_budget
    old = tmp_path / "old"
    shutil.copytree(art.path, old)
    manifest = json.loads((old / bundle.MANIFEST_FILE).read_text())
    manifest["latency"].pop("budget_metric")
    manifest.pop("quantization")
    (old / bundle.MANIFEST_FILE).write_text(json.dumps(manifest))
    (old / bundle.DIGEST_FILE).write_text(bundle.manifest_digest(manifest) + "\n")
    rep = validate(old, iterations=5, warmup=1, max_latency_ms=limit, write=False, check=False)
    plain, _ = _predictions()
    assert rep.latency["predicted_ms"] == round(plain, 4) and rep.latency["budget_metric"] == "p50"
    assert rep.passed  # the plain prediction is within the budget


@pytest.mark.parametrize("metric", BUDGET_METRICS)
def test_every_budget_metric_is_recorded_by_export_and_judged_on_by_validate(this_box, tmp_path, metric):
    runs = str(budget.runs_needed(float(metric[1:])) if metric.startswith("p") else 1)
    out = tmp_path / "art"
    exported = CliRunner().invoke(cli, [
        "export", MODEL, "--out", str(out), "--weights", "none", "--resolution", str(RES), "--no-simplify",
        "--precision", "fp32", "--device", "this-box", "--rounds", runs, "--budget-metric", metric,
        "--max-latency-ms", "10000", "--json"])
    assert exported.exit_code == 0, exported.output
    art = json.loads(exported.stdout)["latency"]
    validated = CliRunner().invoke(cli, ["validate", str(out), "--iterations", runs, "--warmup", "1", "--json",
                                         "--max-latency-ms", "10000"])  # no --budget-metric: the artifact's
    assert validated.exit_code == 0, validated.output
    rep = json.loads(validated.stdout)["latency"]
    for lat in (art, rep):  # each judges its own measurement on this machine, at the metric export recorded
        assert lat["budget_metric"] == metric and lat["basis"] == "measured on target"
        assert lat["judged_on"].startswith(f"{metric} measured on this-box") and lat["pass"] is True
        assert lat["judged_ms"] == lat[f"{metric}_ms"]
    if metric in ("p90", "p99"):  # too few runs for the artifact's metric: refused, saying where it came from
        with pytest.raises(ConfigError, match=f"a {metric} budget \\(the metric the artifact was exported with\\)"):
            validate(out, iterations=int(runs) - 1, write=False)
    other = "min" if metric != "min" else "p50"
    asked = validate(out, iterations=int(runs) + 1, warmup=1, budget_metric=other, write=False).latency
    assert asked["budget_metric"] == other and asked["judged_on"].startswith(f"{other} measured on this-box")


def test_a_metric_the_runs_cannot_estimate_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"p99 budget needs at least 100 timed runs; raise --rounds \(got 60\)"):
        export(MODEL, tmp_path / "p99", precision="fp32", device=DEVICE, budget_metric="p99", max_latency_ms=1e3,
               **FAST)
    assert not (tmp_path / "p99").exists()
    with pytest.raises(ConfigError, match=r"raise --iterations \(got 50\)"):  # before looking for the artifact
        validate(tmp_path / "no-such-artifact", iterations=50, budget_metric="p99", write=False)
