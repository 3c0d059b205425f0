"""Request ids, the access log and CORS for the OpenAI routes: one ASGI middleware.

- **Request id**: the client's ``x-request-id`` (printable, at most 128 characters) or a new
  one; the proxy sends it to the engine, and every response carries it, errors and streams
  included, with ``x-vlmhub-queue-ms`` (time spent waiting for the model) and
  ``x-vlmhub-replica`` (``model@port``) once a replica was chosen.
- **Access log**: one ``vlmhub.access`` line per request when that logger is enabled: id,
  model (and the name asked for), status, queue wait, replica, time to first byte, duration,
  bytes sent. No header or body is logged. The request's task only builds a tuple; the line is
  formatted and masked on the log writer thread (:func:`vlmhub.logs.access`).
- **CORS** (``router.cors_origins``, default none, read per request: a reload applies): an
  allowed origin gets preflight answers and ``Access-Control-Allow-Origin`` on ``/v1/*``; the
  admin API keeps its browser guard.
The endpoint fills :class:`RequestInfo` (``scope["state"]["vlmhub"]``). Per request this costs
one small object and a wrapped ``send``; nothing blocks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmhub.logs import ACCESS, access
from vlmhub.router.state import RouterState

EXPOSED = b"x-request-id, x-vlmhub-queue-ms, x-vlmhub-replica"


@dataclass
class RequestInfo:
    """What one request did, for its response headers and its access-log line."""

    request_id: str
    generated: bool
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    asked: str | None = None
    queue_ms: float | None = None
    replica: str | None = None


_ids = random.Random()  # noqa: S311 (an id, not a secret); seeded from os.urandom once


def new_request_id() -> str:
    """32 random hex digits, the shape of ``uuid4().hex``, for a request's id. An id only has
    to be unique, not unguessable: one Mersenne draw costs 0.2 µs where ``uuid4`` (a
    ``getrandom`` syscall and a UUID object) cost ~4 % of a proxied request (py-spy)."""
    return f"{_ids.getrandbits(128):032x}"


def request_info(scope: Scope) -> RequestInfo | None:
    info = scope.get("state", {}).get("vlmhub")
    return info if isinstance(info, RequestInfo) else None


def _client_id(scope: Scope) -> str | None:
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            text: str = bytes(v).decode("latin-1").strip()
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return None


class AccessMiddleware:
    """See the module docs. Wraps the whole app; acts on ``/v1`` paths only."""

    def __init__(self, app: ASGIApp, state: RouterState) -> None:
        self.app = app
        self.state = state  # its settings (CORS origins) are read per request: reloads apply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        origin = self._allowed_origin(scope, self.state.settings.cors_origins)
        if origin is not None and scope["method"] == "OPTIONS":
            await self._preflight(scope, send, origin)
            return
        given = _client_id(scope)
        info = RequestInfo(given or new_request_id(), given is None)
        scope.setdefault("state", {})["vlmhub"] = info
        status, first, sent = 0, 0.0, 0

        async def wrapped(message: Message) -> None:
            nonlocal status, first, sent
            if message["type"] == "http.response.start":
                status, first = message["status"], time.monotonic()
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", info.request_id.encode("latin-1")))
                if info.queue_ms is not None:
                    headers.append((b"x-vlmhub-queue-ms", f"{info.queue_ms:.0f}".encode()))
                if info.replica is not None:
                    headers.append((b"x-vlmhub-replica", info.replica.encode("latin-1")))
                if origin is not None:
                    headers += [(b"access-control-allow-origin", origin.encode("latin-1")),
                                (b"access-control-expose-headers", EXPOSED),
                                (b"vary", b"Origin")]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            if ACCESS.isEnabledFor(20):
                self._log(scope, info, status, first, sent)

    @staticmethod
    def _allowed_origin(scope: Scope, origins: frozenset[str]) -> str | None:
        if not origins:
            return None
        for k, v in scope["headers"]:
            if k == b"origin":
                origin = v.decode("latin-1")
                return origin if origin in origins or "*" in origins else None
        return None

    @staticmethod
    async def _preflight(scope: Scope, send: Send, origin: str) -> None:
        asked = next((v for k, v in scope["headers"]
                      if k == b"access-control-request-headers"), b"authorization, content-type")
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", asked),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _log(scope: Scope, info: RequestInfo, status: int, first: float, sent: int) -> None:
        """Hand the line's fields to the log writer as a tuple: it is formatted and masked on
        the writer thread, off the event loop (vlmhub.logs.access)."""
        now = time.monotonic()
        access((time.time(), info.request_id, scope["method"], scope["path"], info.model,
                info.asked, status or 499, info.queue_ms, info.replica,
                (first - info.started) * 1000 if first else None, (now - info.started) * 1000,
                sent))
