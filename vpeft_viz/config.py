"""Validated configuration dataclasses.

Every knob a user can turn (a method's hyperparameters, the training recipe) lives in a
dataclass whose fields carry their own documentation and allowed range. The same metadata
validates command-line ``--set key=value`` overrides, builds the dashboard's forms and is
written into each run's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A documented dataclass field with an optional allowed range or set of choices."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """What a form needs to render one field."""

    name: str
    type: type
    default: Any
    help: str
    min: float | None
    max: float | None
    choices: tuple | None


_SCALARS = (bool, int, float, str)


def _base_type(tp: Any) -> type:
    """Reduce ``int | None`` style annotations to their scalar type."""
    if tp in _SCALARS:
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and args[0] in _SCALARS:
        return args[0]
    raise TypeError(f"unsupported config field type {tp!r}")


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


@dataclass
class Config:
    """Base class: subclasses declare fields with :func:`param`; values are checked on init."""

    prefix: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        for spec in self.field_specs():
            value = getattr(self, spec.name)
            setattr(self, spec.name, self._check(spec, value))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise :class:`ConfigError`."""

    @classmethod
    def field_specs(cls) -> list[FieldSpec]:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            m = f.metadata
            specs.append(
                FieldSpec(
                    name=f.name,
                    type=_base_type(hints[f.name]),
                    default=f.default,
                    help=m.get("help", ""),
                    min=m.get("min"),
                    max=m.get("max"),
                    choices=m.get("choices"),
                )
            )
        return specs

    @classmethod
    def _optional_field(cls, name: str) -> bool:
        return _optional(typing.get_type_hints(cls)[name])

    def _check(self, spec: FieldSpec, value: Any) -> Any:
        where = f"{self.prefix}.{spec.name}"
        if value is None:
            if self._optional_field(spec.name):
                return None
            raise ConfigError(f"{where} is required")
        tp = spec.type
        if tp is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise ConfigError(f"{where} must be an integer, got {value!r}")
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):  # NaN passes every range check (nan < lo is False)
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
        elif not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            allowed = ", ".join(map(str, spec.choices))
            raise ConfigError(f"{where} must be one of {allowed}; got {value!r}")
        lo, hi = spec.min, spec.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"{where} must be in {rng}, got {value!r}")
        return value

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Config:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.prefix} setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known)) or '(none)'}"
            )
        return cls(**values)

    @classmethod
    def from_strings(cls, pairs: dict[str, str]) -> Config:
        """Build from ``key=value`` strings (command line), parsing each by its field type."""
        specs = {s.name: s for s in cls.field_specs()}
        values: dict[str, Any] = {}
        for key, raw in pairs.items():
            if key not in specs:
                known = ", ".join(sorted(specs)) or "(none)"
                raise ConfigError(f"unknown {cls.prefix} setting {key!r}; known: {known}")
            values[key] = parse_value(f"{cls.prefix}.{key}", specs[key].type, raw,
                                      cls._optional_field(key))
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_value(where: str, tp: type, raw: str, optional: bool = False) -> Any:
    """Parse one command-line string into a field's type, with an error naming the field."""
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{where} expects a {tp.__name__}, got {raw!r}") from None
    return text


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Split ``["rank=4", "alpha=8"]`` into a dict, with a clear error on a missing '='."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out
