"""What people type into a config, read the way they mean it, and config errors that say how to fix them.

* :func:`parse_value` reads a ``--set key=value`` value as a YAML scalar, except that a text field keeps the text
  as typed (``model.sam2_version=2.1`` → ``"2.1"``; ``train.device=0`` → ``"0"``) and ``1e-4`` (which YAML 1.1
  reads as a string) is a number.
* :func:`numbers_as_text` does the same for a YAML file (``sam2_version: 2.1``) inside the models' validation.
* :func:`config_error` turns a pydantic ``ValidationError`` into one :class:`~medsam2.errors.ConfigError`: an
  unknown key names the closest valid keys (difflib), a choice error lists the choices and the closest one.
* :class:`OneOf` makes a text field a name of a :class:`~medsam2.registry.Registry` (``Annotated[str,
  OneOf(ADAPTERS)]``): checked against the registry's names when a config is validated, not when it is
  written, so a variant registered later (a new module, a test) is accepted, and a wrong name is the same choice
  error as a ``Literal``'s. :func:`choices` lists every choice field of a config (the CLI's help).

The schema is read from the pydantic models themselves (``model_fields`` and their annotations), so a new field
or section needs nothing here.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationError
from pydantic_core import PydanticKnownError, core_schema

from medsam2.errors import ConfigError
from medsam2.registry import Registry

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 1e-4, 5E3: numbers YAML 1.1 leaves as text


@dataclass(frozen=True)
class OneOf:
    """Field metadata: the value is one of ``extra`` or a name registered in ``registry`` (read at validation).

    A wrong name raises pydantic's own ``literal_error`` (what a ``Literal`` field raises), so it reads the same
    everywhere: ``model.adapter: 'loraa' is not one of bottleneck, decoder_only, full, lora; did you mean 'lora'?``.
    The JSON schema lists the names as an ``enum``."""

    registry: Registry
    extra: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return [*self.extra, *(n for n in self.registry.names() if n not in self.extra)]

    def _check(self, value: str) -> str:
        if value in self.extra or value in self.registry:
            return value
        quoted = [repr(n) for n in self.names()]
        expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else "".join(quoted)
        raise PydanticKnownError("literal_error", {"expected": expected})

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {**handler(schema), "enum": self.names()}


def choices(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Every choice field of ``model`` → its choices: ``{"model.adapter": ["bottleneck", …], …}`` (``OneOf``
    fields read their registry now; ``Literal`` fields their values)."""
    out: dict[str, list[str]] = {}
    for name, f in model.model_fields.items():
        sub = _section(f.annotation)
        if sub is not None:
            out.update(choices(sub, f"{prefix}{name}."))
            continue
        one_of = next((m for m in f.metadata if isinstance(m, OneOf)), None)
        literal = [c for arm in _arms(f.annotation) if typing.get_origin(arm) is Literal for c in typing.get_args(arm)]
        if one_of is not None or literal:
            out[prefix + name] = one_of.names() if one_of is not None else [str(c) for c in literal]
    return out


def _arms(annotation: Any) -> list[Any]:
    """The alternatives of a union (``str | None`` → [str, NoneType]); a single type → [it]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [a for arm in typing.get_args(annotation) for a in _arms(arm)]
    return [annotation]


def _admits(annotation: Any, value: Any) -> bool:
    """Whether a scalar ``value`` fits ``annotation`` as is (no coercion)."""
    for arm in _arms(annotation):
        if typing.get_origin(arm) is Literal:
            if any(value == c and type(value) is type(c) for c in typing.get_args(arm)):
                return True
        elif arm is Any or (isinstance(arm, type) and isinstance(value, arm)
                            and not (arm in (int, float) and isinstance(value, bool))):
            return True
    return False


def _is_text(annotation: Any) -> bool:
    """``str``, a ``Literal`` of strings, or a union with one of those."""
    return any(arm is str or (typing.get_origin(arm) is Literal and any(isinstance(c, str)
                                                                         for c in typing.get_args(arm)))
               for arm in _arms(annotation))


def _section(annotation: Any) -> type[BaseModel] | None:
    for arm in _arms(annotation):
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            return arm
    return None


def field_annotation(model: type[BaseModel], key: str) -> Any | None:
    """Annotation of the dotted ``key`` in ``model`` (``'model.sam2_version'``), or None if no such field."""
    node: type[BaseModel] | None = model
    ann: Any = None
    for part in key.split("."):
        if node is None or part not in node.model_fields:
            return None
        ann = node.model_fields[part].annotation
        node = _section(ann)
    return ann


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``: sections and their fields (``train``, ``train.lr``, ...)."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        out.append(prefix + name)
        sub = _section(f.annotation)
        if sub is not None:
            out += all_keys(sub, f"{prefix}{name}.")
    return out


def parse_value(model: type[BaseModel], key: str, raw: str) -> Any:
    """One ``--set`` value: a YAML scalar, but the raw text for a text field that the parsed value does not fit."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # e.g. "a: b" or an unbalanced quote: the value is the text itself
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)
    ann = field_annotation(model, key)
    if ann is not None and isinstance(value, (bool, int, float)) and _is_text(ann) and not _admits(ann, value):
        return raw.strip()
    return value


def numbers_as_text(model: type[BaseModel], data: Any) -> Any:
    """A model's input dict with numbers given to text-only fields turned into their text (``2.1`` → ``"2.1"``)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, value in data.items():
        f = model.model_fields.get(name)
        if (f is not None and isinstance(value, (int, float)) and not isinstance(value, bool)
                and _is_text(f.annotation) and not _admits(f.annotation, value)):
            out[name] = str(value)
    return out


def _suggest(model: type[BaseModel], key: str) -> list[str]:
    """Valid keys closest to the unknown dotted ``key``: the same leaf in another section first, then the
    closest keys of the same section, then the closest keys anywhere."""
    keys = all_keys(model)
    leaf = key.rsplit(".", 1)[-1]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    near_sibling = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6)
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    out: list[str] = []
    for k in same_leaf + near_sibling + near:
        if k not in out:
            out.append(k)
    return out[:3]


def _flat_keys(tree: dict[str, Any], prefix: str) -> list[str]:
    out: list[str] = []
    for k, v in tree.items():
        out += _flat_keys(v, f"{prefix}.{k}") if isinstance(v, dict) and v else [f"{prefix}.{k}"]
    return out


def _choices(err: dict[str, Any]) -> list[str]:
    expected = str((err.get("ctx") or {}).get("expected", ""))
    return re.findall(r"'([^']*)'", expected)


def _describe_one(model: type[BaseModel], err: dict[str, Any]) -> tuple[str, str | None]:
    """(message, hint) for one pydantic error dict."""
    key = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "config"
    kind, got = err.get("type"), err.get("input")
    if kind == "extra_forbidden":
        if isinstance(got, dict) and got:  # an unknown section: name the dotted key that was typed
            key = _flat_keys(got, key)[0]
        near = _suggest(model, key)
        section = key.rsplit(".", 1)[0] if "." in key else ""
        msg = f"unknown key {key!r}" + (f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else "")
        sub = field_annotation(model, section) if section else None
        valid = ", ".join((_section(sub) or model).model_fields) if (sub is not None or not section) else ""
        return msg, (f"valid keys of {section or 'the config'}: {valid}" if valid else None)
    if kind == "literal_error":
        choices = _choices(err)
        near = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5)
        msg = f"{key}: {got!r} is not one of {', '.join(choices)}"
        return msg + (f"; did you mean {near[0]!r}?" if near else ""), f"set it with --set {key}={(near or choices)[0]}"
    text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":  # a model validator's own message (already names the key and the choices)
        return text, None
    return f"{key}: {text} (got {got!r})", None


def config_error(exc: ValidationError, model: type[BaseModel], where: str = "config") -> ConfigError:
    """A pydantic ``ValidationError`` of ``model`` → one :class:`ConfigError` whose message names every bad key
    (with the closest valid keys / the choices) and whose hint says what to do."""
    parts = [_describe_one(model, e) for e in exc.errors()]
    msg = "; ".join(m for m, _ in parts)
    hint = next((h for _, h in parts if h), None) or f"fix the value in {where}"
    return ConfigError(f"invalid config ({where}): {msg}", hint)
