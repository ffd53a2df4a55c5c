import json

import pytest
from click.testing import CliRunner

import edgetl
from edgetl.cli import cli
from edgetl.errors import ConfigError, ConstraintError, ProfileError, UnknownNameError
from edgetl.select import JSON_KEYS, select

SMALL = "resnet*"  # keeps the tests to a few traces


def test_ranking_order_and_fits():
    ranking = select(device="jetson", models=SMALL, max_latency_ms=1e6)
    rows = ranking.rows
    assert rows and all(r.fits for r in rows)
    accs = [r.card.top1 for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert ranking.best is rows[0]


def test_pareto_front_is_exactly_the_non_dominated_set():
    ranking = select(device="raspberry-pi-5", models="mobilenet*", precision="fp32")
    cands = ranking.candidates
    for r in cands:
        dominated = any(
            o is not r and o.latency_ms <= r.latency_ms and o.card.top1 >= r.card.top1
            and (o.latency_ms < r.latency_ms or o.card.top1 > r.card.top1)
            for o in cands
        )
        assert r.pareto == (not dominated), r.card.id


def test_latency_constraint_filters_and_reports_failures():
    loose = select(device="jetson", models=SMALL)
    cutoff = sorted(r.latency_ms for r in loose.candidates)[2]
    ranking = select(device="jetson", models=SMALL, max_latency_ms=cutoff)
    assert all(r.latency_ms <= cutoff for r in ranking.rows)
    misses = [r for r in ranking.candidates if not r.fits]
    assert misses and all(any(f.startswith("latency") for f in r.failures) for r in misses)


def test_nothing_fits_names_three_nearest_misses():
    ranking = select(device="jetson", models=SMALL, max_latency_ms=0.001)
    assert ranking.rows == []
    with pytest.raises(ConstraintError) as info:
        _ = ranking.best
    msg = str(info.value)
    assert "nearest misses" in msg and msg.count("latency") >= 3 and "\n" not in msg


def test_int8_on_jetson_nano_names_supported_precisions():
    with pytest.raises(ProfileError, match="fp16"):
        select(device="jetson-nano", precision="int8", models=SMALL)


def test_unknown_device_suggests():
    with pytest.raises(UnknownNameError, match="jetson"):
        select(device="jetsn", models=SMALL)


@pytest.mark.parametrize("kwargs", [{"max_latency_ms": -1}, {"min_accuracy": 120}, {"batch": 0}])
def test_invalid_constraints(kwargs):
    with pytest.raises(ConfigError):
        select(device="jetson", models=SMALL, **kwargs)


def test_precision_changes_size_and_latency():
    fp32 = {r.card.id: r for r in select(device="jetson-orin-nano", precision="fp32", models=SMALL).candidates}
    int8 = {r.card.id: r for r in select(device="jetson-orin-nano", precision="int8", models=SMALL).candidates}
    for key, r in fp32.items():
        assert int8[key].size_mb == pytest.approx(r.size_mb / 4)
        assert int8[key].latency_ms < r.latency_ms


def test_public_api_json_and_plot(tmp_path):
    ranking = edgetl.select(device="jetson", max_latency_ms=10, precision="fp16", models=SMALL)
    rows = ranking.to_json()
    assert rows and all(list(row) == list(JSON_KEYS) for row in rows)
    out = ranking.plot(tmp_path / "pareto.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    csv_text = ranking.to_csv(tmp_path / "rank.csv")
    assert csv_text.splitlines()[0] == ",".join(JSON_KEYS)
    assert callable(edgetl.select) and edgetl.list_models() and edgetl.list_profiles()
    assert edgetl.load_profile("jetson").name == "jetson-orin-nano"


def test_cli_select_json_is_pure_json():
    result = CliRunner().invoke(cli, ["select", "--device", "jetson", "--filter", SMALL, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows and set(rows[0]) == set(JSON_KEYS)


def test_cli_select_table_csv_and_plot(tmp_path):
    result = CliRunner().invoke(
        cli,
        ["select", "--device", "rpi", "--filter", "mobilenet*", "--max-latency-ms", "500",
         "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 0, result.output
    assert "mobilenet" in result.stdout and "Pareto" in result.stdout
    assert (tmp_path / "r.csv").exists() and (tmp_path / "p.png").exists()


def test_cli_no_fit_exits_1_with_one_line_and_no_traceback():
    result = CliRunner().invoke(cli, ["select", "--device", "jetson", "--filter", SMALL, "--max-latency-ms", "0.001"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: no model meets the constraints")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_device_and_precision():
    result = CliRunner().invoke(cli, ["select", "--device", "jetsn"])
    assert result.exit_code == 1 and "did you mean" in result.stderr
    result = CliRunner().invoke(cli, ["select", "--device", "jetson-nano", "--precision", "int8"])
    assert result.exit_code == 1 and "fp16" in result.stderr


def test_cli_models_json():
    result = CliRunner().invoke(cli, ["models", "--filter", "resnet1*", "--json"])
    assert result.exit_code == 0
    names = {row["model"] for row in json.loads(result.stdout)}
    assert names == {"resnet18", "resnet101", "resnet152"}


FEATURES = "vgg16.IMAGENET1K_FEATURES"  # torchvision's feature extractor: no ImageNet top-1 to rank it by
LEFT_OUT_LINE = f"1 entry left out: {FEATURES} (no ImageNet top-1: a feature extractor)"


def test_an_entry_without_a_top1_is_left_out_and_said_so():
    ranking = select(device="x86", models="vgg16*")
    assert {r.card.id for r in ranking.candidates} == {"vgg16.IMAGENET1K_V1", "vgg16_bn.IMAGENET1K_V1"}
    assert ranking.left_out == [(FEATURES, "no ImageNet top-1: a feature extractor")]
    nothing = r"no catalog entry matching 'vgg16\.\*feat\*' can be ranked: vgg16\.IMAGENET1K_FEATURES \(no ImageNet"
    with pytest.raises(ConstraintError, match=nothing):
        select(device="x86", models="vgg16.*feat*")


def test_an_entry_that_cannot_be_predicted_is_left_out_with_the_reason():
    ranking = select(device="x86", models="inception*", resolution=16)
    assert ranking.candidates == []
    [(model, why)] = ranking.left_out
    assert model == "inception_v3.IMAGENET1K_V1" and why.startswith("could not predict: inception_v3 at 16px")


def test_the_cli_names_the_entries_left_out_in_text_and_json():
    args = ["select", "--device", "x86", "--models", "vgg16*", "--max-latency-ms", "none"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert LEFT_OUT_LINE in " ".join(text.stdout.split())
    doc = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    assert doc["left_out"] == [{"model": FEATURES, "reason": "no ImageNet top-1: a feature extractor"}]
    assert doc["ranked"] == len(doc["rows"]) == 2
    assert FEATURES not in {f"{r['model']}.{r['weights']}" for r in doc["rows"]}
    full = CliRunner().invoke(cli, ["select", "--device", "x86", "--models", "resnet1*"])
    assert full.exit_code == 0 and "left out" not in full.stdout  # nothing left out, nothing said
