"""Fuzzing models.yaml loading (issue 14, items 11 and 12).

Mutated copies of the shipped configs and random documents must each give either a valid
config or a :class:`ConfigError` whose every line is located (``file:line: ...``): never
another exception, and each example within the hypothesis deadline (an alias bomb or a deep
document must fail fast, not run for minutes).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import (
    Config,
    GpuConfig,
    ModelEntry,
    RouterConfig,
    RuntimeConfig,
    load_config,
    resolve,
)
from vlmhub.sizing.vram import Gpu
from vlmhub.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [(REPO / name).read_bytes() for name in ("models.yaml", "examples/demo.yaml")]
PLUGINS = Registry().specs()
FUZZ = settings(
    deadline=timedelta(seconds=3),
    max_examples=150,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _fields(model: type[BaseModel], seen: set[str]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield name
        for tp in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(tp, type) and issubclass(tp, BaseModel) and tp.__name__ not in seen:
                seen.add(tp.__name__)
                yield from _fields(tp, seen)


KEYS = sorted(
    {*_fields(Config, set()), *_fields(ModelSpec, set())}
    | {"dots-ocr", "qwen3-vl", "phi3-vision", "demo-ocr", "<<", "x"}
)
NASTY = [
    ".inf", "-.inf", ".nan", "1.0e999", "0", "-1", "-5", "65536", "70000", "1e3", "0x10",
    '""', "''", "~", "yes", "[]", "{}", "[0, 0]", "[-5, 3]", "[1, 70000]", "[200, 100]",
    "[8100, 8199]", "&a [*a]", "&a {k: *a}", "*a", "*missing", "&b 5", "!!binary AAAA",
    "!!python/object/apply:os.system ['true']", "!!int nope", "!!float x", "!!set {a}",
    "2020-99-99", "2001-12-14t21:59:43.10-05:00", "9" * 5000, "ftp://host/v1", "http://",
    "http://:80", "http://127.0.0.1:8000", '"inf"', "nan", "[{}]", "{a: 1}", "[1, [2, [3]]]",
    "- x", ":", "? x", "---", "...", "|", ">", '"open', "'", "@", "`", "%YAML 1.1",
    "a: b: c", "[" * 200, "{" * 100, "<<: *a", "!!omap [a: 1]", "'\x00'", "1:30",
]


def _lines(text: bytes) -> list[bytes]:
    return text.split(b"\n")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A shipped config with 1-4 edits: values swapped for nasty ones, lines duplicated,
    deleted, swapped, re-indented or inserted, bytes inserted, the file cut short."""
    lines = _lines(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["value", "dup", "del", "swap", "indent", "insert",
                                     "bytes", "cut"]))
        if kind == "value" and b":" in lines[i]:
            head = lines[i].split(b":", 1)[0]
            lines[i] = head + b": " + draw(st.sampled_from(NASTY)).encode()
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "del" and len(lines) > 1:
            del lines[i]
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            spaces = draw(st.integers(0, 6))
            lines[i] = b" " * spaces + lines[i].lstrip(b" ")
        elif kind == "insert":
            indent = b" " * draw(st.sampled_from([0, 2, 4, 6]))
            key, value = draw(st.sampled_from(KEYS)), draw(st.sampled_from(NASTY))
            lines.insert(i, indent + key.encode() + b": " + value.encode())
        elif kind == "bytes":
            at = draw(st.integers(0, len(lines[i])))
            blob = draw(st.binary(min_size=1, max_size=3))
            lines[i] = lines[i][:at] + blob + lines[i][at:]
        elif kind == "cut":
            lines = lines[: i + 1]
    return b"\n".join(lines)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY),
    st.text(alphabet="abz09.-:/ ", max_size=12),
)
DATA = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    ),
    max_leaves=30,
)


EDGES = st.sampled_from(
    [float("inf"), float("-inf"), float("nan"), "inf", "nan", 0, -5, 65536, 70000, [0, 0],
     [-5, 3], [1, 70000], [200, 100], [5], "", " ", [""], "ftp://host/v1", "http://",
     "http://:80", "127.0.0.1:8000", "http://127.0.0.1:8000", 8100, 12.5, True, None]
)


def _section(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    value = st.one_of(EDGES, SCALARS, DATA)
    return st.dictionaries(st.sampled_from(sorted(model.model_fields)), value, max_size=6)


SECTIONS = st.fixed_dictionaries(
    {},
    optional={
        "gpu": _section(GpuConfig),
        "router": _section(RouterConfig),
        "runtime": _section(RuntimeConfig),
        "models": st.dictionaries(
            st.sampled_from(["dots-ocr", "qwen3-vl", "ext", "mine"]),
            _section(ModelEntry),
            max_size=3,
        ),
    },
)
YAML_TEXT = st.text(alphabet=list("ab:-[]{},&*!|>'\"#%@` \n\n  09.~\x00\x85é\ufeff"), max_size=200)


def assert_sane(config: Config) -> None:
    """What item 12 says a config that loads may not hold. (Inline specs are raw data until
    :func:`resolve`; their floats are checked on the resolved specs.)"""
    plain = config.model_dump(exclude={"models": {"__all__": {"spec"}}})
    json.dumps(plain, allow_nan=False)  # ValueError for any inf or nan
    lo, hi = config.runtime.port_range
    assert 1 <= lo <= hi <= 65535
    assert 1 <= config.router.port <= 65535
    assert all(key.strip() for key in config.router.api_keys)
    assert config.router.admin_key is None or config.router.admin_key.strip()
    for entry in config.models.values():
        if entry.url is not None:
            url = urlsplit(entry.url)
            assert url.scheme in ("http", "https") and url.hostname, entry.url


def outcome(data: bytes) -> str:
    """``valid`` or ``refused``; any other exception fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.yaml"
        path.write_bytes(data)
        try:
            loaded = load_config(path)
            assert_sane(loaded.config)
            gpu = loaded.config.gpu
            card = Gpu(gpu.total_gib or 12.0, gpu.reserve_gib, gpu.budget_gib)
            for model in resolve(loaded, PLUGINS, card):
                json.dumps(model.spec.model_dump() if model.spec else {}, allow_nan=False)
        except ConfigError as exc:
            assert exc.problems
            located = re.compile(rf"^{re.escape(str(path))}:\d+: \S.*")
            for problem in exc.problems:
                assert located.match(problem), problem
                assert "Traceback" not in problem
            return "refused"
    return "valid"


def test_fuzz_shipped_configs_are_valid() -> None:
    assert [outcome(text) for text in SHIPPED] == ["valid", "valid"]


@FUZZ
@given(mutated())
@example(b"models: &a [*a]\n")
@example(b"gpu:\n  total_gib: 8\ngpu:\n  total_gib: 80\n")
@example(b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(  # 9**6 values: a small bomb
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n".encode()
    for p, c in zip("abcde", "bcdef", strict=True)
))
def test_fuzz_mutated_shipped_configs(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(DATA)
def test_fuzz_random_documents(data: Any) -> None:
    outcome(yaml.safe_dump(data).encode())


@FUZZ
@given(SECTIONS)
def test_fuzz_random_sections(data: dict[str, Any]) -> None:
    outcome(yaml.safe_dump(data).encode())


@FUZZ
@given(YAML_TEXT)
def test_fuzz_random_yaml_text(text: str) -> None:
    outcome(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("levels", [100, 5000])
def test_fuzz_deep_nesting_is_refused_not_a_recursion_error(levels: int) -> None:
    assert outcome(b"models: " + b"[" * levels + b"]" * levels + b"\n") == "refused"
