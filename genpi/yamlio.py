"""YAML as the user wrote it: the 1.2 core schema, and scalars typed by the field they feed.

PyYAML reads YAML 1.1, where `off` and `no` are booleans and `0123456` an octal number, so
`train.pg_target=off`, a check's `lang: no` and `model.revision=0123456` did not reach their
string fields as written. `YamlLoader` reads the YAML 1.2 core schema and keeps the text of every
plain scalar that reads as null, a bool or a number (`Scalar`); `typed` then gives a field that
takes a string the text, any other field the value. Used for config files, `key=value`
overrides and manifests alike.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel


@dataclass(frozen=True)
class Scalar:
    """A plain (unquoted) scalar that reads as null, a bool or a number, and the text written.

    Kept until the field it feeds is known (`typed`): a string field gets `text`
    (`revision: 0123456` stays "0123456"), any other field `value`.
    """
    text: str
    value: Any


def _number(text: str) -> int | float:
    t = text.lower()
    if t.startswith(("0o", "0x")):
        return int(t[2:], 8 if t[1] == "o" else 16)
    if t.lstrip("+-") in (".inf", ".nan"):
        return float(t.replace(".", ""))
    return float(text) if re.search(r"[.eE]", text) else int(text)


# YAML 1.2 core schema (not PyYAML's 1.1): only true/false are booleans (yes/no/on/off are
# words, so `pg_target: off` and `lang: no` mean what they say), ints are decimal (0123 is not
# octal), no dates or sexagesimals.
_CORE_SCHEMA = [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF", lambda t: t.lower() == "true"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789", _number),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     "-+.0123456789", _number),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""], lambda t: None),
]


class YamlLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2 core-schema scalars (as `Scalar`s) that refuses duplicate keys."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # its own table, not SafeLoader's 1.1 one

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden; the base class merges them
            key = self.construct_object(key_node, deep=deep)
            if key in seen:  # a list, not a set: YAML keys may be unhashable (the base class reports those)
                shown = key.value if isinstance(key, Scalar) else key
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {shown!r}", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _scalar_constructor(tag: str, convert: Any) -> Any:
    def construct(loader: YamlLoader, node: yaml.ScalarNode) -> Scalar:
        text = loader.construct_scalar(node)
        try:
            return Scalar(text, convert(text))
        except ValueError:  # only with an explicit tag such as `!!int abc`
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a {tag}", node.start_mark) from None
    return construct


for _tag, _regex, _first, _convert in _CORE_SCHEMA:
    YamlLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"(?:{_regex})\Z"), list(_first))
    YamlLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar_constructor(_tag, _convert))
# Merge keys (`<<: *defaults`) are YAML 1.1, but config files written for PyYAML use them.
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"<<\Z"), ["<"])


def typed(value: Any, annotation: Any = Any) -> Any:
    """`value` (from `YamlLoader`) with every `Scalar` resolved for the type it feeds.

    Where the type takes a string and not the scalar's value, the text as written; otherwise the
    value (null stays None). Walks pydantic models, lists, dicts and unions (a tagged union by its tag).
    """
    if isinstance(value, Scalar):
        kinds = _scalar_kinds(annotation)
        v = value.value
        fits = object in kinds or type(v) in kinds or (type(v) is int and float in kinds)
        return value.text if str in kinds and not fits and v is not None else v
    if isinstance(value, list):
        return [typed(v, _arg_of(annotation, list)) for v in value]
    if isinstance(value, dict):
        model = _model_of(annotation, value)
        if model is None:
            return {plain(k): typed(v, _arg_of(annotation, dict, 1)) for k, v in value.items()}
        fields = model.model_fields
        return {k: typed(v, fields[k].annotation if k in fields else Any) for k, v in _plain_keys(value)}
    return value


def plain(value: Any) -> Any:
    """`value` itself, or the YAML value of a `Scalar` (for keys and tags, which are never typed)."""
    return value.value if isinstance(value, Scalar) else value


def _plain_keys(d: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return [(plain(k), v) for k, v in d.items()]


def _members(annotation: Any) -> list[Any]:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _scalar_kinds(annotation: Any) -> set[type]:
    kinds: set[type] = set()
    for m in _members(annotation):
        if m is Any:
            kinds.add(object)
        elif get_origin(m) is Literal:
            kinds.update(type(a) for a in get_args(m))
        elif m in (str, int, float, bool, type(None)):
            kinds.add(m)
    return kinds


def _arg_of(annotation: Any, container: type, index: int = 0) -> Any:
    for m in _members(annotation):
        if get_origin(m) is container and len(get_args(m)) > index:
            return get_args(m)[index]
    return Any


def _model_of(annotation: Any, value: dict[Any, Any]) -> type[BaseModel] | None:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1:  # a tagged union (a manifest's checks): the member whose Literal tags match
        models = [
            m for m in models
            if all(plain(value[k]) in get_args(f.annotation) for k, f in m.model_fields.items()
                   if k in value and get_origin(f.annotation) is Literal)
        ]
    return models[0] if len(models) == 1 else None
