"""dots.ocr-style layout JSON -> cells and Markdown. Pure; used by plugins' ``postprocess``
hooks, by ``vlmhub ocr`` (whether a page was recovered) and by the web page's OCR playground.

The model answers a JSON list of ``{bbox, category, text}`` cells in reading order. Tables
arrive as HTML, formulas as LaTeX, other text as Markdown; a Picture has no text. Three ways
an answer goes wrong are repaired, and the page is then marked ``recovered``:

- **cut short** by ``max_tokens``: the complete cells are kept, and the cell that was being
  written is kept too when its text can be closed (marked ``partial``);
- **repeated-cell loops** (a model that keeps writing the same cells): a cell identical to an
  earlier one (category, text and bbox) is dropped, and a run of the same cells (period 1 to
  8, by category and text) repeated 3 times or more in a row is kept once;
- **not JSON at all**: nothing can be recovered. The page is marked ``not recovered`` (never
  ``recovered``, never fine): its Markdown is only a comment saying so, and ``vlmhub ocr``
  reports the page as failed, keeping the raw answer.

The bboxes are in the pixels of the image the model saw: vLLM's processor resizes every image
to multiples of ``factor`` (28) within ``min_pixels``..``max_pixels`` (:func:`smart_resize`,
as dots.ocr's and Qwen2-VL's processors do). :func:`read_layout` maps them back to the
original image's pixels when its size is given, and clamps them to the image.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vlmhub.ocr.formulas import formula_markdown, text_markdown

SKIPPED = frozenset({"Page-header", "Page-footer"})
RECOVERED_MARK = "<!-- vlmhub: recovered"
"""The start of the comment line :func:`render_markdown` adds to a recovered page."""
NOT_RECOVERED_MARK = "<!-- vlmhub: not recovered"
"""The start of the comment line :func:`render_markdown` writes for an answer that is not
layout JSON at all."""
FACTOR = 28
MIN_PIXELS = 3136
MAX_PIXELS = 11289600
LOOP_MIN_REPEATS = 3
LOOP_MAX_PERIOD = 8
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
_CLOSERS = ('"}', "}", '"]}', "]}")
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Cell:
    """One layout element. ``bbox`` is ``(x1, y1, x2, y2)`` or None when missing/invalid."""

    category: str
    text: str
    bbox: Box | None
    partial: bool = False  # the cell the answer was cut in: its text is incomplete

    def as_json(self) -> dict[str, Any]:
        return {"category": self.category, "text": self.text,
                "bbox": list(self.bbox) if self.bbox else None, "partial": self.partial}


@dataclass(frozen=True)
class Layout:
    """The cells of one answer and what had to be repaired to read them."""

    cells: list[Cell]
    truncated: bool = False  # cut short: the JSON list was not closed
    malformed: bool = False  # not a JSON list of cells at all
    repeats_dropped: int = 0  # cells dropped as repeated-cell loops
    notes: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> bool:
        """Whether something had to be repaired and the rest could be read (the page is usable
        but not as answered). An answer that is not layout JSON is not recovered: see
        :attr:`malformed`."""
        return not self.malformed and (self.truncated or self.repeats_dropped > 0)

    def as_json(self) -> dict[str, Any]:
        return {"cells": [c.as_json() for c in self.cells], "recovered": self.recovered,
                "truncated": self.truncated, "malformed": self.malformed,
                "repeats_dropped": self.repeats_dropped, "notes": list(self.notes)}


# ----------------------------------------------------------------------------- geometry
def smart_resize(width: int, height: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) the model's processor resizes a ``width`` x ``height`` image to:
    each side a multiple of ``factor``, the area within ``min_pixels``..``max_pixels``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def _box(value: Any) -> Box | None:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return (round(min(x1, x2)), round(min(y1, y2)), round(max(x1, x2)), round(max(y1, y2)))


def rescale(box: Box, seen: tuple[int, int], size: tuple[int, int]) -> Box:
    """``box`` in the pixels of an image of size ``seen`` -> pixels of ``size``, clamped."""
    sx, sy = size[0] / seen[0], size[1] / seen[1]
    x1, y1, x2, y2 = box
    return (min(size[0], max(0, round(x1 * sx))), min(size[1], max(0, round(y1 * sy))),
            min(size[0], max(0, round(x2 * sx))), min(size[1], max(0, round(y2 * sy))))


# ----------------------------------------------------------------------------- parsing
def _cell(obj: Any, partial: bool = False) -> Cell | None:
    if not isinstance(obj, dict):
        return None
    text = obj.get("text", "")
    return Cell(str(obj.get("category", "Text")), text if isinstance(text, str) else str(text),
                _box(obj.get("bbox")), partial)


def _close_partial(tail: str) -> Cell | None:
    """The cell the answer was cut in, when closing its string and object makes it JSON
    and it has a bbox and a category (else None)."""
    tail = tail.rstrip()
    tail = re.sub(r"\\+$", lambda m: m.group(0)[: len(m.group(0)) // 2 * 2], tail)
    for closer in _CLOSERS:
        try:
            obj = json.loads(tail + closer)
        except json.JSONDecodeError:
            continue
        cell = _cell(obj, partial=True)
        if cell is not None and cell.bbox is not None and {"category", "text"} <= obj.keys():
            return cell
    return None


def _scan(body: str) -> tuple[list[Cell], bool]:
    """Cells of a JSON list read one at a time (so a cut answer keeps what came before the
    cut); returns (cells, truncated)."""
    decoder = json.JSONDecoder()
    start = body.find("[")
    if start < 0:
        return [], True
    pos = start + 1
    cells: list[Cell] = []
    while True:
        while pos < len(body) and body[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(body):
            return cells, True
        if body[pos] == "]":
            return cells, False
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            last = _close_partial(body[pos:])
            return ([*cells, last] if last else cells), True
        if (cell := _cell(obj)) is not None:
            cells.append(cell)


def _parse(text: str) -> tuple[list[Cell], bool, bool]:
    """(cells, truncated, malformed)."""
    body = _FENCE.sub("", text.strip())
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        data = None
    else:
        if isinstance(data, dict):
            data = data.get("layout", data.get("cells", [data]))
        if isinstance(data, list):
            return [c for c in map(_cell, data) if c is not None], False, False
        return [], False, True
    cells, truncated = _scan(body)
    return cells, truncated, not cells and not body.lstrip().startswith(("[", "{"))


def drop_loops(cells: list[Cell]) -> tuple[list[Cell], int]:
    """Cells without repeated-cell loops, and how many were dropped: exact repeats (same
    category, text and bbox) of an earlier cell, then runs of ``period`` cells repeated
    ``LOOP_MIN_REPEATS`` times or more in a row (compared by category and text)."""
    seen: set[tuple[str, str, Box | None]] = set()
    unique: list[Cell] = []
    for c in cells:
        key = (c.category, c.text, c.bbox)
        if c.bbox is not None and key in seen:
            continue
        seen.add(key)
        unique.append(c)
    keys = [(c.category, c.text.strip()) for c in unique]
    out: list[Cell] = []
    i = 0
    while i < len(unique):
        period, reps = _loop_at(keys, i)
        out += unique[i: i + period]
        i += period * reps
    return out, len(cells) - len(out)


def _loop_at(keys: list[tuple[str, str]], i: int) -> tuple[int, int]:
    """(period, repeats) of a loop starting at ``i``, else (1, 1). Cells without text (a
    Picture) never form a loop: only their bboxes tell them apart."""
    for period in range(1, LOOP_MAX_PERIOD + 1):
        block = keys[i: i + period]
        if len(block) < period or not all(text for _, text in block):
            break
        reps = 1
        while keys[i + reps * period: i + (reps + 1) * period] == block:
            reps += 1
        if reps >= LOOP_MIN_REPEATS:
            return period, reps
    return 1, 1


def read_layout(text: str, *, size: tuple[int, int] | None = None,
                seen: tuple[int, int] | None = None, factor: int = FACTOR,
                min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Layout:
    """Parse and repair one answer. With ``size`` (the original image's width, height) the
    bboxes are mapped from the image the model saw (``seen``, else ``smart_resize(size)``)
    back to the original."""
    cells, truncated, malformed = _parse(text)
    cells, dropped = drop_loops(cells)
    notes = []
    if truncated:
        notes.append("the answer was cut short (max_tokens?): the cells before the cut kept")
    if dropped:
        notes.append(f"{dropped} repeated cell(s) dropped (a generation loop)")
    if malformed:
        notes.append("the answer is not layout JSON")
    if size is not None:
        model_size = seen or smart_resize(size[0], size[1], factor, min_pixels, max_pixels)
        cells = [replace(c, bbox=rescale(c.bbox, model_size, size)) if c.bbox else c
                 for c in cells]
    return Layout(cells, truncated, malformed, dropped, notes)


def parse_layout(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The cells as dicts, and whether the answer could not be read as given (repaired, or
    not layout JSON at all: then there are no cells)."""
    layout = read_layout(text)
    cells = [{"category": c.category, "text": c.text, "bbox": list(c.bbox) if c.bbox else None}
             for c in layout.cells]
    return cells, layout.recovered or layout.malformed


# ----------------------------------------------------------------------------- Markdown
PictureLink = Callable[[int, Cell], str]
"""Gives the Markdown of the ``n``-th picture (1-based) of a page."""


def bbox_link(n: int, cell: Cell) -> str:
    """A picture as a link to its box (no image at hand: the plugin's ``postprocess``)."""
    return f"![picture](bbox:{','.join(map(str, cell.bbox)) if cell.bbox else '?'})"


def render_markdown(layout: Layout, *, keep_headers: bool = False,
                    picture: PictureLink = bbox_link) -> str:
    """The cells as Markdown, as dots.ocr's ``layoutjson2md`` writes them: one paragraph per
    cell (an empty cell too), headers and footers dropped unless ``keep_headers``, formulas
    and other text by :mod:`vlmhub.ocr.formulas`, each picture as ``picture`` makes it (by
    default a link to its bbox). A recovered page ends with a comment saying what was done;
    an answer that is not layout JSON gives only a comment saying so."""
    parts: list[str] = []
    pictures = 0
    for cell in layout.cells:
        if cell.category in SKIPPED and not keep_headers:
            continue
        if cell.category == "Picture":
            pictures += 1
            parts.append(picture(pictures, cell))
        elif cell.category == "Formula":
            parts.append(formula_markdown(cell.text))
        else:
            parts.append(text_markdown(cell.text))
    if layout.malformed:
        parts.append(f"{NOT_RECOVERED_MARK}: {'; '.join(layout.notes)}; nothing could be read "
                     "(the raw answer is kept beside this file) -->")
    elif layout.recovered:
        parts.append(f"{RECOVERED_MARK}: {'; '.join(layout.notes)}; "
                     f"{len(layout.cells)} cell(s) kept -->")
    return "\n\n".join(parts) + ("\n" if parts else "")


def layout_to_markdown(text: str, *, keep_headers: bool = False) -> str:
    """Render an answer as Markdown; a recovered page ends with a flag line."""
    return render_markdown(read_layout(text), keep_headers=keep_headers)


def was_recovered(markdown: str) -> bool:
    """Whether :func:`render_markdown` flagged this Markdown as recovered."""
    return RECOVERED_MARK in markdown


def not_recovered(markdown: str) -> bool:
    """Whether :func:`render_markdown` flagged this Markdown as not layout JSON at all."""
    return NOT_RECOVERED_MARK in markdown
