"""The ``vlmhub`` command line. One module per command group; each has ``register(app)``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="vlmhub",
    help="Run vision-language models on one GPU: VRAM-aware vLLM launcher and router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

GROUPS = ("models", "serve", "route", "ocr", "budgets", "simulate", "status", "cache", "pull",
          "node", "init", "usage")
"""Command modules under vlmhub.cli, registered in this order."""

for _group in GROUPS:
    try:
        _module = importlib.import_module(f"vlmhub.cli.{_group}")
    except ModuleNotFoundError as exc:  # a group still being built must not break the others
        if exc.name != f"vlmhub.cli.{_group}":
            raise
        continue
    _module.register(app)


def main() -> None:
    app()
