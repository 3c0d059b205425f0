"""The HTTP side of one OCR request: which answers and errors are retried, what an error
says, what a 413 teaches about the body limit, and whether a failure is worth a re-run.

Pure functions and data on answers already received; nothing here blocks or does I/O.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 502, 503})
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError)
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # nothing is listening there
BODY_LIMIT = re.compile(r"limit of (\d+) bytes")  # the router's 413 message


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def error_text(resp: httpx.Response) -> str:
    """``HTTP 404: <the server's message>`` (OpenAI's error shape or FastAPI's detail)."""
    msg: Any = None
    try:
        body = resp.json()
        if isinstance(body, dict):
            err = body.get("error")
            msg = err.get("message") if isinstance(err, dict) else err or body.get("detail")
    except ValueError:
        pass
    text = str(msg) if msg else resp.text.strip()
    return f"HTTP {resp.status_code}: {text[:500] or resp.reason_phrase}"


@dataclass
class Answer:
    """The result of one page's request (after retries)."""

    text: str | None
    attempts: int
    status: int | None
    error: str | None = None
    finish_reason: str | None = None
    unreachable: bool = False  # every attempt failed to connect

    @property
    def retryable(self) -> bool:
        """Whether sending the page again later can succeed: no answer (connection,
        timeout), 5xx, 408, 429, or a malformed 200."""
        return self.status is None or self.status >= 500 or self.status in (200, 408, 429)


def not_running(url: str, why: str) -> str:
    return f"cannot reach {url} ({why}): is `vlmhub route` running at {url}?"


def body_limit(error: str | None, sent: int) -> int:
    """The body limit a 413 taught: the number in the router's message when it is below
    what was sent, else 70 % of what was sent."""
    m = BODY_LIMIT.search(error or "")
    told = int(m.group(1)) if m else sent
    return told if told < sent else int(sent * 0.7)


def parse_answer(resp: httpx.Response, attempt: int) -> Answer:
    """A 200 answer's text and finish reason, or its failure when it is malformed."""
    try:
        choice = resp.json()["choices"][0]
        text, finish = choice["message"]["content"], choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError):
        return Answer(None, attempt, 200, f"unexpected answer: {resp.text[:300]}")
    if not isinstance(text, str):
        return Answer(None, attempt, 200, "the answer has no text content")
    return Answer(text, attempt, 200, None, finish if isinstance(finish, str) else None)
