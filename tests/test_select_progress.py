"""The first run of select says what it is doing: progress while the catalog is built and models are traced, and
nothing once the caches answer."""

import json
import shutil

from click.testing import CliRunner

from edgetl._io import cache_dir
from edgetl.cli import TRACING, cli
from edgetl.select import select
from edgetl.zoo import catalog

FEW = "squeezenet*"  # two tags of two small architectures: two traces


def _cold_traces(monkeypatch, tmp_path) -> None:
    """A cache folder holding the session's catalog but no cost trace."""
    catalog.list_models(FEW)  # the catalog is built (once per session) under the session's cache
    fresh = tmp_path / "cache"
    shutil.copytree(cache_dir("catalog"), fresh / "catalog")
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(fresh))


def test_select_reports_only_the_traces_it_computes(monkeypatch, tmp_path):
    _cold_traces(monkeypatch, tmp_path)
    calls = []
    ranking = select("x86", models=FEW, progress=lambda *call: calls.append(call))
    names = [r.card.id for r in ranking.candidates]
    assert len(names) == 2 and calls[-1] == (2, 2, "")
    assert [(done, total) for done, total, _ in calls[:-1]] == [(0, 2), (1, 2)]
    assert sorted(name for _, _, name in calls[:-1]) == sorted(names)
    calls.clear()
    select("x86", models=FEW, progress=lambda *call: calls.append(call))
    assert calls == []  # warm: no work, no progress


def test_the_cli_notes_a_cold_trace_on_a_stderr_that_is_not_a_terminal(monkeypatch, tmp_path):
    _cold_traces(monkeypatch, tmp_path)
    args = ["select", "--device", "x86", "--models", FEW, "--max-latency-ms", "none", "--json"]
    cold = CliRunner().invoke(cli, args)
    assert cold.exit_code == 0, cold.output
    assert cold.stderr.splitlines() == [f"{TRACING} ..."]
    assert len(json.loads(cold.stdout)["rows"]) == 2  # stdout holds the JSON document only
    warm = CliRunner().invoke(cli, args)
    assert warm.exit_code == 0 and warm.stderr == ""


def test_building_the_catalog_reports_progress_and_a_warm_catalog_none(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))
    catalog._zoo_cards.cache_clear()
    try:
        calls = []
        cards = catalog.list_models("resnet1*", progress=lambda *call: calls.append(call))  # torchvision's zoo only
        assert {c.name for c in cards} == {"resnet18", "resnet101", "resnet152"}
        assert calls[0][0] == 0 and calls[-1] == (1, 1, "") and "torchvision resnet18" in {n for *_, n in calls}
        assert all(done < total for done, total, _ in calls[:-1])
        catalog._zoo_cards.cache_clear()  # read back from the disk cache: no building, no progress
        calls.clear()
        assert catalog.list_models("resnet1*", progress=lambda *call: calls.append(call)) == cards
        assert calls == []
    finally:
        catalog._zoo_cards.cache_clear()  # later tests list the zoos under the session's cache folder
