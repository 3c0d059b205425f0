"""How one layout cell's text becomes Markdown, by the rules of dots.ocr's own converter
(``dots_ocr/utils/format_transformer.py``: ``get_formula_in_markdown`` and ``clean_text``),
written anew here. Pure string functions; nothing blocks.

A ``Formula`` cell's LaTeX is put in a display block ``$$\\n...\\n$$`` once:

- ``$$...$$`` with no ``$`` inside: its content, unwrapped and re-wrapped on lines of its own;
  with a ``$`` inside (``$$a$$ and $$b$$``) it is kept as written;
- ``\\[...\\]`` (the whole text): its content in ``$$`` (never ``$$\\n\\[...\\]\\n$$``);
- a ``\\[...\\]`` within a line of a longer text, or an inline ``$...$``: kept as written;
- bare LaTeX (a ``\\command``, ``\\(...\\)``, an environment): wrapped in ``$$``, after a
  LaTeX preamble (``\\documentclass``, ``\\usepackage``, ``\\begin{document}``...) is cut
  and one pair of surrounding backticks removed;
- anything without LaTeX in it: as written.

Every other cell's text is stripped, and a ``\\`$...$\\``` (inline maths in backticks) loses
its backticks.
"""

from __future__ import annotations

import re

_LATEX = [re.compile(p, re.DOTALL) for p in (
    r"\$\$.*?\$\$",                       # display maths $$...$$
    r"\$[^$\n]+?\$",                      # inline maths $...$
    r"\\begin\{.*?\}.*?\\end\{.*?\}",     # an environment
    r"\\[a-zA-Z]+",                       # any \command (with or without {...})
    r"\\\[.*?\\\]",                       # display maths \[...\]
    r"\\\(.*?\\\)",                       # inline maths \(...\)
)]
_PREAMBLE = [re.compile(p, re.IGNORECASE) for p in (
    r"\\documentclass\{[^}]+\}",
    r"\\usepackage\{[^}]+\}",
    r"\\usepackage\[[^\]]*\]\{[^}]+\}",
    r"\\begin\{document\}",
    r"\\end\{document\}",
)]
_BRACKETS_IN_A_LINE = re.compile(r".*\\\[.*\\\].*")  # no DOTALL: within one line
_INLINE = re.compile(r"\$[^$]+\$")


def has_latex(text: str) -> bool:
    """Whether ``text`` holds LaTeX: maths delimiters, an environment or a ``\\command``."""
    return any(p.search(text) for p in _LATEX)


def without_preamble(latex: str) -> str:
    """``latex`` without ``\\documentclass``, ``\\usepackage`` and ``\\begin``/``\\end``
    ``{document}`` (the rest, line breaks included, as it was)."""
    for pattern in _PREAMBLE:
        latex = pattern.sub("", latex)
    return latex


def block(content: str) -> str:
    return f"$$\n{content}\n$$"


def formula_markdown(text: str) -> str:
    """A ``Formula`` cell's text as Markdown (the rules in the module docstring)."""
    text = text.strip()
    if text.startswith("$$") and text.endswith("$$"):
        inner = text[2:-2].strip()
        return text if "$" in inner else block(inner)
    if text.startswith("\\[") and text.endswith("\\]"):
        return block(text[2:-2].strip())
    if _BRACKETS_IN_A_LINE.search(text) or _INLINE.search(text) or not has_latex(text):
        return text
    if "usepackage" in text:
        text = without_preamble(text)
        if not text:  # nothing but a preamble (dots.ocr's own converter raises here)
            return ""
    if text.startswith("`") and text.endswith("`"):
        text = text[1:-1]
    return block(text)


def text_markdown(text: str) -> str:
    """Any other cell's text as Markdown: stripped; `` `$x$` `` becomes ``$x$``."""
    text = text.strip()
    if text.startswith("`$") and text.endswith("$`"):
        text = text[1:-1]
    return text
