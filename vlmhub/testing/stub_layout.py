"""The stand-in engine's answer to dots.ocr's layout prompt: deterministic layout JSON for the
page it was sent, so the demo (``vlmhub ocr FILE.pdf --model demo-ocr --preset layout``) runs
the whole layout pipeline (figures, page coordinates, NAME.json) without a model.

A TEST DOUBLE, not OCR: it reads nothing on the page but its size. It answers as dots.ocr
does: one JSON list of ``{bbox, category, text}`` cells in reading order (a Picture has no
text; a Table is HTML, a Formula LaTeX, the rest Markdown), with bboxes in the pixels of the
image the model's processor makes of the page (``smart_resize``: multiples of 28 within
3,136..11,289,600 pixels, dots.ocr's defaults). The words come from a hash of the image, so
two different pages get different text and the same page always the same.

Only the standard library (and vlmhub's pure ``smart_resize``): the stand-in runs anywhere.
:func:`answer` looks at the request's text parts only, so the engine's other requests pay
nothing; the layout work (decoding the image's base64 to read its size) is done only for the
layout prompt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

from vlmhub.ocr.layout import smart_resize

LAYOUT_PROMPT = "Please output the layout information from the PDF image"
"""How dots.ocr's layout preset (``prompt_layout_all_en``) begins."""
PIECE_CHARS = 8  # characters of the answer per streamed piece ("token")
Rows = list[tuple[str, float, float, float, float]]

# (category, x1, y1, x2, y2) as fractions of the page, in reading order
ROWS: Rows = [
    ("Page-header", 0.08, 0.03, 0.92, 0.05),
    ("Title", 0.12, 0.07, 0.88, 0.11),
    ("Section-header", 0.08, 0.13, 0.60, 0.16),
    ("Text", 0.08, 0.17, 0.92, 0.27),
    ("List-item", 0.10, 0.28, 0.92, 0.31),
    ("List-item", 0.10, 0.32, 0.92, 0.35),
    ("Formula", 0.30, 0.37, 0.70, 0.41),
    ("Table", 0.08, 0.43, 0.92, 0.55),
    ("Picture", 0.20, 0.57, 0.80, 0.80),
    ("Caption", 0.20, 0.81, 0.80, 0.84),
    ("Footnote", 0.08, 0.88, 0.92, 0.91),
    ("Page-footer", 0.45, 0.95, 0.55, 0.97),
]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG file's bytes; ValueError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                break
            marker = data[pos + 1]
            length = int.from_bytes(data[pos + 2: pos + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[pos + 5: pos + 9])
                return int(width), int(height)
            pos += 2 + length
    raise ValueError("the stand-in reads only PNG and JPEG images (as data URLs)")


def decode_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL; ValueError for anything else."""
    head, _, body = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError("the stand-in reads only images sent as base64 data URLs")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the image's base64 is broken: {exc}") from None


def layout_image(body: dict[str, Any]) -> str | None:
    """The image URL of a chat request whose text is the layout prompt, else None."""
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        if any(isinstance(p, dict) and p.get("type") == "text"
               and str(p.get("text", "")).startswith(LAYOUT_PROMPT) for p in content):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = (part.get("image_url") or {}).get("url")
                    if isinstance(url, str):
                        return url
            raise ValueError("the layout prompt came without an image")
    return None


def _texts(seed: bytes, words: Sequence[str]) -> dict[str, str]:
    def pick(n: int, salt: str) -> list[str]:
        digest = hashlib.sha256(seed + salt.encode()).digest()
        return [words[digest[i] % len(words)] for i in range(n)]

    number = int.from_bytes(seed[:2], "big") % 90 + 10
    row = "".join(f"<tr><td>{w}</td><td>{i * number}</td></tr>"
                  for i, w in enumerate(pick(3, "table"), 1))
    return {
        "Page-header": " ".join(pick(3, "header")).title(),
        "Title": "# " + " ".join(pick(4, "title")).capitalize(),
        "Section-header": "## 1. " + " ".join(pick(2, "section")).capitalize(),
        "Text": " ".join(pick(24, "text")).capitalize() + ".",
        "List-item": "- " + " ".join(pick(6, "item")),
        "Formula": f"\\[ \\sum_{{i=1}}^{{{number}}} x_i = \\frac{{a}}{{b}} \\]",
        "Table": f"<table><tr><th>item</th><th>count</th></tr>{row}</table>",
        "Caption": "Figure 1: " + " ".join(pick(5, "caption")) + ".",
        "Footnote": "1 " + " ".join(pick(8, "note")) + ".",
        "Page-footer": str(number),
    }


def layout_cells(width: int, height: int, seed: bytes,
                 words: Sequence[str]) -> list[dict[str, Any]]:
    """The cells for a page of ``width`` x ``height`` pixels, bboxes in the resized image's
    pixels (``smart_resize``), as dots.ocr answers them."""
    w, h = smart_resize(width, height)
    texts = _texts(seed, words)
    cells: list[dict[str, Any]] = []
    for i, (category, x1, y1, x2, y2) in enumerate(ROWS):
        cell: dict[str, Any] = {"bbox": [round(x1 * w), round(y1 * h), round(x2 * w),
                                         round(y2 * h)], "category": category}
        if category != "Picture":
            text = texts[category]
            cell["text"] = text + (" (continued)" if category == "List-item" and i % 2 else "")
        cells.append(cell)
    return cells


def answer(body: dict[str, Any], words: Sequence[str]) -> str | None:
    """The layout JSON for a layout request, else None (the engine answers as usual).
    Raises ValueError for a layout request whose image cannot be read (a 400)."""
    url = layout_image(body)
    if url is None:
        return None
    data = decode_url(url)
    width, height = image_size(data)
    cells = layout_cells(width, height, hashlib.sha256(data).digest(), words)
    return json.dumps(cells, ensure_ascii=False)


def pieces(text: str, wanted: int | None) -> list[str]:
    """``text`` in streamed pieces, cut after ``wanted`` of them (as ``max_tokens`` does)."""
    out = [text[i: i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
    return out[:wanted] if wanted else out
