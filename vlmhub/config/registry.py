"""The model plugin registry: the stevedore namespace ``vlmhub.models``.

Built-in models (``plugins/``) and third-party ones load through the same entry-point path.
An entry point names either a :class:`~vlmhub.spec.ModelSpec` instance or a zero-argument
callable that returns one. A plugin that fails to load is recorded with its error and does
not stop the others. Loading imports plugin modules: it blocks, and runs once per process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from pydantic import ValidationError
from stevedore import ExtensionManager
from stevedore.extension import Extension

from vlmhub.spec import ModelSpec

NAMESPACE = "vlmhub.models"


@dataclass(frozen=True)
class PluginInfo:
    """One entry point: its spec when it loaded, else the error that stopped it."""

    name: str
    source: str
    spec: ModelSpec | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.spec is not None


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _source(ext: Any) -> str:
    """``module:attr (distribution version)``: where an entry point comes from.

    stevedore's entry-point cache drops ``EntryPoint.dist``, so the distribution is found
    from the top-level module instead.
    """
    value = str(ext.entry_point.value)
    top = value.split(":")[0].split(".")[0]
    for dist in _distributions().get(top, []):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{value} ({dist} {importlib.metadata.version(dist)})"
    return value


def _as_spec(name: str, obj: Any) -> ModelSpec:
    spec = obj if isinstance(obj, ModelSpec) else obj() if callable(obj) else obj
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"entry point gives {type(spec).__name__}, expected a ModelSpec")
    if spec.name != name:
        raise ValueError(f"entry point is named {name!r} but its spec is named {spec.name!r}")
    return spec


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        return f"invalid spec: {field}: {first['msg']}"
    return f"{type(exc).__name__}: {exc}"


class Registry:
    """Every model plugin found. Construction loads them all (blocking, imports modules)."""

    def __init__(self, extensions: Iterable[Any] | None = None) -> None:
        self.plugins: dict[str, PluginInfo] = {}
        if extensions is None:
            extensions = self._load_entry_points()
        for ext in extensions:
            if ext.name in self.plugins:
                continue
            try:
                spec = _as_spec(ext.name, ext.plugin)
                self.plugins[ext.name] = PluginInfo(ext.name, _source(ext), spec)
            except Exception as exc:
                self.plugins[ext.name] = PluginInfo(ext.name, _source(ext), error=_describe(exc))

    def _load_entry_points(self) -> list[Any]:
        def failed(_mgr: Any, ep: Any, exc: BaseException) -> None:
            self.plugins[ep.name] = PluginInfo(ep.name, ep.value, error=_describe(exc))

        # stevedore memoises entry points per namespace for the process; a Registry is built
        # rarely (once per command), so it always rescans what is installed now.
        ExtensionManager.ENTRY_POINT_CACHE.pop(NAMESPACE, None)
        mgr = ExtensionManager(NAMESPACE, invoke_on_load=False, on_load_failure_callback=failed)
        return list(mgr.extensions)

    @classmethod
    def from_specs(cls, specs: Iterable[ModelSpec]) -> Registry:
        """A registry of in-memory specs, through stevedore's own test instance (no patching)."""
        exts: list[Extension[Any]] = [
            Extension(s.name, cast(Any, _FakeEntryPoint(s.name)), cast(Any, s), None) for s in specs
        ]
        mgr = ExtensionManager.make_test_instance(exts, namespace=NAMESPACE)
        return cls(mgr.extensions)

    def specs(self) -> dict[str, ModelSpec]:
        return {n: p.spec for n, p in self.plugins.items() if p.spec is not None}

    def errors(self) -> dict[str, str]:
        return {n: p.error for n, p in self.plugins.items() if p.error is not None}


@dataclass(frozen=True)
class _FakeEntryPoint:
    name: str
    value: str = "(in memory)"
    dist: None = None
