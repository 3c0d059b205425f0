"""dots.ocr-style layout JSON -> Markdown. Pure; used by plugins' ``postprocess`` hooks.

The model answers a JSON list of ``{bbox, category, text}`` cells in reading order. Tables
arrive as HTML, formulas as LaTeX, other text as Markdown; a Picture has no text. Output cut
short by ``max_tokens`` is repaired to its last complete cell and flagged in the Markdown.
"""

from __future__ import annotations

import json
import re
from typing import Any

SKIPPED = frozenset({"Page-header", "Page-footer"})
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def parse_layout(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The cells, and whether the JSON had to be repaired."""
    body = _FENCE.sub("", text.strip())
    try:
        data = json.loads(body)
        return _cells(data), False
    except json.JSONDecodeError:
        pass
    cut = body.rfind("}")
    while cut > 0:
        try:
            return _cells(json.loads(body[: cut + 1] + "]")), True
        except json.JSONDecodeError:
            cut = body.rfind("}", 0, cut)
    return [], True


def _cells(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        data = data.get("layout", data.get("cells", [data]))
    if not isinstance(data, list):
        return []
    return [c for c in data if isinstance(c, dict)]


def layout_to_markdown(text: str, *, keep_headers: bool = False) -> str:
    """Render cells as Markdown; malformed input yields what could be read plus a flag line."""
    cells, repaired = parse_layout(text)
    parts: list[str] = []
    for cell in cells:
        category = str(cell.get("category", "Text"))
        if category in SKIPPED and not keep_headers:
            continue
        content = str(cell.get("text", "")).strip()
        if category == "Picture":
            parts.append(f"![picture]({_bbox(cell)})")
        elif category == "Formula" and content:
            parts.append(content if content.startswith("$$") else f"$$\n{content}\n$$")
        elif content:
            parts.append(content)
    if repaired:
        parts.append(
            f"<!-- vlmhub: the layout JSON was malformed; {len(cells)} cell(s) recovered -->"
        )
    return "\n\n".join(parts) + ("\n" if parts else "")


def _bbox(cell: dict[str, Any]) -> str:
    box = cell.get("bbox")
    return "bbox:" + ",".join(str(v) for v in box) if isinstance(box, list) else "bbox:?"
