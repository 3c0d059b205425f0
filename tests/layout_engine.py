"""The stand-in engine (vlmhub.testing.stub_engine, unchanged) answering every completion
with a fixed dots.ocr-style layout: the text of ``$VLMHUB_TEST_LAYOUT``, streamed in pieces
(instead of the layout it makes up itself for the layout prompt, vlmhub.testing.stub_layout).
Used as ``runtime.process_argv`` by the web page's OCR playground tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from vlmhub.testing import stub_engine, stub_layout

ANSWER = os.environ.get("VLMHUB_TEST_LAYOUT", "[]")


def generate(model: str, prompt: str, images: int, n_tokens: int) -> list[str]:
    return [ANSWER[i: i + 48] for i in range(0, len(ANSWER), 48)] or [""]


def no_layout(body: dict[str, Any], words: Sequence[str]) -> str | None:
    return None


stub_engine.generate = generate  # the stand-in looks both up at each completion
stub_layout.answer = no_layout

if __name__ == "__main__":
    sys.exit(stub_engine.main())
