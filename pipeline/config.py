"""Typed, strict, frozen configs built from presets and ``key=value`` overrides.

Every stage declares one frozen dataclass tree. :func:`build_config` merges, in order, the
dataclass defaults, a named preset (a nested dict) and the command-line overrides, and checks
every key and value against the dataclass types before any work starts. An unknown key or a value
of the wrong type raises :class:`ConfigError` naming the key and the valid choices.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``, ``Literal[...]``,
``tuple[X, ...]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and what is allowed."""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r}")
        dotted, raw = arg.split("=", 1)
        value = _parse_value(raw)
        node = out
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is set both as a value and as a group")
        node[leaf] = value
    return out


def _parse_value(raw: str) -> Any:
    """YAML scalars and lists, with numbers like ``2e-4`` (which YAML 1.1 leaves as text)."""
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts (``update`` wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(cls: type, *layers: dict[str, Any]) -> Any:
    """Instantiate the frozen dataclass ``cls`` from nested-dict layers (later layers win)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    return _build(cls, merged, prefix="")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    # nested dataclass fields that were not given still need their defaults
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a group of settings; set its keys as {key}.<name>=value")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}"
            )
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}: {value!r}")
        return tuple(
            _coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config saved with :func:`to_dict` (strict, like the CLI)."""
    return build_config(cls, values)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (``config.yaml`` beside a run's outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """``(dotted key, type name, default)`` for every leaf of a config class (for ``--help``)."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", _type_name(tp), value))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if origin is tuple:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))
