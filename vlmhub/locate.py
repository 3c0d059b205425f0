"""Located errors for YAML files: file, line, field and a fix, never a traceback.

:func:`load_yaml` returns the data and a :class:`Locator` that maps a path of keys
(``("models", "dots-ocr", "ttl")``) to its line. :func:`explain` turns a pydantic
``ValidationError`` into one readable line per problem. Pure apart from reading the file.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A bad configuration. ``str(err)`` is the message to show the user, one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Locator:
    path: str
    lines: dict[Loc, int]

    def line(self, loc: Loc) -> int | None:
        """The 1-based line of ``loc``, or of its nearest ancestor that exists in the file."""
        for end in range(len(loc), -1, -1):
            found = self.lines.get(tuple(loc[:end]))
            if found is not None:
                return found
        return None

    def where(self, loc: Loc) -> str:
        line = self.line(loc)
        return f"{self.path}:{line}" if line is not None else self.path

    def error(self, loc: Loc, message: str, fix: str = "") -> str:
        field = ".".join(str(p) for p in loc) or "(top level)"
        tail = f" Fix: {fix}" if fix else ""
        return f"{self.where(loc)}: {field}: {message}.{tail}"


def _walk(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, str(key.value))
            out[child] = key.start_mark.line + 1
            _walk(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), out)


def load_yaml(path: Path) -> tuple[Any, Locator]:
    """Read and parse ``path``; a syntax error becomes a located :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            [f"{path}{line}: YAML syntax: {problem}. Fix: check the indentation and quoting there."]
        ) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, Locator(str(path), lines)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``; of several options prefer the pydantic model."""
    while typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        tp = models[0] if models else (options[0] if options else None)
    return tp


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``loc``, walking dicts and lists."""
    current: Any = root
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        else:
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _fix(root: type[BaseModel], err: Any, loc: Loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(root, loc)
        known = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{hint}remove it, or use one of: {', '.join(known)}"
    if kind == "missing":
        return f"add the key {loc[-1]!r}"
    if kind.startswith(("int_", "float_")):
        return "write a number here"
    if kind.startswith("bool_"):
        return "write true or false"
    if kind.startswith(("dict_", "model_")):
        return "this must be a mapping of key: value lines"
    if kind.startswith("list_"):
        return "this must be a list"
    if kind.startswith("string_"):
        return "write a string here"
    if kind.startswith(("greater_than", "less_than")):
        return "choose a value in the allowed range"
    return ""


def explain(
    exc: ValidationError, root: type[BaseModel], locator: Locator, prefix: Loc = ()
) -> list[str]:
    """One located, fix-naming line per pydantic error."""
    problems: list[str] = []
    for err in exc.errors():
        loc: Loc = (*prefix, *(p for p in err["loc"] if not str(p).startswith("function-")))
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        fix = _fix(root, err, tuple(err["loc"]))
        problems.append(locator.error(loc, msg, fix))
    return problems
