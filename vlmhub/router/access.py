"""Request ids, the access log and CORS for the OpenAI routes: one ASGI middleware.

- **Request id**: the client's ``x-request-id`` (printable, at most 128 characters) or a new
  one; the proxy sends it to the engine, and every response carries it, errors and streams
  included, with ``x-vlmhub-queue-ms`` (time spent waiting for the model) and
  ``x-vlmhub-replica`` (``model@port``) once a replica was chosen.
- **Access log**: one ``vlmhub.access`` line per request when that logger is enabled: id,
  model (and the name asked for), status, queue wait, replica, time to first byte, duration,
  bytes sent. No header or body is logged.
- **CORS** (``router.cors_origins``, default none): an allowed origin gets preflight answers and
  ``Access-Control-Allow-Origin`` on ``/v1/*``; the admin API keeps its browser guard.
The endpoint fills :class:`RequestInfo` (``scope["state"]["vlmhub"]``). Per request this costs
one small object and a wrapped ``send``; nothing blocks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmhub.logs import ACCESS

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

    def __init__(self, app: ASGIApp, cors_origins: list[str] | None = None) -> None:
        self.app = app
        self.origins = frozenset(cors_origins or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        origin = self._allowed_origin(scope)
        if origin is not None and scope["method"] == "OPTIONS":
            await self._preflight(scope, send, origin)
            return
        given = _client_id(scope)
        info = RequestInfo(given or uuid.uuid4().hex, given is None)
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

    def _allowed_origin(self, scope: Scope) -> str | None:
        if not self.origins:
            return None
        for k, v in scope["headers"]:
            if k == b"origin":
                origin = v.decode("latin-1")
                return origin if origin in self.origins or "*" in self.origins else None
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
        now = time.monotonic()
        ttfb = (first - info.started) * 1000 if first else None
        ACCESS.info(
            "%s %s %s model=%s%s status=%s queue_ms=%s replica=%s ttfb_ms=%s ms=%.0f bytes=%d",
            info.request_id, scope["method"], scope["path"], info.model or "-",
            f" (asked {info.asked})" if info.asked and info.asked != info.model else "",
            status or 499, f"{info.queue_ms:.0f}" if info.queue_ms is not None else "-",
            info.replica or "-", f"{ttfb:.0f}" if ttfb is not None else "-",
            (now - info.started) * 1000, sent,
            extra={"request_id": info.request_id, "model": info.model, "asked": info.asked,
                   "status": status or 499, "queue_ms": info.queue_ms, "replica": info.replica,
                   "ttfb_ms": ttfb, "duration_ms": (now - info.started) * 1000, "bytes": sent,
                   "path": scope["path"]},
        )
