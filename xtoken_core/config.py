"""The config design every part of xtoken uses: keyword-only, frozen dataclasses validated when built.

A config class subclasses `Config` and is decorated with `@config` (= `dataclass(frozen=True,
kw_only=True)`). Each field carries its type annotation (option strings as `Literal[...]`) and, through
`option(...)`, its help text and numeric bounds. Building an instance checks every field against
both, then calls the class's own `check()` for rules across fields; any failure raises the class's
`error_type` (a `ConfigError`) with a message naming `ClassName.field`, the value and what is valid.

`to_dict()` / `from_dict()` round-trip through plain JSON/YAML values (nested configs become dicts),
so an artifact's recorded parameters rebuild the config that made it, and configs can nest into the
trainer's config tree. `from_dict` refuses unknown keys, naming them.

The CLI generates its options from these fields (`fields_of`), so defaults live in one place.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, Mapping

from xtoken_core.errors import ConfigError

# Upper bounds shared by options and readers, so a typo (an extra digit, a missing unit) is refused
# before any work instead of failing in an allocation after it. Both lie far above real use: the
# largest tokenizers have about 262k ids, the longest model contexts about 10M tokens.
MAX_VOCAB_SIZE = 2**24  # 16,777,216: token ids and model vocabulary (output) widths
MAX_TOKENS = 2**24  # token budgets per sample (`max_length`)


def format_bound(v: float) -> str:
    """A bound as people write it: 16777216 and 1000000, not 1.67772e+07 and 1e+06; 0.5 as 0.5."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def config(cls):
    """Class decorator: a keyword-only, frozen dataclass (subclass `Config` for the behaviour)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def option(default=dataclasses.MISSING, *, help: str = "", min: float | None = None, max: float | None = None,
           gt: float | None = None, default_factory=dataclasses.MISSING, cli: bool = True):
    """A config field with its documentation and bounds.

    `min` / `max`: inclusive bounds; `gt`: exclusive lower bound. `cli=False` keeps the field off
    generated command lines (objects that are not plain values, for example).
    """
    meta = {"help": help, "min": min, "max": max, "gt": gt, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One config field as the CLI and the docs see it."""

    name: str
    type: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when required
    help: str
    min: float | None
    max: float | None
    gt: float | None
    cli: bool

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a `Literal[...]` field (None otherwise; `None` itself excluded)."""
        lit = _literal_of(self.type)
        return None if lit is None else tuple(v for v in typing.get_args(lit) if v is not None)

    @property
    def base_type(self) -> type | None:
        """`int`, `float`, `bool` or `str` for plain value fields (Optional unwrapped), else None."""
        args = [a for a in _union_args(self.type) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, bool, str):
            return args[0]
        return None

    @property
    def optional(self) -> bool:
        return type(None) in _union_args(self.type)


def _union_args(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _literal_of(tp):
    for a in _union_args(tp):
        if typing.get_origin(a) is Literal:
            return a
    return None


class Config:
    """Base of every config class (module doc)."""

    error_type: ClassVar[type[ConfigError]] = ConfigError

    def __post_init__(self) -> None:
        for f in fields_of(type(self)):
            self._check_field(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules across fields; subclasses override and raise `self.fail(...)`."""

    def fail(self, message: str) -> ConfigError:
        """The error to raise for `message` (prefixed with the class name)."""
        return self.error_type(f"{type(self).__name__}: {message}")

    def _check_field(self, f: FieldInfo, value) -> None:
        where = f"{type(self).__name__}.{f.name}"
        if value is None:
            if not f.optional:
                raise self.error_type(f"{where} must be set, got None")
            return
        choices = f.choices
        if choices is not None:
            if not any(value == c and type(value) is type(c) for c in choices):
                raise self.error_type(f"{where}={value!r}: valid values are " + ", ".join(map(repr, choices)))
            return
        base = f.base_type
        if base is None:
            return  # objects, mappings, sequences: checked by the class's own check()
        ok = (
            isinstance(value, bool) if base is bool
            else isinstance(value, int) and not isinstance(value, bool) if base is int
            else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
            else isinstance(value, str)
        )
        if not ok:
            raise self.error_type(f"{where} must be {_type_word(base)}" + (" or None" if f.optional else "")
                                  + f", got {value!r}")
        if base in (int, float):
            if base is float and not math.isfinite(value):
                raise self.error_type(f"{where} must be a finite number, got {value!r}")
            if f.min is not None and value < f.min:
                raise self.error_type(f"{where} must be >= {format_bound(f.min)}, got {value!r}")
            if f.gt is not None and not value > f.gt:
                raise self.error_type(f"{where} must be > {format_bound(f.gt)}, got {value!r}")
            if f.max is not None and value > f.max:
                raise self.error_type(f"{where} must be <= {format_bound(f.max)}, got {value!r}")

    def to_dict(self) -> dict:
        """Plain values (nested configs as dicts), in field order."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        """Build from `to_dict()` output (missing keys take their defaults; unknown keys are refused)."""
        data = dict(data or {})
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise cls.error_type(f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; valid fields are "
                                 + ", ".join(names))
        for name, value in list(data.items()):
            sub = _config_type(hints[name])
            if sub is not None and isinstance(value, Mapping):
                data[name] = sub.from_dict(value)
        return cls(**data)

    def replace(self, **changes):
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _config_type(tp):
    for a in _union_args(tp):
        if isinstance(a, type) and issubclass(a, Config):
            return a
    return None


def _type_word(base: type) -> str:
    return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}[base]


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)  # each base's annotations in its own module's globals
    return _HINTS[cls]


def fields_of(cls) -> list[FieldInfo]:
    """The fields of config class `cls` with resolved types, help and bounds, in order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(FieldInfo(f.name, hints[f.name], default, m.get("help", ""), m.get("min"), m.get("max"),
                             m.get("gt"), m.get("cli", True)))
    return out
