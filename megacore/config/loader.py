"""YAML to typed dataclasses, for any dataclass: the run config, job specs, cluster profiles.

Values are coerced by the field's annotation (int, float, str, bool, Literal, Optional, list, dict,
nested dataclasses); an unknown key or a wrong type raises ConfigError naming the dotted key. Dotted
`section.key=value` overrides are parsed as YAML values and applied to the raw mapping first.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megacore.errors import ConfigError


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_dataclass(cls: type, path: str | Path, section: str = "") -> Any:
    """Any dataclass from a YAML mapping, with the same typing and key-naming errors as Config."""
    raw = read_mapping(path, "file")
    try:
        return build_dataclass(cls, raw, section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key, value


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, value = parse_override(item)
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            full = _dotted_leaf(raw[key], f"{prefix}{key}")
            raise ConfigError(f"unknown config key {full!r} (valid here: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**kwargs)


def _dotted_leaf(node: Any, key: str) -> str:
    """`no.such.key=1` arrives as {"no": {"such": {"key": 1}}}: name the whole key, as the user wrote it."""
    while isinstance(node, dict) and len(node) == 1:
        (child, node), = node.items()
        key = f"{key}.{child}"
    return key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        # YAML 1.1 reads "3e-4" as a string; accept any text float() accepts.
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")
