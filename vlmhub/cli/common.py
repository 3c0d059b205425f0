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
from vlmhub.config.gpu import detect_gpu, find_gpu
from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import (
    BUILTIN_CONFIG,
    DEMO_CONFIG,
    USER_CONFIG,
    LoadedConfig,
    ModelEntry,
    ResolvedModel,
    find_config,
    load_config,
    resolve,
)
from vlmhub.errors import VlmhubError
from vlmhub.sizing.vram import Gpu

console = PipeConsole()  # whole values when piped: see vlmhub.cli.output
err_console = PipeConsole(stderr=True)
T = TypeVar("T")
STAND_IN = "vlmhub.testing.stub_engine"

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="models.yaml (default: ./models.yaml, ~/.config/vlmhub/models.yaml, else the "
    "built-in plugins on a GPU, or the stand-in demo without one)",
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
        """The config file, loaded. Without a models.yaml, says on stderr which built-in one
        it read (the plugins on a GPU, else the stand-in demo)."""
        path = find_config(self.config_path, self.have_gpu)
        if self.config_path is None and path in (BUILTIN_CONFIG, DEMO_CONFIG):
            err_console.print(fallback_note(path), highlight=False, soft_wrap=True)
        return load_config(path)

    @property
    def demo(self) -> bool:
        """Whether the engines are stand-ins (the demo: test doubles, not models)."""
        return STAND_IN in " ".join(self.loaded.config.runtime.process_argv)

    def have_gpu(self) -> bool:
        """A GPU to plan for: ``--gpu-gib``, or one the driver (or a pretend one) reports."""
        return self.gpu_gib is not None or find_gpu() is not None

    @cached_property
    def registry(self) -> Registry:
        return Registry()

    @cached_property
    def gpu(self) -> Gpu:
        return detect_gpu(self.loaded.config.gpu, self.gpu_gib)

    def models(self, only: list[str] | None = None, check_fit: bool = True) -> list[ResolvedModel]:
        return resolve(self.loaded, self.registry.specs(), self.gpu, only=only, check_fit=check_fit)

    def model(self, name: str) -> ResolvedModel:
        """One model by name or alias; the error lists what exists. Without a models.yaml a
        plugin's name serves that plugin at its defaults on the GPU (and says plainly that it
        needs one when there is none)."""
        every = self.models(check_fit=False)
        for m in every:
            if name == m.name or name in m.aliases:
                return self.models(only=[m.name])[0]
        known = ", ".join(m.name for m in every) or "none"
        builtin = self.loaded.path.resolve() == BUILTIN_CONFIG.resolve()
        if self.config_path is None and name in self.registry.specs():
            if not builtin:
                raise VlmhubError(needs_gpu(name, known))
            models = {**self.loaded.config.models, name: ModelEntry(plugin=name)}
            config = self.loaded.config.model_copy(update={"models": models})
            self.__dict__["loaded"] = LoadedConfig(config, self.loaded.path, self.loaded.locator)
            return self.models(only=[name])[0]
        raise ConfigError(
            [
                f"{self.loaded.path}: no model named {name!r}. Fix: use one of: "
                f"{known}, or add it under `models:`"
            ]
        )


def fallback_note(path: Path) -> str:
    """What a command says when it reads a built-in config (no models.yaml was found)."""
    if path == BUILTIN_CONFIG:
        return (f"No models.yaml (here or in {USER_CONFIG}): using the built-in plugins "
                f"({path}). `vlmhub init` writes a models.yaml for this GPU to edit.")
    return (f"No models.yaml (here or in {USER_CONFIG}) and no NVIDIA GPU found: using the "
            f"stand-in DEMO ({path}): test doubles, not real models.")


def needs_gpu(name: str, demo_models: str) -> str:
    """The plain answer to serving a real model where no GPU was found."""
    return (f"{name} is a real model: it runs on an NVIDIA GPU, and none was found (NVML; "
            f"`nvidia-smi` shows what the driver sees). To try vlmhub without one, run the "
            f"stand-in demo: `vlmhub serve {demo_models.split(', ')[0]}` or `vlmhub route` "
            f"(models: {demo_models}). On a GPU machine `vlmhub serve {name}` serves it at "
            "its defaults, and `vlmhub init` writes a models.yaml for the card.")


def run_async(fn: Callable[[], T]) -> T:
    """Run a blocking entry point, turning Ctrl-C into a clean exit (code 130)."""
    try:
        return fn()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
