"""Output that survives a pipe: the CLI's consoles and ``--json``.

On a terminal, rich fits tables to its width. Written to a pipe or a file, rich would fit them
to 80 columns (or to the width of a terminal found on stdin or stderr), cutting names with
an ellipsis, so ``vlmhub models | grep phi3-vision`` found nothing. :class:`PipeConsole`
gives a console that is not writing to a terminal a width no row reaches (unless ``COLUMNS``
is set): every value is printed whole, one table row per line. Every table command also
takes ``--json`` (:data:`JsonOption`) and prints one JSON document with :func:`print_json`.
Nothing here blocks beyond writing to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions

PIPE_WIDTH = 100_000
"""The width of a console that does not write to a terminal: no row is cut or wrapped."""

JsonOption = typer.Option("--json", help="Print one JSON document instead of a table.")


class PipeConsole(Console):
    """A rich Console as wide as :data:`PIPE_WIDTH` when its output is not a terminal
    (unless ``COLUMNS`` or an explicit width says otherwise)."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self.is_terminal or self._width is not None or os.environ.get("COLUMNS"):
            return dims
        return ConsoleDimensions(PIPE_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        width, height = new_size
        self._width, self._height = width, height


def print_json(data: Any) -> None:
    """``data`` as one indented JSON document on stdout (no markup, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
