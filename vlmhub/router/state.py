"""What the router's handlers share, and the key checks. Nothing here blocks, except the
admin token's small file (:func:`admin_key_for`), read or written once at start."""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import os
import secrets
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from vlmhub.config.schema import Config, api_keys
from vlmhub.control.contract import SupervisorLike
from vlmhub.logs import add_secrets
from vlmhub.router.keys import KeyRecord, Limiter
from vlmhub.router.metrics import RouterMetrics
from vlmhub.router.proxy import create_session
from vlmhub.router.settings import RouterSettings, needs_restart
from vlmhub.router.usage import UsageLedger, UsageTap


@dataclass
class RouterState:
    """Everything the handlers share. Mutated only from the event loop's thread.

    ``settings`` is read once per request and replaced whole by :meth:`apply` (a reload), never
    changed in place: a request sees the old settings or the new ones, never a mix."""

    supervisor: SupervisorLike
    config: Config
    metrics: RouterMetrics
    settings: RouterSettings
    created: int = field(default_factory=lambda: int(time.time()))
    session: aiohttp.ClientSession | None = None
    in_flight: int = 0
    limiter: Limiter = field(default_factory=Limiter)
    """Named keys' per-minute counters (kept across a reload, by key name)."""
    usage: UsageLedger = field(default_factory=UsageLedger)
    """Tokens per key name and model (vlmhub.router.usage)."""

    def http(self) -> aiohttp.ClientSession:
        """The data-path session (opened lazily when the app runs without its lifespan)."""
        if self.session is None or self.session.closed:
            self.session = create_session()
        return self.session

    def meter(self, key: KeyRecord, model: str) -> UsageTap:
        """The tap counting one answer's tokens under ``key``'s name (and its tpm window)."""

        def counted(prompt: int, completion: int) -> None:
            self.usage.add(key.name, model, prompt, completion)
            self.limiter.add_tokens(key, prompt + completion)

        return UsageTap(counted)

    def apply(self, config: Config) -> list[str]:
        """Take ``config``'s router settings from the next request on (a reload; ``admin_key:
        auto`` already the token). Returns the settings that need a restart to change
        (:data:`~vlmhub.router.settings.RESTART_ONLY`) and differ. The new keys are masked in
        the logs from now on; the old ones stay masked."""
        restart = needs_restart(self.config.router, config.router)
        add_secrets([*api_keys(config), config.router.admin_key or ""])
        self.settings = RouterSettings.from_config(config)
        self.config = config
        return restart

    # the settings under their old names (the dashboard's handlers read these)
    @property
    def api_keys(self) -> tuple[bytes, ...]:
        return self.settings.api_keys

    @property
    def admin_key(self) -> bytes | None:
        return self.settings.admin_key

    @property
    def max_body(self) -> int:
        return self.settings.max_body

    @property
    def body_timeout_s(self) -> float:
        return self.settings.body_timeout_s

    @property
    def loading_comments_s(self) -> float:
        return self.settings.loading_comments_s


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


def key_matches(given: bytes | None, keys: Sequence[bytes]) -> bool:
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


AUTO_ADMIN_KEY = "auto"
"""``router.admin_key: auto``: the router generates the admin key into its state dir."""
ADMIN_TOKEN = "admin.token"  # noqa: S105 - a file name, not a secret


def read_admin_token(state_dir: Path) -> str | None:
    """The generated admin token of ``state_dir``, if its file exists and only this user can
    read it (a regular file, not a link, owned by us, mode 0600 or stricter); else None."""
    try:
        fd = os.open(state_dir / ADMIN_TOKEN, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        info = os.fstat(fh.fileno())
        private = (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
                   and not info.st_mode & 0o077)
        token = fh.read(256).strip() if private else ""
    return token or None


def ensure_admin_token(state_dir: Path) -> str:
    """``state_dir``'s admin token: the one already there (see :func:`read_admin_token`),
    else 32 random bytes (URL-safe) written to ``<state_dir>/admin.token`` with mode 0600."""
    token = read_admin_token(state_dir)
    if token is not None:
        return token
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    tmp = state_dir / f".{ADMIN_TOKEN}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, state_dir / ADMIN_TOKEN)
    return token


def admin_key_for(configured: str | None, state_dir: Path, *, create: bool) -> str | None:
    """``router.admin_key`` as it is used: the generated token for ``auto`` (created when
    ``create``: the router; read only: the CLI), else the configured key (or None)."""
    if configured != AUTO_ADMIN_KEY:
        return configured
    return ensure_admin_token(state_dir) if create else read_admin_token(state_dir)


def with_admin_key(config: Config, state_dir: Path) -> Config:
    """``config`` with ``router.admin_key: auto`` replaced by the state dir's token."""
    key = admin_key_for(config.router.admin_key, state_dir, create=True)
    if key == config.router.admin_key:
        return config
    return config.model_copy(update={"router": config.router.model_copy(
        update={"admin_key": key})})
