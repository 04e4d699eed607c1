"""Typed, strict, frozen configs built from layers: defaults, a preset, a YAML file, ``key=value``.

Every stage declares one frozen dataclass tree. :func:`build_config` merges its layers in order
(later wins) and checks every key and value against the dataclass types before any work starts.
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key and the
valid choices.

Command-line values stay text until the field's type is known (:class:`Raw`): ``name=007`` is the
string ``"007"``, ``seed=0x10`` is the integer 16, ``flag=yes`` is ``True``. Values from a preset
or a YAML file are already typed and are checked, not re-parsed.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``, ``Literal[...]``,
``tuple[X, ...]`` and nested dataclasses. A number's range is part of its type:
``Annotated[int, Range(1)]``, or one of the named ones below (:data:`Count`, :data:`Seed`, ...),
so every value is checked when the config is built, before a cluster or a model starts.

A field's help text is the comment beside it (or the comment lines just above it) in the class
source, so the documentation a reader of the code sees is the one ``--help`` prints.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from engine.atomic import write_bytes_atomic
from engine.errors import ConfigError


class Raw(str):
    """A value typed on the command line: parsed once the field's type is known."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a number field (``Annotated[int, Range(1)]``): ``lo <= v <= hi``,
    ``lo < v`` when ``open_lo``; ``None`` is unbounded."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def check(self, key: str, value: float) -> None:
        """Raise ConfigError naming ``key`` and the range when ``value`` is outside it."""
        low = self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)
        if low or self.hi is not None and value > self.hi:
            raise ConfigError(f"{key}={value} is out of range: it must be {self}")

    def __str__(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.open_lo else '>='} {_number(self.lo)}"
        hi = None if self.hi is None else f"<= {_number(self.hi)}"
        if lo and hi and not self.open_lo:
            return f"from {_number(self.lo)} to {_number(self.hi)}"
        return " and ".join(x for x in (lo, hi) if x)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


SEED_MAX = 2**31 - 1  # seeds are stored as int32 (the token dataset's seed column)

Count = Annotated[int, Range(1)]  # at least one: sizes, counts, epochs, batch sizes
NonNegative = Annotated[int, Range(0)]  # zero allowed (often "off" or "its default")
Seed = Annotated[int, Range(0, SEED_MAX)]  # a random seed (view seeds, training seeds)
Positive = Annotated[float, Range(0, open_lo=True)]  # a positive number: a learning rate, eps
NonNegativeFloat = Annotated[
    float, Range(0)
]  # zero allowed: a weight decay, a floor, an epoch share
Fraction = Annotated[float, Range(0, 1)]  # a share or a probability, 0 to 1


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage's config: records the preset its values started from."""

    # the preset these values started from (set with preset=<name>; recorded in config.yaml)
    preset: str | None = None

    presets: ClassVar[dict[str, dict]] = {}


# --- parsing the command line -------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict of :class:`Raw` strings."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r}")
        dotted, raw = arg.split("=", 1)
        node = out
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is set both as a value and as a group")
        if leaf in node:
            raise ConfigError(f"{dotted} is given twice; give each key once")
        node[leaf] = Raw(raw)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config layer (for example a run's saved ``config.yaml``)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise ConfigError(f"config={path}: {what}; give the config.yaml of a run")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"config={path} is not a text file (not UTF-8); give the config.yaml of a run"
        ) from None
    except OSError as err:
        raise ConfigError(f"config={path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config={path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config={path} must hold a mapping of keys, not {type(values).__name__}")
    return values


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts (``update`` wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --- building -----------------------------------------------------------------------------------


def build_config(cls: type, *layers: dict[str, Any]) -> Any:
    """Instantiate the frozen dataclass ``cls`` from nested-dict layers (later layers win)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    return _build(cls, merged, prefix="")


def build_stage_config(
    cls: type, overrides: dict[str, Any], *, stage: str = "", file: dict | None = None
) -> Any:
    """A stage's config from ``preset=``, ``config=<file>`` and ``key=value`` (in that order).

    The preset may come from the overrides or from the file (a saved ``config.yaml`` records it),
    so ``config=<run>/config.yaml`` rebuilds that run's config exactly.
    """
    overrides = dict(overrides)
    file = dict(file or {})
    name = overrides.pop("preset", None) or file.get("preset")
    presets = getattr(cls, "presets", {}) or {}
    layers: list[dict[str, Any]] = []
    if name is not None:
        if name not in presets:
            where = f" for stage={stage}" if stage else ""
            raise ConfigError(
                f"unknown preset {str(name)!r}{where}; presets: {', '.join(presets) or 'none'}"
            )
        layers.append(presets[name])
    layers += [file, overrides, {"preset": str(name)} if name is not None else {}]
    return build_config(cls, *layers)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in values.items()
    }
    return cls(**kwargs)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _split_list(raw: str) -> list[Raw]:
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [Raw(part.strip()) for part in text.split(",") if part.strip()]


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extras = get_args(tp)
        value = _coerce(inner, value, key)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(key, value)
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a group of settings; set its keys as {key}.<name>=value")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        is_null = value is None or isinstance(value, Raw) and value.lower() in _NULL
        keeps_empty_text = isinstance(value, Raw) and value == "" and str in args
        if type(None) in args and is_null and not keeps_empty_text:
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
        for choice in choices:
            if value == choice or isinstance(value, Raw) and value == str(choice):
                return choice
        raise ConfigError(
            f"{key}={str(value)!r} is not allowed; choose one of: {', '.join(map(str, choices))}"
        )
    if origin is tuple:
        if isinstance(value, str):
            value = _split_list(value)
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
        if isinstance(value, Raw) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {str(value)!r}")
    if tp is int:
        if isinstance(value, Raw):
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {str(value)!r}")
    if tp is float:
        number = None
        if isinstance(value, Raw):
            with contextlib.suppress(ValueError):
                number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {str(value)!r}")
        return number
    if tp is str:
        if isinstance(value, Raw):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r} (quote it in YAML)")
    raise ConfigError(f"{key}: unsupported config type {tp}")


# --- saving and describing ----------------------------------------------------------------------


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


def config_text(cfg: Any) -> str:
    """The resolved config as YAML: a complete layer (``config=<file>`` rebuilds ``cfg``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> str:
    """Write :func:`config_text` atomically (``config.yaml`` beside a run's outputs; a local
    path or an fsspec URL); returns the path."""
    return write_bytes_atomic(path, config_text(cfg).encode("utf-8"))


def describe(cls: type, prefix: str = "", values: Any = None) -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type name, value, help)`` for every leaf of a config (for ``--help``).

    ``values`` is a built config whose values to show (a preset's); default: the class defaults.
    """
    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    values = cls() if values is None else values
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}.", values=value))
        else:
            rows.append((f"{prefix}{f.name}", _type_name(tp), value, docs.get(f.name, "")))
    return rows


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the trailing one, else the lines just above."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno or node.lineno)
        if text is None:
            above = []
            line = node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(above)
        if text:
            out[node.target.id] = text
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extras = get_args(tp)
        ranges = [str(e) for e in extras if isinstance(e, Range)]
        return " ".join([_type_name(inner), *ranges])
    if origin is Literal:
        return "|".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if origin is tuple:
        args = get_args(tp)
        if args[-1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        names = [_type_name(a) for a in args]
        same = len(set(names)) == 1
        return f"list of {len(names)}: {names[0]}" if same else f"[{', '.join(names)}]"
    return getattr(tp, "__name__", str(tp))
