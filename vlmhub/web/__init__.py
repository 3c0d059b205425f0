"""The web page's files (``static/``: index.html, app.js, style.css), served by the router at
``/ui`` (see :mod:`vlmhub.router.ui` and docs/web.md). Plain HTML, JavaScript and CSS: no
dependency, no build step, no external asset."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Where the page's files live inside the installed package."""
