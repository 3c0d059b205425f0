"""vlmhub's layout Markdown against dots.ocr's own converter, case by case.

The expected outputs below are what ``layoutjson2md`` of dots.ocr gives for the same cells
(rednote-hilab/dots.ocr, ``dots_ocr/utils/format_transformer.py`` at commit
36d7248878f181c6257dc1cbd799ae940970444f), once with page headers and footers
(``no_page_hf=False``: its ``NAME.md``) and once without (``no_page_hf=True``: its
``NAME_nohf.md``), run on a blank 1000 x 1400 page; its picture data URLs are written
``PICTURE``. vlmhub must give the same text, except that a picture is a figure file
(``![Figure N](NAME.fig-N.png)``, here put back as ``![](PICTURE)``) and the file ends with a
newline.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from PIL import Image

from vlmhub.ocr.layout import read_layout
from vlmhub.ocr.outputs import page_files

ROW = iter(range(10, 100000, 40))


def c(cat: str, text: str | None = None, bbox: list[int] | None = None) -> dict[str, Any]:
    """A cell as dots.ocr answers it (a Picture has no text); each in a box of its own."""
    y = next(ROW)
    cell: dict[str, Any] = {"bbox": bbox or [10, y, 200, y + 30], "category": cat}
    if text is not None:
        cell["text"] = text
    return cell


CASES: dict[str, list[dict[str, Any]]] = {
    "every category": [
        c("Page-header", "Journal of Tests, 2025"), c("Title", "# On Layouts"),
        c("Section-header", "## 1. Introduction"), c("Text", "We read **pages**."),
        c("List-item", "- first point"), c("Table", "<table><tr><td>a</td><td>1</td></tr></table>"),
        c("Formula", "E = \\frac{m c^{2}}{1}"), c("Picture", bbox=[10, 410, 200, 500]),
        c("Caption", "Figure 1: a picture."), c("Footnote", "1 A note."),
        c("Page-footer", "7"), c("Other", "  something else  "),
    ],
    "display $$ on one line": [c("Formula", "$$ a^2 + b^2 = c^2 $$")],
    "display $$ on lines": [c("Formula", "$$\na^2\n$$")],
    "$$ blocks with a $ inside": [c("Formula", "$$a$$ and $$b$$")],
    "\\[...\\]": [c("Formula", "\\[ a^2 + b^2 = c^2 \\]")],
    "\\[...\\] over lines": [c("Formula", "\\[\n\\int_0^1 x\\,dx\n\\]")],
    "\\[...\\] inside a line": [c("Formula", "so \\[x\\] holds")],
    "inline $...$": [c("Formula", "where $x$ is $y$")],
    "bare LaTeX": [c("Formula", "\\frac{a}{b} + \\sqrt{2}")],
    "an environment": [c("Formula", "\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}")],
    "\\(...\\)": [c("Formula", "\\(x+y\\)")],
    "LaTeX preamble": [c("Formula", "\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n"
                         "\\usepackage{amsmath}\n\\begin{document}\nE = mc^2 \\cdot 1\n"
                         "\\end{document}")],
    "backticks around LaTeX": [c("Formula", "`\\alpha + \\beta`")],
    "no LaTeX at all": [c("Formula", "E = mc2")],
    "inline maths in backticks": [c("Text", "  `$x^2$`  ")],
    "headers and footers": [c("Page-header", "Head"), c("Text", "Body"), c("Page-footer", "Foot")],
    "empty cells": [c("Text", "A"), c("Text", ""), c("Text"), c("Formula", ""),
                    c("Caption", "   "), c("Text", "B")],
    "a picture and its caption": [c("Text", "See below."), c("Picture", bbox=[100, 200, 300, 260]),
                                  c("Caption", "Figure 1: the plot.")],
}

EVERY_BODY = (  # the cells of "every category" between its header and its footer
    '# On Layouts\n\n'
    '## 1. Introduction\n\n'
    'We read **pages**.\n\n'
    '- first point\n\n'
    '<table><tr><td>a</td><td>1</td></tr></table>\n\n'
    '$$\nE = \\frac{m c^{2}}{1}\n$$\n\n'
    '![](PICTURE)\n\n'
    'Figure 1: a picture.\n\n'
    '1 A note.\n\n')
DOTS_OCR = {  # layoutjson2md(image, CASES[name], no_page_hf=False), (..., no_page_hf=True)
    'every category': ('Journal of Tests, 2025\n\n' + EVERY_BODY + '7\n\nsomething else',
                       EVERY_BODY + 'something else'),
    'display $$ on one line': ('$$\na^2 + b^2 = c^2\n$$',
                               '$$\na^2 + b^2 = c^2\n$$'),
    'display $$ on lines': ('$$\na^2\n$$',
                            '$$\na^2\n$$'),
    '$$ blocks with a $ inside': ('$$a$$ and $$b$$',
                                  '$$a$$ and $$b$$'),
    '\\[...\\]': ('$$\na^2 + b^2 = c^2\n$$',
                  '$$\na^2 + b^2 = c^2\n$$'),
    '\\[...\\] over lines': ('$$\n\\int_0^1 x\\,dx\n$$',
                             '$$\n\\int_0^1 x\\,dx\n$$'),
    '\\[...\\] inside a line': ('so \\[x\\] holds',
                                'so \\[x\\] holds'),
    'inline $...$': ('where $x$ is $y$',
                     'where $x$ is $y$'),
    'bare LaTeX': ('$$\n\\frac{a}{b} + \\sqrt{2}\n$$',
                   '$$\n\\frac{a}{b} + \\sqrt{2}\n$$'),
    'an environment': ('$$\n\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}\n$$',
                       '$$\n\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}\n$$'),
    '\\(...\\)': ('$$\n\\(x+y\\)\n$$',
                  '$$\n\\(x+y\\)\n$$'),
    'LaTeX preamble': ('$$\n\n\n\n\nE = mc^2 \\cdot 1\n\n$$',
                       '$$\n\n\n\n\nE = mc^2 \\cdot 1\n\n$$'),
    'backticks around LaTeX': ('$$\n\\alpha + \\beta\n$$',
                               '$$\n\\alpha + \\beta\n$$'),
    'no LaTeX at all': ('E = mc2',
                        'E = mc2'),
    'inline maths in backticks': ('$x^2$',
                                  '$x^2$'),
    'headers and footers': ('Head\n\nBody\n\nFoot',
                            'Body'),
    'empty cells': ('A\n\n\n\n\n\n\n\n\n\nB',
                    'A\n\n\n\n\n\n\n\n\n\nB'),
    'a picture and its caption': ('See below.\n\n![](PICTURE)\n\nFigure 1: the plot.',
                                  'See below.\n\n![](PICTURE)\n\nFigure 1: the plot.'),
}


def vlmhub_markdown(cells: list[dict[str, Any]], keep_headers: bool) -> str:
    """What ``vlmhub ocr`` writes for these cells (figures as files), pictures put back as
    dots.ocr's placeholder; every figure link must name a figure file that was made."""
    page = Image.new("RGB", (1000, 1400), "white")
    files = page_files(read_layout(json.dumps(cells)), "case", page, keep_headers=keep_headers)
    md = files["case.md"]
    assert isinstance(md, str)
    for n in re.findall(r"!\[Figure (\d+)\]\(case\.fig-\1\.png\)", md):
        assert isinstance(files[f"case.fig-{n}.png"], bytes)
    return re.sub(r"!\[Figure (\d+)\]\(case\.fig-\1\.png\)", "![](PICTURE)", md)


def test_the_table_covers_every_category_and_case() -> None:
    assert set(CASES) == set(DOTS_OCR)
    categories = {cell["category"] for cells in CASES.values() for cell in cells}
    assert {"Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header",
            "Picture", "Section-header", "Table", "Text", "Title"} <= categories


@pytest.mark.parametrize("name", list(CASES))
def test_markdown_is_dots_ocrs(name: str) -> None:
    with_hf, without_hf = DOTS_OCR[name]
    assert vlmhub_markdown(CASES[name], keep_headers=True) == with_hf + "\n"
    assert vlmhub_markdown(CASES[name], keep_headers=False) == without_hf + "\n"
