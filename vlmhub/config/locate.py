"""Located errors for YAML files: file, line, field and a fix, never a traceback.

:func:`load_yaml` returns the data and a :class:`Locator` that maps a path of keys
(``("models", "dots-ocr", "ttl")``) to its line. :func:`explain` turns a pydantic
``ValidationError`` into one readable line per problem. Pure apart from reading the file.

Reading is bounded: the file is at most :data:`MAX_BYTES`, values nest at most
:data:`MAX_DEPTH` levels and the document holds at most :data:`MAX_VALUES` values with every
alias (``*name``) expanded, so an alias bomb or a recursive alias fails fast with a located
error. Duplicate keys are refused: YAML would silently keep the last one.
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

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 20_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """A bad configuration. ``str(err)`` is the message to show the user, one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class FieldProblem(ValueError):
    """Raised by a validator: ``problem`` is what is wrong, ``fix`` what to write instead.
    :func:`explain` shows both on the field's line."""

    def __init__(self, problem: str, fix: str):
        self.fix = fix
        super().__init__(problem)


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

    def error(self, loc: Loc, message: str, fix: str = "", line: int | None = None) -> str:
        field = ".".join(str(p) for p in loc) or "(top level)"
        tail = f" Fix: {fix}" if fix else ""
        where = f"{self.path}:{line}" if line is not None else self.where(loc)
        return f"{where}: {field}: {message}.{tail}"


class _Refused(Exception):
    """A problem found while reading the YAML: where, what and the fix."""

    def __init__(self, mark: Any, problem: str, fix: str):
        super().__init__(problem)
        self.line: int = mark.line + 1 if mark is not None else 1
        self.problem, self.fix = problem, fix


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses recursive aliases and documents that are too deep or too
    large once aliases are expanded. Sizes are counted as nodes are composed (each node once,
    each alias by the memoised size of its target), so the check costs one pass."""

    def __init__(self, text: str):
        super().__init__(text)
        self._ancestors: list[int] = []  # ids of the collections enclosing the node composed now
        self._size: dict[int, int] = {}  # node id -> values once every alias is expanded
        self._height: dict[int, int] = {}  # node id -> levels once every alias is expanded
        self._values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if parent is not None:
            self._ancestors.append(id(parent))
        try:
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None:  # else PyYAML reports the undefined alias
                    self._count_alias(event, target)
                return super().compose_node(parent, index)
            if len(self._ancestors) >= MAX_DEPTH:
                raise _Refused(
                    event.start_mark,
                    f"values are nested more than {MAX_DEPTH} levels deep",
                    "models.yaml needs a few levels; check the brackets and indentation",
                )
            self._add(1, event.start_mark)
            node = super().compose_node(parent, index)
            if node is not None:
                self._measure(node)
            return node
        finally:
            if parent is not None:
                self._ancestors.pop()

    def _count_alias(self, event: yaml.AliasEvent, target: yaml.Node) -> None:
        name = str(event.anchor)
        if id(target) in self._ancestors:
            raise _Refused(
                event.start_mark,
                f"the alias *{name} is inside the value &{name} it refers to (a recursive alias)",
                f"remove *{name} there, or write the value out",
            )
        if len(self._ancestors) + self._height.get(id(target), 1) > MAX_DEPTH:
            raise _Refused(
                event.start_mark,
                f"with the alias *{name} expanded, values are nested more than "
                f"{MAX_DEPTH} levels deep",
                "write the value out, or use fewer nested aliases",
            )
        self._add(self._size.get(id(target), 1), event.start_mark, name)

    def _add(self, values: int, mark: Any, alias: str = "") -> None:
        self._values += values
        if self._values > MAX_VALUES:
            via = f" (the alias *{alias} repeats {values} values)" if alias else ""
            raise _Refused(
                mark,
                f"the file holds more than {MAX_VALUES} values with its aliases expanded{via}",
                "use fewer aliases (`*name`) or fewer values; models.yaml needs far fewer",
            )

    def _measure(self, node: yaml.Node) -> None:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        self._size[id(node)] = 1 + sum(self._size.get(id(c), 1) for c in children)
        self._height[id(node)] = 1 + max((self._height.get(id(c), 1) for c in children), default=0)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A value PyYAML cannot build (``2020-99-99``, a 5,000-digit int) is located."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise _Refused(
                node.start_mark,
                f"cannot read the value {_short(node.value)}: {exc}",
                "quote it to make it a string, or correct it",
            ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _secret(loc: Loc) -> bool:
    """Keys, tokens and passwords are never echoed in an error."""
    words = ("key", "token", "secret", "password")
    return any(w in str(part).lower() for part in loc for w in words)


@dataclass
class _Walk:
    """Maps each key path to its line and collects duplicate keys; each node is checked once."""

    lines: dict[Loc, int]
    duplicates: list[tuple[Loc, int, int, bool]]  # key path, first line, line, a block?
    seen: set[int]

    def walk(self, node: yaml.Node, loc: Loc) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        first_visit = id(node) not in self.seen
        self.seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                child = (*loc, str(key.value))
                line = key.start_mark.line + 1
                self.lines[child] = line
                if first_visit and isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    ident = (key.tag, key.value)
                    if ident in first:
                        block = isinstance(value, yaml.MappingNode)
                        self.duplicates.append((child, first[ident], line, block))
                    else:
                        first[ident] = line
                self.walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*loc, i))


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            [
                f"{path}:1: YAML: the file is {len(raw)} bytes, more than models.yaml may be "
                f"({MAX_BYTES}). Fix: check that this is the right file."
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [
                f"{path}:{line}: YAML: the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                f"at column {column}). Fix: save the file as UTF-8."
            ]
        ) from None


def _compose(path: Path, text: str) -> tuple[Any, _Walk]:
    try:
        loader = _BoundedLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise ConfigError(
            [
                f"{path}:{line}: YAML: the character U+{ord(char):04X} is not allowed "
                "in YAML. Fix: remove it (is this a text file?)."
            ]
        ) from None
    try:
        node = loader.get_single_node()
        found = _Walk({}, [], set())
        if node is not None:
            found.walk(node, ())  # before construction, which merges `<<` keys in place
        data = loader.construct_document(node) if node is not None else None
        return data, found
    except _Refused as exc:
        raise ConfigError([f"{path}:{exc.line}: YAML: {exc.problem}. Fix: {exc.fix}."]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            [f"{path}{at}: YAML syntax: {problem}. Fix: check the indentation and quoting there."]
        ) from None
    finally:
        loader.dispose()


def load_yaml(path: Path) -> tuple[Any, Locator]:
    """Read and parse ``path``. Every problem (not UTF-8, a control character, bad syntax, a
    recursive alias, too large, a duplicate key) becomes a located :class:`ConfigError`."""
    data, found = _compose(path, _read_text(path))
    locator = Locator(str(path), found.lines)
    if found.duplicates:
        raise ConfigError(
            [
                locator.error(
                    loc,
                    f"duplicate key (first on line {first}); YAML would silently use the last one",
                    f"merge the two `{loc[-1]}:` blocks into one"
                    if block
                    else f"keep the one `{loc[-1]}:` you mean and delete the other",
                    line=line,
                )
                for loc, first, line, block in found.duplicates
            ]
        )
    return data, locator


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
    if kind == "finite_number":
        return "write a finite number, or remove the key to use the default"
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
        elif err["type"] != "missing" and not isinstance(err.get("input", {}), dict):
            msg = msg if _secret(loc) else f"{msg} (got {_short(err['input'])})"
        raised = err.get("ctx", {}).get("error")
        fix = raised.fix if isinstance(raised, FieldProblem) else _fix(root, err, err["loc"])
        problems.append(locator.error(loc, msg, fix))
    return problems
