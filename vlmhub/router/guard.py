"""Refuse what a web page in the user's browser could make the router do.

The router listens on 127.0.0.1 and its admin API trusts loopback clients, but a browser on the
same machine is a loopback client for every site it has open. Two ASGI-level checks close that:

- **DNS rebinding**: when the router listens on a loopback address, the ``Host`` header must
  name this machine (``localhost``, ``127.x``, ``[::1]``); a page that rebinds its own domain
  to 127.0.0.1 sends its domain instead.
- **Cross-site requests**: a request that a browser marks as coming from another site
  (``Sec-Fetch-Site: cross-site``, or an ``Origin`` other than the router's own) may not
  change anything: every method but GET/HEAD/OPTIONS is refused, so no page can load, unload
  or run models. curl and the SDKs send neither header and are unaffected.

Pure header checks, no I/O: it adds microseconds to the data path.
"""

from __future__ import annotations

import functools
import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from vlmhub.router.state import RouterState, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(scope: Scope, cors_origins: frozenset[str] = frozenset()) -> str | None:
    """Why this request must be refused, or None. ``cors_origins`` may change state on
    ``/v1`` (router.cors_origins); never on the admin API. One pass over the raw headers
    (ASGI names are lowercase bytes) picks the three it reads; nothing else is decoded."""
    raw_host = raw_origin = raw_site = None
    for k, v in scope["headers"]:
        k = k.lower()
        if k == b"host":
            raw_host = v
        elif k == b"origin":
            raw_origin = v
        elif k == b"sec-fetch-site":
            raw_site = v
    host = raw_host.decode("latin-1") if raw_host is not None else ""
    server = scope.get("server")
    if server and host and _loopback(str(server[0])):
        name = _host_name(host)
        if not (_loopback(name) or name == "localhost"):
            return f"Host {host!r} does not name this machine (the router listens on loopback)"
    if scope.get("method", "GET") in SAFE_METHODS:
        return None
    origin = raw_origin.decode("latin-1") if raw_origin is not None else None
    if origin is not None and str(scope.get("path", "")).startswith("/v1/") and (
        origin in cors_origins or "*" in cors_origins
    ):
        return None
    if raw_site is not None and raw_site.decode("latin-1") == "cross-site":
        return "a page on another site may not send requests that change state"
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != host):
        return f"a page at {origin} may not send requests that change state"
    return None


@functools.lru_cache(maxsize=256)
def _loopback(host: str) -> bool:
    """:func:`is_loopback`, remembered: the same few addresses and Host names come back with
    every request (an ``ipaddress`` parse is the dearest part of the check)."""
    return is_loopback(host)


class BrowserGuard:
    """ASGI middleware applying :func:`refusal` to every HTTP request (403, OpenAI shape)."""

    def __init__(self, app: ASGIApp, state: RouterState | None = None) -> None:
        self.app = app
        self.state = state  # router.cors_origins is read per request: a reload applies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            origins = self.state.settings.cors_origins if self.state else frozenset[str]()
            why = refusal(scope, origins)
            if why is not None:
                body = json.dumps(
                    {
                        "error": {
                            "message": f"Refused: {why}.",
                            "type": "permission_error",
                            "param": None,
                            "code": "cross_site_refused",
                        }
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
