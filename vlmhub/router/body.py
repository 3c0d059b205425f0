"""Reading and parsing request bodies: size limit (413), idle timeout (408), JSON (400).

Runs inside each request's handler task on the event loop; reading blocks (asynchronously)
while the body arrives. On the hot path a small body costs a set insertion (one loop timer
serves every body being read) and one ``json.loads``; error responses are built only when
they are sent.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request

from vlmhub.router.errors import error_response
from vlmhub.router.multipart import Form, is_multipart, read_form
from vlmhub.router.state import Reject

CLOSE = {"Connection": "close"}
"""Answer headers that make uvicorn close the connection after the answer."""


def _too_large(limit: int, headers: dict[str, str] | None = None) -> Reject:
    return Reject(error_response(
        413, f"The request body is larger than the router's limit of {limit} bytes. Send "
        "smaller images (or fewer per request), or raise router.max_body_mb in models.yaml.",
        "invalid_request_error", "request_too_large", headers))


def too_deep() -> Reject:
    return Reject(error_response(
        400, "The JSON in the request body is nested too deeply for vlmhub to read. OpenAI "
        "requests need only a few levels of nesting: send a flatter body.",
        "invalid_request_error", "json_too_deep"))


class _Sweeper:
    """One loop timer for every body being read on one event loop: it fires at the earliest
    deadline and sets the next, so a steady stream of requests costs a set insertion each,
    not a loop timer each (a timer made and cancelled per request was ~2 % of a proxied
    request, py-spy)."""

    __slots__ = ("_at", "_handle", "loop", "timers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers: set[IdleTimer] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf

    def add(self, timer: IdleTimer) -> None:
        self.timers.add(timer)
        due = timer.last + timer.timeout_s
        if due < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._at, self._handle = due, self.loop.call_at(due, self._sweep)

    def _sweep(self) -> None:
        self._handle, self._at = None, math.inf
        now = self.loop.time()
        for timer in [t for t in self.timers if now >= t.last + t.timeout_s]:
            self.timers.discard(timer)
            timer.expire()
        if self.timers:
            due = min(t.last + t.timeout_s for t in self.timers)
            self._at, self._handle = due, self.loop.call_at(due, self._sweep)


_sweeper: _Sweeper | None = None


class IdleTimer:
    """Cancels the current task once ``progress()`` has not been called for ``timeout_s``.

    Every body read on a loop shares one loop timer (:class:`_Sweeper`), so a read costs a
    set insertion and removal. Use on the event loop's thread only.
    """

    __slots__ = ("_loop", "_sweeper", "_task", "expired", "last", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        global _sweeper
        loop = self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.timeout_s, self.expired = timeout_s, False
        self.last = loop.time()
        sweeper = _sweeper
        if sweeper is None or sweeper.loop is not loop:
            sweeper = _sweeper = _Sweeper(loop)
        self._sweeper = sweeper
        sweeper.add(self)

    def progress(self) -> None:
        self.last = self._loop.time()

    def expire(self) -> None:
        """Called by the sweeper: the body stopped arriving."""
        if self._task is not None:
            self.expired = True
            self._task.cancel()

    def close(self) -> None:
        """Stop watching; call in a ``finally``."""
        self._sweeper.timers.discard(self)

    def swallow(self) -> bool:
        """In ``except CancelledError``: True (the cancellation undone) if this timer caused
        it, False if the cancellation came from elsewhere and must propagate."""
        return self.expired and self._task is not None and self._task.uncancel() == 0


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, read with a size limit and an idle timeout. Blocks (asynchronously)
    while the body arrives.

    - 413 past ``limit`` bytes (Content-Length checked first, then counted while reading, for
      chunked uploads). The rest of the body is read and dropped for up to ``timeout_s`` first,
      so a client still sending gets the 413 rather than a connection reset (uvicorn closes a
      ``Connection: close`` request's connection right after the answer). An
      ``Expect: 100-continue`` client has sent nothing yet: it gets the 413 at once.
    - 408, closing the connection, when no part of the body arrives for ``timeout_s`` (a
      client that announced more than it sends).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Reject(error_response(400, "invalid Content-Length header",
                                        "invalid_request_error"))
        if int(declared) > limit:
            if "100-continue" in request.headers.get("expect", "").lower():
                raise _too_large(limit, CLOSE)
            raise await _drop_rest(request.stream(), limit, timeout_s)
    stream = request.stream()
    chunks: list[bytes] = []
    size = 0
    idle = IdleTimer(timeout_s)
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
            idle.progress()
        else:
            return b"".join(chunks)
    except asyncio.CancelledError:
        if not idle.swallow():
            raise
        raise Reject(error_response(
            408, f"The request body stopped arriving: nothing came for {timeout_s:g} s "
            f"after {size} bytes. Send the whole body the Content-Length header announces "
            "(router.body_timeout_s sets this wait).", "invalid_request_error",
            "request_timeout", CLOSE)) from None
    finally:
        idle.close()
    chunks.clear()
    raise await _drop_rest(stream, limit, timeout_s)


async def _drop_rest(stream: AsyncIterator[bytes], limit: int, timeout_s: float) -> Reject:
    """Read and drop the rest of an oversized body for up to ``timeout_s`` in all; the 413 to
    answer with (closing the connection when the body did not end in time)."""
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in stream:
                pass
    except TimeoutError:
        return _too_large(limit, CLOSE)
    return _too_large(limit)


def parse_payload(body: bytes) -> dict[str, Any]:
    """The JSON object of the body; 400 in OpenAI's shape when it is not one (or is nested
    too deeply for the recursive parser)."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise Reject(error_response(400, f"malformed JSON in the request body: {exc}",
                                    "invalid_request_error", "malformed_json")) from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(payload, dict):
        raise Reject(error_response(400, "the request body must be a JSON object",
                                    "invalid_request_error", "malformed_json"))
    return payload


def parse_request(
    body: bytes, headers: Mapping[str, str]
) -> tuple[dict[str, Any], Form | None]:
    """The routing fields of a request body: a JSON object's fields, or a multipart form's
    ``model`` and ``stream`` (strings) with the :class:`Form` that locates them. A body that
    starts like a JSON object is one: the headers are not read then (the hot path)."""
    if body[:1] != b"{":
        content_type = headers.get("content-type")
        if content_type is not None and is_multipart(content_type):
            form = read_form(body, content_type)
            fields: dict[str, Any] = dict(form.values)
            if fields.get("stream", "").lower() == "true":
                fields["stream"] = True
            return fields, form
    return parse_payload(body), None
