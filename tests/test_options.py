"""Every stage option is defined once (edgetl.options) and reaches the CLI, the API and the build file."""

import ast
import math
import os
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from edgetl.buildfile import BuildConfig, config_from_dict
from edgetl.cli import cli
from edgetl.cli.params import _param_name, _walk, parse
from edgetl.errors import ConfigError
from edgetl.options import (
    STAGE_INPUTS,
    Constraints,
    ExportOptions,
    FinetuneOptions,
    OutputOptions,
    SelectOptions,
    SourceOptions,
    TargetOptions,
    ValidateOptions,
    resolve,
    same_option,
    shared_models,
    unwrap_optional,
)

# command -> (its option models, the place-specific parameters that are not stage options)
STAGES = {
    "select": ((SelectOptions, Constraints), {"csv_path", "plot_path", "measure_n"}),
    "finetune": ((FinetuneOptions,), {"model", "data", "out", "resume", "restart"}),
    "export": ((ExportOptions,), {"source", "out", "data", "force"}),
    "validate": ((ValidateOptions,), {"artifact"}),
}
# command -> the shared inputs it takes: its stage's, whole (edgetl.options.STAGE_INPUTS), and how it prints
SHARED = {command: (*STAGE_INPUTS[command], OutputOptions) for command in (*STAGES, "predict")}
REQUIRED_ARGS = {"select": ["--device", "x86"], "finetune": ["--out", "runs/x"], "export": ["run", "--out", "art"],
                 "validate": ["art"]}
BUILD_SECTIONS = {SelectOptions: "select", Constraints: "constraints", FinetuneOptions: "finetune",
                  ExportOptions: "export", ValidateOptions: "validate"}


def _command(name: str) -> click.Command:
    return cli.commands[name]


def _other_value(field) -> tuple[object, str]:
    """A valid value that differs from the field's default, and how to type it on the command line."""
    tp, default = unwrap_optional(field.annotation), field.default
    if typing.get_origin(tp) is typing.Literal:
        value = next(v for v in typing.get_args(tp) if v != default)
        return value, value
    if tp is bool:
        return (not default if default is not None else True), ""
    if tp is int:
        value = 32 if default is None else default + 1
        return value, str(value)
    if tp is float:
        value = 0.5 if default is None else (default / 2 if default else 0.1)
        return value, str(value)
    if typing.get_origin(tp) is tuple:
        return ("Add", "Mul"), "Add,Mul"
    if tp is Path:
        return Path("some/where"), "some/where"
    return "none", "none"


def _cases():
    for command, (models, _) in STAGES.items():
        for model in models:
            for path, field, flags in _walk(model):
                yield pytest.param(command, model, path, field, flags, id=f"{command}:{'.'.join(path)}")


def test_threads_are_capped_at_the_cores_with_a_warning_where_timed_here(monkeypatch, caplog):
    from edgetl.options import TimingOptions, cap_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert TimingOptions(threads=10000).threads == 10000  # not at validation: with --on, the board's cores count
    with caplog.at_level("WARNING", logger="edgetl"):
        assert cap_threads(10000) == 4
    assert "10000 threads asked for, but this machine has 4 cores; using 4" in caplog.text
    assert cap_threads(3) == 3 and cap_threads(None) is None


@pytest.mark.parametrize("field", ["epochs", "batch_size", "lr", "warmup_epochs"])
def test_a_boolean_is_not_a_number(field):
    with pytest.raises(ValidationError, match="expected a number, got the boolean true"):
        FinetuneOptions(**{field: True})
    assert FinetuneOptions(epochs="3").epochs == 3  # strings (the CLI, the API) are still parsed


def test_a_batch_whose_memory_cannot_exist_is_refused():
    from edgetl.options import MAX_BATCH, SelectOptions

    for model, field in ((FinetuneOptions, "batch_size"), (SelectOptions, "batch")):
        assert getattr(model(**{field: MAX_BATCH}), field) == MAX_BATCH
        with pytest.raises(ValidationError, match="less than or equal to 65536"):
            model(**{field: MAX_BATCH + 1})


def test_every_cli_parameter_is_a_stage_option_or_listed_as_place_specific():
    for command, (models, place_specific) in STAGES.items():
        generated = {_param_name(m, path) for m in (*models, *SHARED[command]) for path, _, _ in _walk(m)}
        params = {p.name for p in _command(command).params} - {"help", "verbose"}  # every command takes these
        assert params - generated == place_specific, command


@pytest.mark.parametrize(("command", "model", "path", "field", "flags"), list(_cases()))
def test_option_reaches_cli_with_its_default_and_help_and_the_build_file_accepts_it(command, model, path, field,
                                                                                     flags, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # threads are capped at the cores; 32 must come through
    cmd = _command(command)
    option = next(p for p in cmd.params if p.name == _param_name(model, path))
    assert option.help.startswith(field.description)

    with cmd.make_context(command, list(REQUIRED_ARGS[command])) as ctx, ctx:
        assert parse(model, dict(ctx.params)) == model()  # nothing typed: the model's defaults

    value, typed = _other_value(field)
    if unwrap_optional(field.annotation) is bool:
        on, off = flags[0].split("/")
        flag = on if value else off
    else:
        flag = flags[0]
    argv = [*REQUIRED_ARGS[command], flag, *([typed] if typed else [])]
    with cmd.make_context(command, argv) as ctx, ctx:
        got = parse(model, dict(ctx.params))
    node = got
    for part in path:
        node = getattr(node, part)
    assert node == value

    nested: dict = {path[-1]: value if not isinstance(value, Path) else str(value)}
    for part in reversed(path[:-1]):
        nested = {part: nested}
    config = config_from_dict({"device": "x86", "data": ".", BUILD_SECTIONS[model]: nested}, base=Path("/tmp"))
    section = getattr(config, "validate_" if model is ValidateOptions else BUILD_SECTIONS[model])
    assert isinstance(section, model)


def test_build_file_sections_are_the_option_models():
    fields = BuildConfig.model_fields
    for model, key in BUILD_SECTIONS.items():
        assert fields["validate_" if key == "validate" else key].annotation is model


def test_a_bad_value_names_the_flag_and_its_help_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--model", "resnet18", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "run"), "--lr", "-1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--lr" in result.output and "learning rate" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["validate", "art", "--max-latency-ms", "nan"],
                                  ["select", "--device", "x86", "--max-latency-ms", "inf"],
                                  ["export", "run", "--out", "a", "--max-accuracy-drop", "nan"]])
def test_nan_and_infinity_are_refused(argv):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1 and "finite" in result.output


def test_api_keywords_are_validated_by_the_same_model():
    assert resolve(ExportOptions, None, {"calibration": {"method": "entropy"}}, "export()").calibration.size == 200
    with pytest.raises(ConfigError, match="did you mean 'opset'"):
        resolve(ExportOptions, None, {"opsett": 18}, "export()")
    with pytest.raises(ConfigError, match=r"export\(\): opset: .*less than or equal to 25"):
        resolve(ExportOptions, ExportOptions(precision="int8"), {"opset": 99}, "export()")
    assert math.isclose(resolve(FinetuneOptions, FinetuneOptions(lr=0.01), {}, "finetune()").lr, 0.01)


def test_a_build_file_error_carries_the_help_text():
    with pytest.raises(ConfigError, match=r"pipeline.yaml: finetune.lr: .* the head's peak learning rate"):
        config_from_dict({"device": "x86", "data": ".", "finetune": {"lr": 0}}, source="pipeline.yaml")


def test_the_api_docstrings_list_every_option():
    import edgetl

    for func, model in ((edgetl.finetune, FinetuneOptions), (edgetl.export, ExportOptions),
                        (edgetl.validate, ValidateOptions), (edgetl.select, SelectOptions)):
        for name, field in model.model_fields.items():
            if unwrap_optional(field.annotation) in (FinetuneOptions, ExportOptions) or name == "calibration":
                continue
            assert f"{name}" in func.__doc__ and field.description in func.__doc__, (func.__name__, name)


def test_no_function_in_edgetl_is_over_80_lines():
    long = []
    for path in Path(__file__).parents[1].joinpath("edgetl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def _all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


# flags that mean something else in one command (the CLI surface fixes their names)
NOT_SHARED = {("finetune", "--device"): "the training device (auto, cpu, cuda), FinetuneOptions.device",
              ("demo", "--device"): "the demo's own default, x86-avx2 or raspberry-pi-5 by CPU family",
              ("demo", "--weights"): "which demo runs: imagenet (transfer) or none (ResNet-18 from scratch)",
              ("weights", "import", "--model"): "the architecture of the imported file, required"}
SHARED_FIELDS = [(model, name, field) for model in (SourceOptions, TargetOptions, OutputOptions)
                 for name, field in model.model_fields.items()]


@pytest.mark.parametrize(("model", "name", "field"), SHARED_FIELDS, ids=[n for _, n, _ in SHARED_FIELDS])
def test_a_shared_flag_has_one_help_text_in_every_command(model, name, field):
    flag = (field.json_schema_extra or {}).get("flag", "--" + name.replace("_", "-")).split("/")[0]
    users = []
    for path, command in _all_commands():
        for param in command.params:
            if flag in getattr(param, "opts", ()) and (*path, flag) not in NOT_SHARED:
                assert param.help.startswith(field.description), (path, flag, param.help)
                users.append(path)
    assert len(users) >= 2 or flag == "--model", (flag, users)


@pytest.mark.parametrize("command", [["select"], ["export"], ["validate"]])
def test_every_target_command_shows_the_one_device_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=400)
    assert result.exit_code == 0
    shown = " ".join(result.output.split())
    assert " ".join(TargetOptions.model_fields["device"].description.split()) in shown
    assert " ".join(OutputOptions.model_fields["as_json"].description.split()) in shown


@pytest.mark.parametrize(("argv", "flag"), [
    (["select", "--threads", "0"], "--threads"),
    (["export", "run", "--out", "art", "--threads", "0"], "--threads"),
    (["validate", "art", "--threads", "0"], "--threads"),
    (["bench", "resnet18", "--threads", "0"], "--threads"),
    (["device", "calibrate", "--threads", "0"], "--threads"),
    (["select", "--resolution", "5"], "--resolution"),
    (["finetune", "--out", "runs/x", "--resolution", "5"], "--resolution"),
    (["export", "resnet18", "--weights", "none", "--out", "art", "--resolution", "5"], "--resolution"),
    (["bench", "resnet18", "--resolution", "5"], "--resolution"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_a_shared_value_out_of_bounds_names_the_flag_in_every_command(argv, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{flag}: input should be greater than or equal to" in errors[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_the_build_file_and_the_api_take_the_shared_fields():
    for key, model in (("device", TargetOptions), ("weights_dir", SourceOptions)):
        assert BuildConfig.model_fields[key].description == model.model_fields[key].description
    assert FinetuneOptions.model_fields["weights"].description == SourceOptions.model_fields["weights"].description
    for stage in (ExportOptions, ValidateOptions):
        assert stage.model_fields["threads"].metadata == TargetOptions.model_fields["threads"].metadata
    import edgetl

    with pytest.raises(ConfigError, match=r"export\(\): resolution: .*greater than or equal to 16"):
        edgetl.export("resnet18", "art", weights="none", resolution=5)
    with pytest.raises(ConfigError, match=r"predict\(\): weights_dir: "):
        edgetl.predict("resnet18", ["x.png"], weights_dir=3)


# --- shared inputs travel as whole models: the API, the CLI and the build file take any field of them -----------

STAGE_FUNCTIONS = {"select": lambda **kw: _api().select(**kw),
                   "finetune": lambda **kw: _api().finetune("resnet18", ".", "runs/x", **kw),
                   "export": lambda **kw: _api().export("resnet18", "art", **kw),
                   "validate": lambda **kw: _api().validate("art", **kw),
                   "predict": lambda **kw: _api().predict("resnet18", ["x.png"], **kw)}


def _api():
    import edgetl

    return edgetl


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_an_unknown_api_keyword_is_refused_naming_it(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"{stage}\(\): unknown option 'devise'"):
        STAGE_FUNCTIONS[stage](devise="x86")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_every_field_of_a_stage_s_shared_models_is_an_api_keyword(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in STAGE_INPUTS[stage]:
        for name in model.model_fields:
            # a wrongly typed value: the keyword is known, and its model (or the stage's copy) refuses it
            with pytest.raises(ConfigError, match=rf"{stage}\(\): {name}: "):
                STAGE_FUNCTIONS[stage](**{name: [1]})


def test_take_inputs_splits_keywords_between_the_stage_and_its_shared_models(monkeypatch):
    from edgetl.options import StageOptions, option, take_inputs

    (opts,), inputs = take_inputs("export", {"threads": 2, "device": "x86", "opset": 18, "weights": "none"},
                                  (ExportOptions, None))
    assert (opts.threads, opts.opset) == (2, 18)
    assert inputs[TargetOptions] == TargetOptions(device="x86", threads=2)  # the stage's copy, said once
    assert inputs[SourceOptions].weights == "none"

    class ProbeOptions(StageOptions):  # a shared model added later, with a field no other model has
        probe_ticket: str | None = option(None, "A ticket.")

    monkeypatch.setitem(STAGE_INPUTS, "export", (*STAGE_INPUTS["export"], ProbeOptions))
    _, inputs = take_inputs("export", {"probe_ticket": "x"}, (ExportOptions, None))
    assert inputs[ProbeOptions].probe_ticket == "x"  # a new shared model needs no new parameter


def _command_path(stage: str) -> click.Command:
    return cli.commands[stage]


ALL_SHARED = shared_models(*STAGE_INPUTS)


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_a_command_s_flags_are_the_shared_models_its_stage_takes(stage):
    """Every field of a shared model the stage takes is a flag (its own or the stage model's copy), and no
    field of another shared model is (but for a stage option that copies it, as select's --resolution): no flag
    is silently ignored, none is missing."""
    params = {o: p for p in _command_path(stage).params for o in getattr(p, "opts", ())}
    stage_models = STAGES.get(stage, ((),))[0]
    for model in ALL_SHARED:
        for (name,), field, flags in _walk(model):
            flag = flags[0].split("/")[0]
            same = flag in params and (params[flag].help or "").startswith(field.description)
            if any(same_option(m, model, name) for m in stage_models):
                assert same, (stage, flag)
                continue
            assert same == (model in STAGE_INPUTS[stage]), (stage, model.__name__, flag)


def test_a_build_file_s_top_level_shared_inputs_reach_the_stages(monkeypatch):
    from edgetl.buildfile import BUILD_INPUTS, stage_inputs

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # 3 threads are not capped on a 2-core machine

    assert all(issubclass(BuildConfig, m) for m in BUILD_INPUTS)
    cfg = config_from_dict({"device": "x86", "data": ".", "threads": 3, "resolution": 64, "weights": "none"},
                           base=Path("/tmp"))
    assert (cfg.export.threads, cfg.validate_.threads) == (3, 3)  # the sections' default: timed with 3 threads
    assert (cfg.finetune.resolution, cfg.select.resolution, cfg.finetune.weights) == (64, 64, "none")
    assert cfg.finetune.device == "auto"  # FinetuneOptions.device (where to train) is another option
    assert stage_inputs(cfg, "export", cfg.export) == {"device": "x86", "weights": "none", "resolution": 64}
    assert stage_inputs(cfg, "export", cfg.export, skip=(SourceOptions,)) == {"device": "x86"}
    assert stage_inputs(cfg, "validate", cfg.validate_) == {"device": "x86"}
    section_wins = config_from_dict({"device": "x86", "data": ".", "threads": 3, "export": {"threads": 1}})
    assert (section_wins.export.threads, section_wins.validate_.threads) == (1, 3)
    with pytest.raises(ConfigError, match="thread: unknown key; did you mean 'threads'"):
        config_from_dict({"device": "x86", "data": ".", "thread": 3})
    with pytest.raises(ConfigError, match="device: field required"):
        config_from_dict({"data": "."})


def test_a_build_file_s_top_level_threads_reach_export_s_timing(tmp_path, monkeypatch):
    """A build runs export with the build file's top-level inputs; export times with the threads they say."""
    import importlib

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # 3 threads are not capped on a 2-core machine

    from edgetl.buildfile import stage_inputs

    export_api = importlib.import_module("edgetl.export.api")  # edgetl.export is also the function

    cfg = config_from_dict({"device": "x86", "data": ".", "threads": 3}, base=tmp_path)
    seen = {}

    def measure(candidates, resolution, threads, rounds, say):
        seen["threads"] = threads
        raise KeyboardInterrupt  # stop here: the timing is what this test is about

    monkeypatch.setattr(export_api, "_measure", measure)
    with pytest.raises(KeyboardInterrupt):
        export_api.export("resnet18", tmp_path / "art", cfg.export, weights="none", resolution=32, precision="fp32",
                          simplify=False, **stage_inputs(cfg, "export", cfg.export, skip=(SourceOptions,)))
    assert seen["threads"] == 3
