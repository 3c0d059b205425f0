"""Shared CLI plumbing: load config, plugins and GPU once, print errors without tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import typer

from vlmhub.cli.output import PipeConsole
from vlmhub.config.gpu import detect_gpu
from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import LoadedConfig, ResolvedModel, find_config, load_config, resolve
from vlmhub.errors import VlmhubError
from vlmhub.sizing.vram import Gpu

console = PipeConsole()  # whole values when piped: see vlmhub.cli.output
err_console = PipeConsole(stderr=True)
T = TypeVar("T")

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="models.yaml (default: ./models.yaml, "
    "~/.config/vlmhub/models.yaml, else the built-in demo)",
)
GpuOption = typer.Option(None, "--gpu-gib", help="Plan for a GPU of this many GiB.")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn vlmhub's own errors into a red message and exit code 2: never a traceback."""
    try:
        yield
    except ConfigError as exc:
        err_console.print("[bold red]Configuration error[/]")
        for p in exc.problems:
            err_console.print(f"  {p}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    except VlmhubError as exc:
        err_console.print(f"[bold red]Error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@dataclass
class Context:
    """What most commands need. Properties load lazily, each once."""

    config_path: Path | None
    gpu_gib: float | None = None

    @cached_property
    def loaded(self) -> LoadedConfig:
        return load_config(find_config(self.config_path))

    @cached_property
    def registry(self) -> Registry:
        return Registry()

    @cached_property
    def gpu(self) -> Gpu:
        return detect_gpu(self.loaded.config.gpu, self.gpu_gib)

    def models(self, only: list[str] | None = None, check_fit: bool = True) -> list[ResolvedModel]:
        return resolve(self.loaded, self.registry.specs(), self.gpu, only=only, check_fit=check_fit)

    def model(self, name: str) -> ResolvedModel:
        """One model by name or alias; the error lists what exists."""
        every = self.models(check_fit=False)
        for m in every:
            if name == m.name or name in m.aliases:
                return self.models(only=[m.name])[0]
        known = ", ".join(m.name for m in every) or "none"
        raise ConfigError(
            [
                f"{self.loaded.path}: no model named {name!r}. Fix: use one of: "
                f"{known}, or add it under `models:`"
            ]
        )


def run_async(fn: Callable[[], T]) -> T:
    """Run a blocking entry point, turning Ctrl-C into a clean exit (code 130)."""
    try:
        return fn()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
