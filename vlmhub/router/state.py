"""What the router's handlers share, and the key checks. Nothing here blocks."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import time
from dataclasses import dataclass, field
from typing import cast

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from vlmhub.config import Config
from vlmhub.replica import SupervisorLike
from vlmhub.router.metrics import RouterMetrics
from vlmhub.router.proxy import create_session


@dataclass
class RouterState:
    """Everything the handlers share. Mutated only from the event loop's thread."""

    supervisor: SupervisorLike
    config: Config
    metrics: RouterMetrics
    api_keys: list[bytes]
    admin_key: bytes | None
    max_body: int
    body_timeout_s: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))
    session: aiohttp.ClientSession | None = None
    in_flight: int = 0

    def http(self) -> aiohttp.ClientSession:
        """The data-path session (opened lazily when the app runs without its lifespan)."""
        if self.session is None or self.session.closed:
            self.session = create_session()
        return self.session


class Reject(Exception):
    """Answer the request now with ``response`` (raised inside a handler)."""

    def __init__(self, response: Response) -> None:
        self.response = response
        super().__init__(response.status_code)


def router_state(request: Request) -> RouterState:
    return cast(RouterState, request.app.state.router)


def bearer(request: Request) -> bytes | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def key_matches(given: bytes | None, keys: list[bytes]) -> bool:
    """Constant-time comparison against every key (no early exit on a match)."""
    if given is None:
        return False
    hits = [hmac.compare_digest(given, key) for key in keys]
    return any(hits)


@functools.lru_cache(maxsize=256)
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"
