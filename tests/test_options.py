"""Every stage option is defined once (edgetl.options) and reaches the CLI, the API and the build file."""

import ast
import math
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgetl.buildfile import BuildConfig, config_from_dict
from edgetl.cli import cli
from edgetl.cli.params import _param_name, _walk, parse
from edgetl.errors import ConfigError
from edgetl.options import (
    Constraints,
    ExportOptions,
    FinetuneOptions,
    SelectOptions,
    ValidateOptions,
    resolve,
    unwrap_optional,
)

# command -> (its option models, the place-specific parameters that are not stage options)
STAGES = {
    "select": ((SelectOptions, Constraints), {"device", "as_json", "csv_path", "plot_path", "measure_n", "threads"}),
    "finetune": ((FinetuneOptions,), {"model", "data", "out", "weights_dir", "resume", "as_json"}),
    "export": ((ExportOptions,), {"source", "out", "device", "weights", "weights_dir", "resolution", "data", "force",
                                  "as_json"}),
    "validate": ((ValidateOptions,), {"artifact", "device", "as_json"}),
}
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


def test_every_cli_parameter_is_a_stage_option_or_listed_as_place_specific():
    for command, (models, place_specific) in STAGES.items():
        generated = {_param_name(m, path) for m in models for path, _, _ in _walk(m)}
        params = {p.name for p in _command(command).params} - {"help"}
        assert params - generated == place_specific, command


@pytest.mark.parametrize(("command", "model", "path", "field", "flags"), list(_cases()))
def test_option_reaches_cli_with_its_default_and_help_and_the_build_file_accepts_it(command, model, path, field,
                                                                                     flags):
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
