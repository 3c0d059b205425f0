"""The layout drawn over its page: one colour per category, the same colours and look as the
web page's OCR playground (which takes :data:`CATEGORY_COLOURS` from ``/api/ui/ocr/render``):
each box filled at 12 % opacity and outlined, labelled ``N Category`` (N its reading order,
from 0 as dots.ocr numbers them).

Pillow is imported lazily (the ``vlmhub[ocr]`` extra). :func:`draw_layout` blocks (CPU) and
never changes the image it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vlmhub.ocr.layout import Cell

if TYPE_CHECKING:
    from PIL.Image import Image

CATEGORY_COLOURS: dict[str, str] = {
    "Title": "#d9480f", "Section-header": "#e8590c", "Text": "#2f6fde", "List-item": "#1971c2",
    "Table": "#2b8a3e", "Formula": "#8e44ad", "Picture": "#c2255c", "Caption": "#0c8599",
    "Footnote": "#b08900", "Page-header": "#868e96", "Page-footer": "#868e96",
}
OTHER_COLOUR = "#495057"
FILL_OPACITY = 0.12


def colour(category: str) -> tuple[int, int, int]:
    """The RGB colour a category is drawn in."""
    hexa = CATEGORY_COLOURS.get(category, OTHER_COLOUR)
    return int(hexa[1:3], 16), int(hexa[3:5], 16), int(hexa[5:7], 16)


def draw_layout(image: Image, cells: Sequence[Cell]) -> Image:
    """A copy of ``image`` (RGB) with each cell's box and label drawn; ``cells``' bboxes are
    in ``image``'s pixels. Cells without a bbox are skipped."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    page = image.convert("RGB")
    overlay = PILImage.new("RGBA", page.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)
    line = max(2, round(min(page.size) / 600))
    font = ImageFont.load_default(size=max(12, round(min(page.size) / 70)))
    for index, cell in enumerate(cells):
        if cell.bbox is None:
            continue
        rgb = colour(cell.category)
        x1, y1, x2, y2 = cell.bbox
        pen.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)),
                      fill=(*rgb, round(255 * FILL_OPACITY)), outline=(*rgb, 255), width=line)
        label = f"{index} {cell.category}"
        left, top, right, bottom = pen.textbbox((x1 + line, y1 + line), label, font=font)
        pen.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(*rgb, 255))
        pen.text((x1 + line, y1 + line), label, fill=(255, 255, 255, 255), font=font)
    drawn = PILImage.alpha_composite(page.convert("RGBA"), overlay)
    return drawn.convert("RGB")
