"""A layout answer's files for one page, in the original page's pixels.

The model answers bboxes in the pixels of the image its processor made of the page that was
sent (``smart_resize`` of the sent size, with the model's factor and pixel limits); the page
that was sent may itself be a downscaled copy of the original (a PDF page rendered at its dpi,
an image file turned upright). :class:`PageGeometry` holds the three sizes, and
:func:`read_page_layout` maps every bbox back to the original page, as dots.ocr's parser does.

:func:`page_files` then makes what ``vlmhub ocr`` writes beside the page's ``NAME.raw.txt``:

- ``NAME.md``: the Markdown (dots.ocr's rules, :func:`vlmhub.ocr.layout.render_markdown`),
  each Picture cropped from the page and linked as ``![Figure N](NAME.fig-N.png)``, or with
  ``embed`` put in the Markdown as a data URL (no file), as dots.ocr does;
- ``NAME.fig-N.png``: the N-th picture, cropped from the original page;
- ``NAME.json``: the cells (``bbox`` in page pixels, ``category``, ``text``; ``figure`` for a
  cropped picture; ``partial`` for a cell cut short), in reading order;
- ``NAME.layout.png`` with ``draw``: the page with its boxes drawn (:mod:`.drawing`).

Everything here is CPU work on data in memory (cropping, PNG encoding) and blocks; the batch
runner calls it in a worker thread. Pillow is imported lazily.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmhub.errors import VlmhubError
from vlmhub.ocr.drawing import draw_layout
from vlmhub.ocr.images import data_url
from vlmhub.ocr.layout import FACTOR, MIN_PIXELS, Cell, Layout, read_layout, render_markdown
from vlmhub.ocr.layout import smart_resize as processor_size
from vlmhub.spec import ModelSpec

if TYPE_CHECKING:
    from PIL.Image import Image

LAYOUT_PRESET = "layout"
"""The preset whose answer ``vlmhub ocr`` and the playground read as layout JSON themselves
(dots.ocr's, and the demo's stand-in): its pages get figures, page coordinates and NAME.json."""
Size = tuple[int, int]


def is_layout(preset: str | None) -> bool:
    return preset == LAYOUT_PRESET


def resize_limits(spec: ModelSpec | None, cap: int) -> tuple[int, int, int]:
    """``(factor, min_pixels, max_pixels)`` of the model's image processor: the spec's patch
    factor and ``mm_processor_kwargs``, else dots.ocr's (28, 3136) and ``cap``."""
    kwargs = (spec.options.mm_processor_kwargs or {}) if spec is not None else {}
    vision = spec.vision if spec is not None else None
    return (vision.patch_factor if vision else FACTOR,
            int(kwargs.get("min_pixels", MIN_PIXELS)),
            int(kwargs.get("max_pixels", vision.max_pixels if vision else cap)))


@dataclass(frozen=True)
class PageGeometry:
    """The sizes of one page: ``source`` the original (its pixels are the output's
    coordinates), ``sent`` what was sent, ``seen`` what the model's processor made of it."""

    source: Size
    sent: Size
    seen: Size

    @classmethod
    def of(cls, source: Size, sent: Size, spec: ModelSpec | None, cap: int) -> PageGeometry:
        factor, low, high = resize_limits(spec, cap)
        return cls(source, sent, processor_size(sent[0], sent[1], factor, low, high))


def read_page_layout(text: str, geo: PageGeometry) -> Layout:
    """The answer's cells (repaired, see :func:`read_layout`) with bboxes in page pixels."""
    return read_layout(text, size=geo.source, seen=geo.seen)


def needs_image(layout: Layout, draw: bool) -> bool:
    """Whether the page's image is needed: a picture to crop, or the layout to draw."""
    return draw or any(c.category == "Picture" and c.bbox is not None for c in layout.cells)


def figure_name(name: str, n: int) -> str:
    return f"{name}.fig-{n}.png"


def _png(img: Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cells_json(layout: Layout, figures: dict[int, str]) -> list[dict[str, Any]]:
    """The cells as NAME.json holds them; ``figures`` maps a cell's index to its figure."""
    out: list[dict[str, Any]] = []
    for i, c in enumerate(layout.cells):
        cell: dict[str, Any] = {"bbox": list(c.bbox) if c.bbox else None,
                                "category": c.category}
        if c.text or c.category != "Picture":
            cell["text"] = c.text
        if i in figures:
            cell["figure"] = figures[i]
        if c.partial:
            cell["partial"] = True
        out.append(cell)
    return out


def page_files(layout: Layout, name: str, image: Image | None, *, embed: bool = False,
               draw: bool = False, keep_headers: bool = False) -> dict[str, str | bytes]:
    """The files of one layout page, by file name (see the module docstring). ``image`` is
    the original page (its size is ``layout``'s coordinates); it may be None only when
    :func:`needs_image` is false. Raises VlmhubError when it is missing."""
    if image is None and needs_image(layout, draw):
        raise VlmhubError(f"{name}: the page's image is needed to crop its figures")
    files: dict[str, str | bytes] = {}
    figures: dict[int, str] = {}
    index = {id(c): i for i, c in enumerate(layout.cells)}

    def picture(n: int, cell: Cell) -> str:
        box = cell.bbox
        if image is None or box is None or box[2] <= box[0] or box[3] <= box[1]:
            return f"<!-- vlmhub: figure {n} not cropped: its bbox is missing or empty -->"
        png = _png(image.crop(box))
        if embed:
            return f"![Figure {n}]({data_url(png, 'png')})"
        files[figure_name(name, n)] = png
        figures[index[id(cell)]] = figure_name(name, n)
        return f"![Figure {n}]({figure_name(name, n)})"

    files[f"{name}.md"] = render_markdown(layout, keep_headers=keep_headers, picture=picture)
    rows = [json.dumps(cell, ensure_ascii=False) for cell in cells_json(layout, figures)]
    files[f"{name}.json"] = "[\n" + ",\n".join(rows) + "\n]\n"  # one cell a line
    if draw and image is not None:
        files[f"{name}.layout.png"] = _png(draw_layout(image, layout.cells))
    return files


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def write_page_files(out_dir: Path, name: str, files: dict[str, str | bytes]) -> None:
    """Write one page's files (NAME.md last, so it never links to a figure not yet
    written) and remove the figures and drawing an earlier answer for it left. Blocks."""
    stale = glob.glob(glob.escape(str(out_dir / name)) + ".fig-*.png")
    stale.append(str(out_dir / f"{name}.layout.png"))
    for old in stale:
        if Path(old).name not in files:
            Path(old).unlink(missing_ok=True)
    md = f"{name}.md"
    for file, data in sorted(files.items(), key=lambda item: item[0] == md):
        write_atomic(out_dir / file, data)
