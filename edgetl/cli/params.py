"""Click options generated from the option models of :mod:`edgetl.options`.

``@cli_options(ExportOptions)`` adds one click option per field (``--calib-method`` for
``calibration.method``), with the field's help text, choices and default. The command then calls
``parse(ExportOptions, kwargs)`` to get the validated model back. Only the options the user typed are
passed on, so the model supplies every default, and a bad value is reported with the flag's name.

``@cli_inputs("export")`` declares the shared models a stage takes (:data:`edgetl.options.STAGE_INPUTS`),
whole, and ``parse_inputs("export", kwargs)`` returns what the user typed of them as the stage function's
keyword arguments: a field added to a shared model becomes a flag of every command whose stage takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import click
from click.core import ParameterSource
from pydantic import BaseModel, ValidationError

from edgetl.errors import ConfigError
from edgetl.options import STAGE_INPUTS, StageOptions, format_errors, unwrap_optional

M = TypeVar("M", bound=StageOptions)
_SEP = "__"


class CommaList(click.ParamType):
    """``Add,Mul`` -> ``("Add", "Mul")``."""

    name = "A,B,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


class NumberOrWord(click.ParamType):
    """A number or one of a few words, for a field typed ``float | Literal["none"]`` (``--max-latency-ms none``)."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words
        self.name = "|".join(("FLOAT", *words))

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if text.lower() in self.words:
            return text.lower()
        try:
            return float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor {' or '.join(self.words)}", param, ctx)


def _number_or_words(tp: Any) -> tuple[str, ...] | None:
    """The words of a union of a number and literals (``float | Literal["none"]``), else None."""
    if get_origin(tp) not in (Union, UnionType):
        return None
    members = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(tp) if a is not type(None)]
    words = [w for m in members if get_origin(m) is Literal for w in get_args(m)]
    numbers = [m for m in members if m in (int, float)]
    return tuple(words) if len(numbers) == 1 and len(words) + 1 == len(members) else None


def _param_name(model: type[BaseModel], path: tuple[str, ...]) -> str:
    return _SEP.join((model.__name__, *path))


def _is_bool(field: Any) -> bool:
    return unwrap_optional(field.annotation) is bool


def _flags(field: Any, name: str, prefix: str) -> list[str]:
    declared = (field.json_schema_extra or {}).get("flag")
    if declared:
        return [declared] if _is_bool(field) else declared.split("/")
    flag = "--" + (prefix + name).replace("_", "-")
    return [f"{flag}/--no-{flag[2:]}"] if _is_bool(field) else [flag]


def _click_type(annotation: Any) -> Any:
    tp = unwrap_optional(annotation)
    if get_origin(tp) is Literal:
        return click.Choice(get_args(tp))
    if get_origin(tp) is tuple:
        return CommaList()
    if tp is Path:
        return click.Path()
    words = _number_or_words(tp)
    if words:
        return NumberOrWord(words)
    return {int: click.INT, float: click.FLOAT, bool: None}.get(tp, click.STRING)


def _shown_default(field: Any, flags: list[str]) -> str | None:
    default = field.default
    if _is_bool(field) and "/" not in flags[0]:  # a lone flag such as --json: off unless given
        return None
    if _is_bool(field) and default is not None:
        on, off = flags[0].split("/")
        return (on if default else off).lstrip("-")
    if default is None or default == ():
        return None
    return ",".join(default) if isinstance(default, tuple) else str(default)


def _walk(model: type[BaseModel], prefix: str = "", path: tuple[str, ...] = ()):
    """Yield ``(path, field, flags)`` for every leaf field, nested models flattened with their prefix."""
    for name, field in model.model_fields.items():
        sub = unwrap_optional(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            sub_prefix = (field.json_schema_extra or {}).get("flag", name)
            yield from _walk(sub, f"{prefix}{sub_prefix}_", (*path, name))
            continue
        yield (*path, name), field, _flags(field, name, prefix)


def flag_names(model: type[BaseModel]) -> dict[tuple[str, ...], str]:
    """Each field's path -> its main CLI flag (``("calibration", "method")`` -> ``--calib-method``)."""
    return {path: flags[0].split("/")[0] for path, _, flags in _walk(model)}


def _declared(func: Callable, flags: list[str], field: Any) -> bool:
    """Whether ``func`` already has the flag, as the same option (a stage model's :func:`shared_field` copy of a
    shared input: ``ExportOptions.threads`` declares ``--threads`` for ``TargetOptions.threads`` too).

    Raises:
        TypeError: the flag is taken by an option that means something else (a programming error).
    """
    names = {f.split("/")[0] for f in flags}
    for param in getattr(func, "__click_params__", ()):
        if names & {o.split("/")[0] for o in param.opts}:
            if not (param.help or "").startswith(field.description):
                raise TypeError(f"{func.__name__}: {sorted(names)[0]} is declared twice with different meanings")
            return True
    return False


def cli_options(model: type[BaseModel], only: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of ``model`` (or per top-level field named in ``only``).

    A flag the command already declares for the same option (declared by a decorator listed below this one) is
    not declared again; :func:`parse` then leaves that field unset.
    """

    def decorate(func: Callable) -> Callable:
        for path, field, flags in reversed(list(_walk(model))):
            if (only is not None and path[0] not in only) or _declared(func, flags, field):
                continue
            shown = None if "[default:" in field.description else _shown_default(field, flags)
            help_text = field.description + (f"  [default: {shown}]" if shown is not None else "")
            kind = _click_type(field.annotation)
            extra = {"is_flag": True} if kind is None else {"type": kind}
            func = click.option(*flags, _param_name(model, path), default=None, help=help_text, **extra)(func)
        return func

    return decorate


def parse(model: type[M], kwargs: dict[str, Any]) -> M:
    """Pop ``model``'s options from a command's ``kwargs`` and validate the ones the user typed.

    Raises:
        ConfigError: ``--calib-size: input should be greater than or equal to 1 (got 0) — ...``.
    """
    ctx = click.get_current_context()
    given: dict[str, Any] = {}
    for path, _field, _flags in _walk(model):
        name = _param_name(model, path)
        value = kwargs.pop(name, None)
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
            continue
        node = given
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        flags = flag_names(model)
        where = ctx.command_path
        raise ConfigError(format_errors(exc, model, where, name=lambda loc: flags.get(loc, loc[-1]))) from None


def cli_inputs(stage: str) -> Callable[[Callable], Callable]:
    """Declare the flags of every shared model ``stage`` takes (list it above the stage model's decorator)."""

    def decorate(func: Callable) -> Callable:
        for model in reversed(STAGE_INPUTS[stage]):
            func = cli_options(model)(func)
        return func

    return decorate


def parse_inputs(stage: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the user typed of ``stage``'s shared models, validated, as the stage function's keyword arguments."""
    given: dict[str, Any] = {}
    for model in STAGE_INPUTS[stage]:
        given.update(parse(model, kwargs).model_dump(exclude_unset=True))
    return given
