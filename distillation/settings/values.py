"""A value read from the config, checked against its key's type and range in the schema (schema.py): converted
where YAML 1.1 reads a number as text, refused with one sentence naming the key, the value and what it must be."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Literal

from distillation.settings.schema import ConfigError


def check_value(value: Any, kind: Any, metadata: typing.Mapping, source: str, key: str) -> Any:
    origin = typing.get_origin(kind)
    arguments = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in arguments:  # X | None
        if value is None:
            return None
        kind = next(argument for argument in arguments if argument is not type(None))
        origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value is False and "no" in arguments:  # YAML 1.1 reads an unquoted `no` (as in `--set ...=no`) as false
            value = "no"
        if value not in arguments:
            choices = ", ".join(repr(choice) for choice in arguments)
            misread = " (YAML reads an unquoted yes, no, on or off as true or false)" if isinstance(value, bool) else ""
            raise ConfigError(f"{source}: {key} is {value!r}{misread}; it must be one of {choices}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} is {value!r}; it must be a list, written [a, b, ...] in YAML.")
        # Each entry meets the field's type and range, e.g. a whole number at least 0.
        return [
            check_value(entry, arguments[0], metadata, source, f"{key}[{index}]") for index, entry in enumerate(value)
        ]
    converted = _convert(value, kind)
    if converted is None or not _in_range(converted, metadata):
        raise ConfigError(f"{source}: {key} is {value!r}; it must be {requirement(kind, metadata)}.")
    return converted


def _in_range(value: Any, metadata: typing.Mapping) -> bool:
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and (value < low or (metadata.get("low_open") and value == low)):
        return False
    return high is None or value <= high


def requirement(kind: type, metadata: typing.Mapping) -> str:
    """What a value of `kind` in the range of `metadata` must be, in words: "a whole number at least 1"."""
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and high is not None:
        bounds = f"above {low} and at most {high}" if metadata.get("low_open") else f"from {low} to {high}"
    elif low is not None:
        bounds = f"above {low}" if metadata.get("low_open") else f"at least {low}"
    else:
        bounds = f"at most {high}" if high is not None else ""
    return f"{_describe(kind)} {bounds}".strip()


def as_number(value) -> float | None:
    """`value` as a float, or None when it is not a number. YAML 1.1 (configue, `--set`) reads `1e-1` as text, so a
    text that is a plain number counts; true and false do not."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _convert(value: Any, kind: type) -> Any:
    """The value as `kind`, or None when it is not one (nan and infinities are no number of any key). YAML 1.1 reads
    `3e-4` as a string: accept it as a number."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # 8.0, or `1e5`, which YAML 1.1 reads as text; a quoted "8" stays text
        number = as_number(value) if isinstance(value, float) or _EXPONENT.fullmatch(str(value)) else None
        return int(number) if number is not None and number.is_integer() else None
    if kind is float:
        number = as_number(value)
        return number if number is not None and math.isfinite(number) else None
    if kind is str:
        return value if isinstance(value, str) and value.strip() else None
    return value


_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _describe(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a non-empty text"}.get(
        kind, kind.__name__
    )
