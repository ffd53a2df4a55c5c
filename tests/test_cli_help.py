"""The command line's help: an example in every command's help that names only real options, the options a
command needs marked so, and ``-v`` accepted before or after the command."""

from __future__ import annotations

import logging
import re
import shlex

import click
import pytest
from click.testing import CliRunner

from edgetl.cli import EdgetlGroup, cli


def _commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    """Every (path, command) under ``group``, the group itself first."""
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands())
IDS = [" ".join(p) or "edgetl" for p, _ in COMMANDS]


def _flat(text: str) -> str:
    """Help text with its line breaks and indentation gone (so no test depends on the terminal's width)."""
    return " ".join(text.split())


def _examples(command: click.Command) -> list[str]:
    """The command lines of a help text's Example(s) block, each ``edgetl ...`` part of an ``a && b`` line."""
    lines = (command.help or "").splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"\s*Examples?:\s*", line))
    found = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        code = re.split(r"\s#\s|\s>\s", line)[0]
        found += [part.strip() for part in code.split("&&")]
    return found


def _resolve(tokens: list[str]) -> tuple[click.Command, list[str]]:
    """The command an example runs and the options it gives (the global ones before it checked here)."""
    assert tokens[0] == "edgetl", tokens
    command: click.Command = cli
    rest = tokens[1:]
    while isinstance(command, click.Group):
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
        while rest[0].startswith("-"):
            flag = rest.pop(0)
            assert flag in options, f"{flag} is not an option of {command.name}"
            if flag == "--profiles":
                rest.pop(0)
        command = command.commands[rest.pop(0)]
    return command, rest


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_help_has_examples_that_name_real_options(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], terminal_width=40)
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*Examples?:$", result.output, re.M), result.output
    assert "-v, --verbose" in result.output  # every command takes it, after its name too
    examples = _examples(command)
    assert examples
    for example in examples:
        target, rest = _resolve(shlex.split(example))
        known = {o for p in target.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [t for t in rest if t.startswith("-") and t not in known]
        assert not unknown, f"{example}: {unknown} are not options of {target.name}"


def test_finetune_help_marks_what_it_needs():
    text = _flat(CliRunner().invoke(cli, ["finetune", "--help"], terminal_width=40).output)
    assert re.search(r"-m, --model TEXT .*? \[required unless --resume\] --data PATH .*? \[required unless "
                     r"--resume\] -o, --out DIRECTORY Run folder to write\. \[required\]", text), text


def test_finetune_without_model_is_one_line_exit_1(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: finetune needs a model and a dataset (--model NAME --data DIR)"


@pytest.fixture
def root_level():
    root = logging.getLogger()
    level = root.level
    yield root
    root.setLevel(level)


@pytest.mark.parametrize(("args", "level"), [
    (["devices", "--json"], logging.WARNING),
    (["devices", "-v", "--json"], logging.INFO),
    (["-v", "devices", "--json"], logging.INFO),
    (["-v", "devices", "--verbose", "--json"], logging.DEBUG),
    (["-v", "weights", "-v", "pull", "--help"], logging.DEBUG),  # a subgroup's too (pull's --help exits first)
])
def test_verbose_before_or_after_the_command(root_level, args, level):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert root_level.level == level


def test_verbose_after_the_command_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("EDGETL_DEBUG", raising=False)

    @click.group(cls=EdgetlGroup)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise RuntimeError("disk on fire")

    quiet = CliRunner().invoke(group, ["boom"])
    assert quiet.exit_code == 1 and "run again with -v" in quiet.stderr
    loud = CliRunner().invoke(group, ["boom", "-v"])
    assert isinstance(loud.exception, RuntimeError)
