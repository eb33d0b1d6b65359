"""Typed dataclass configs: built from YAML presets plus dotted command-line overrides, validated when built.

    cfg = load_config(TrainConfig, "configs/countdown-rspo.yaml", ["objective.name=gspo", "seed=3"])

- Unknown keys, wrong types, non-finite numbers (``.inf``, ``.nan``) and values outside a ``Literal``
  raise :class:`ConfigError` naming the dotted field and the allowed values; dataclasses' own
  ``__post_init__`` checks ranges. A value echoed in an error is shortened (:func:`rspo.errors.brief`).
- Override values are parsed as YAML scalars (``3`` -> int, ``1e-3`` -> float, ``null`` -> None,
  ``[1, 2]`` -> list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from rspo.errors import ConfigError, FieldError, brief

T = TypeVar("T")


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-3" as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def check_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against type ``tp`` (Literal, Optional, list, dataclass, ...); ConfigError names ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={brief(value)} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}={brief(value)} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {brief(value)}")
        (inner, *_) = get_args(tp) or (Any,)
        out = [check_value(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {brief(value)}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            check_value(key_tp, k, f"{where} key"): check_value(val_tp, v, f"{where}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {brief(value)}")
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {brief(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {brief(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {brief(value)}")
        return value
    return value


def dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """Every field of dataclass ``cls`` as a dotted name, sections recursively (``optim.lr``)."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += dotted_fields(hints[f.name], f"{prefix}{f.name}.")
    return out


def suggest(name: str, cls: type, where: str = "") -> str | None:
    """The nearest valid dotted field name for a misspelled ``name`` of ``cls`` (``lr`` -> ``optim.lr``)."""
    prefix = f"{where}." if where else ""
    names = dotted_fields(cls)
    leaf = [n for n in names if n.rsplit(".", 1)[-1] == name]  # the right name in another section
    if leaf:
        return prefix + leaf[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if not close:  # a misspelled leaf in a section: compare last components
        tails = {n.rsplit(".", 1)[-1]: n for n in reversed(names)}
        close = [tails[t] for t in difflib.get_close_matches(name, list(tails), n=1, cutoff=0.75)]
    return prefix + close[0] if close else None


def build(cls: type[T], data: dict[str, Any] | None, where: str = "", *, name: Callable[[str], str] | None = None) -> T:
    """Instantiate dataclass ``cls`` from a (nested) mapping, checking every key and type.

    Errors name a field ``where.field`` (sections recursively), or as ``name(field)`` spells it for an engine
    with its own names (flat TRL fields, verl's config keys); a :class:`~rspo.errors.FieldError` raised by
    the dataclass's own checks is renamed the same way.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    spell = name or (lambda f: f"{where}.{f}" if where else f)
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        near = {k: s for k in unknown if (s := suggest(k, cls, where))} if name is None else {}
        if len(unknown) == 1 and near:
            hint = f" (did you mean {near[unknown[0]]}?)"
        else:
            hint = f" (did you mean {', '.join(f'{s} for {spell(k)}' for k, s in near.items())}?)" if near else ""
        valid = ", ".join(names if name is None else map(spell, names))
        raise ConfigError(
            f"unknown config field(s) {brief([spell(k) for k in unknown])}{hint}; valid fields of "
            f"{where or cls.__name__}: {valid}"
        )
    kwargs = {k: check_value(hints[k], v, spell(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{spell(e.field)}: {e.message}") from None
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(f"{where or cls.__name__}: {msg if len(msg) <= 400 else msg[:400] + ' ...'}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping (a copy)."""
    out = copy.deepcopy(data) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {brief(item)} must look like field.path=value")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {brief(item)}: {p!r} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) plus dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return build(cls, apply_overrides(data, overrides or []))


__all__ = ["ConfigError", "apply_overrides", "build", "check_value", "load_config", "save_config", "to_dict"]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string literal under each field), from its source."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in itertools.pairwise(body):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(get_args(tp)[0])}]" if get_args(tp) else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field of dataclass ``cls`` (sections recursively): ``name: type = default  doc``."""
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  (section)")
            lines += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {shown}")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return lines
