"""Values of a config read from YAML, checked against the frozen dataclass they fill: types coerced, unknown
keys named with a suggestion, ranges. Shared by the training config and the sections registered into it
(`rl:`); imports nothing but the errors."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Sequence

from glmv_jax.errors import ConfigError


def build(cls, values: dict[str, Any], where: str):
    """`cls(**values)` with every value coerced to its field's type; unknown keys raise `ConfigError` naming
    `where.key`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    reject_unknown(values, names, where)
    return cls(**{k: coerce(f"{where}.{k}", v, hints[k]) for k, v in values.items()})


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and lightly convert) a value against its field type; `ConfigError` naming the key otherwise."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple \
        else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    if typing.get_origin(base) is tuple or base is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of names, got {value!r}")
        return tuple(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def reject_unknown(values: dict, known: Sequence[str], where: str, what: str = "") -> None:
    for key in values:
        if key not in known:
            full = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            raise ConfigError(f"{what}unknown config key {full}{hint} (known keys"
                              f"{' in ' + where if where else ''}: {', '.join(known)})")


def choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} must be one of {', '.join(choices)}")


def positive(where: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{name} = {value!r} must be a positive integer")


def non_negative(where: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}.{name} = {value!r} must be a non-negative integer")


__all__ = ["build", "choice", "coerce", "non_negative", "positive", "reject_unknown"]
