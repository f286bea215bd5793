"""Click options generated from an `xtoken_core.config` config class, so defaults live in one place.

    @config_options(ProjectionConfig, names={"student_model_vocab_size": "student-vocab-size"})
    def cmd(..., **fields): cfg = config_from(ProjectionConfig, fields)

One option per field (`fields_of`): its type, default, help, choices (`click.Choice` for a
`Literal`), bounds (`click.IntRange` / `click.FloatRange` from `min` / `max` / `gt`) and, for a bool,
a `--name/--no-name` flag pair. The option's name is the field's with `-` for `_` unless `names` maps
it to another; its parameter name is the field's, so `config_from` builds the config from the
command's keyword arguments. An out-of-range value raises `ConfigError` naming the option and the
field (the CLI prints it as one `error: ...` line, exit 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import click

from xtoken_core.config import FieldInfo, fields_of, format_bound
from xtoken_core.errors import ConfigError


def _range_words(f: FieldInfo) -> str:
    """'a positive integer (<= 256)', 'a number >= 0', 'a number in (0, 1]', 'an integer in [0, 3]', ..."""
    base = f.base_type
    if base is int and f.min == 1 and f.gt is None:
        return "a positive integer" + ("" if f.max is None else f" <= {format_bound(f.max)}")
    word = "an integer" if base is int else "a number"
    low = (f"({format_bound(f.gt)}" if f.gt is not None else f"[{format_bound(f.min)}" if f.min is not None else None)
    if low is not None and f.max is not None:
        return f"{word} in {low}, {format_bound(f.max)}]"
    if low is not None:
        return f"{word} {'>' if low[0] == '(' else '>='} {low[1:]}"
    return f"{word} <= {format_bound(f.max)}"


def _bounded(f: FieldInfo, owner: str | None) -> click.ParamType:
    """An `IntRange` / `FloatRange` whose failures (a value out of range, not a number, not finite)
    are `ConfigError`s naming the option (and the field, when `owner` names a config class)."""
    base = click.IntRange if f.base_type is int else click.FloatRange
    low, low_open = (f.gt, True) if f.gt is not None else (f.min, False)
    words = _range_words(f)
    field = f" ({owner}.{f.name})" if owner else ""

    class Bounded(base):
        def convert(self, value, param, ctx):
            try:
                out = super().convert(value, param, ctx)
                if isinstance(out, float) and not math.isfinite(out):  # nan passes every comparison
                    raise click.BadParameter(str(value))
                return out
            except click.BadParameter:
                opt = param.opts[0] if param is not None else f.name
                raise ConfigError(f"{opt} must be {words}, got {value}{field}") from None

    return Bounded(min=low, max=f.max, min_open=low_open)


def bounded(base: type, *, min: float | None = None, max: float | None = None,
            gt: float | None = None) -> click.ParamType:
    """The bounded click type of `config_options` for a plain option (not a config field):
    `type=bounded(int, min=1, max=65536)`; a bad value is one `ConfigError` line naming the option
    and the range, and `--help` shows the range."""
    return _bounded(FieldInfo("value", base, dataclasses.MISSING, "", min, max, gt, True), None)


def _literal_choice(choices: tuple) -> tuple[click.Choice, Callable]:
    """`click.Choice` over the values' strings, and a callback turning the string back into the value."""
    by_text = {str(c): c for c in choices}
    return click.Choice(list(by_text)), (lambda ctx, param, v: v if v is None else by_text[v])


def option_name(f: FieldInfo, names: Mapping[str, str]) -> str:
    """The option's name for field `f` (without the leading `--`)."""
    return names.get(f.name, f.name.replace("_", "-"))


def _option(cls: type, f: FieldInfo, names: Mapping[str, str], help_overrides: Mapping[str, str]):
    owner = cls.__name__
    name = option_name(f, names)
    helptext = help_overrides.get(f.name, f.help)
    default = None if f.default is dataclasses.MISSING else f.default
    kw: dict[str, Any] = {"help": helptext, "show_default": default is not None}
    if f.base_type is bool and f.choices is None:
        return click.option(f"--{name}/--no-{name}", f.name, default=bool(default), **kw)
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    elif default is not None:  # (an explicit default=None would count as given for click >= 8.2)
        kw["default"] = default
    choices = f.choices
    if choices is not None:
        kw["type"], kw["callback"] = _literal_choice(choices)
        if default is not None:
            kw["default"] = str(default)
    elif f.base_type in (int, float) and (f.min is not None or f.max is not None or f.gt is not None):
        kw["type"] = _bounded(f, owner)
    elif f.base_type is not None:
        kw["type"] = f.base_type
    else:
        raise TypeError(f"{owner}.{f.name}: no command-line form for type {f.type!r}; give it option(cli=False)")
    return click.option(f"--{name}", f.name, **kw)


def cli_fields(cls: type, only: Iterable[str] | None = None) -> list[FieldInfo]:
    """The fields of `cls` that get options (`option(cli=False)` ones left out), optionally only `only`."""
    wanted = None if only is None else set(only)
    out = [f for f in fields_of(cls) if f.cli and (wanted is None or f.name in wanted)]
    if wanted is not None and len(out) != len(wanted):
        missing = wanted - {f.name for f in out}
        raise TypeError(f"{cls.__name__} has no command-line field(s) {sorted(missing)}")
    return out


def config_options(cls: type, *, names: Mapping[str, str] | None = None, only: Iterable[str] | None = None,
                   help: Mapping[str, str] | None = None):
    """Decorator adding one click option per field of config class `cls` (module doc).

    `names`: field -> option name where they differ (bools: the name of the `--x/--no-x` pair);
    `only`: the fields to expose (default: every `cli` field); `help`: per-field help where the
    command wants other words than the field's.
    """
    names, help_overrides = dict(names or {}), dict(help or {})
    fields = cli_fields(cls, only)

    def decorate(fn):
        for f in reversed(fields):  # click lists options in decoration order, bottom-up
            fn = _option(cls, f, names, help_overrides)(fn)
        return fn

    return decorate


def config_from(cls: type, params: dict, only: Iterable[str] | None = None):
    """Pop `cls`'s option values out of a command's keyword arguments and build the config."""
    return cls(**{f.name: params.pop(f.name) for f in cli_fields(cls, only)})
