"""Client keys of ``/v1``: who a request is, what it may use, and its per-minute limits.

:func:`key_table` turns ``router.api_keys`` into a dict from each key's SHA-256 digest to its
:class:`KeyRecord` once, when :class:`~vlmhub.router.settings.RouterSettings` is built (start
and reload), so a request costs one hash and one dict lookup whatever the number of keys, and
the lookup compares digests, never the key's bytes (no timing leak of a key's prefix).

:class:`Limiter` holds each named key's counters in fixed one-minute windows (requests and
tokens); it lives in :class:`~vlmhub.router.state.RouterState` and keeps its counters across a
reload. Everything runs on the event loop's thread; nothing blocks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from vlmhub.config.apikeys import NamedKey
from vlmhub.config.schema import Config
from vlmhub.router.batch_store import key_identity
from vlmhub.router.errors import error_response, retry_after_header

ANONYMOUS = "anonymous"
"""The usage label of requests to a router that needs no key."""
WINDOW_S = 60.0


def plain_label(key: bytes) -> str:
    """The stable, non-secret name a plain key's usage is counted under."""
    return "key-" + hashlib.sha256(key).hexdigest()[:6]


def owner_of(key: bytes) -> str:
    """The owner fingerprint the Batch and Files API stores for ``key``."""
    return key_identity(key) or ""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One client key as the router uses it (never the key itself)."""

    name: str
    models: frozenset[str] | None = None
    """Canonical model names this key may use; None: all."""
    rpm: int | None = None
    tpm: int | None = None
    expires: float | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def visible(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.allows(n)]


ANONYMOUS_RECORD = KeyRecord(ANONYMOUS)


@dataclass(frozen=True, slots=True)
class KeyTable:
    """``router.api_keys`` and ``VLMHUB_API_KEYS`` as lookups (empty: no key needed)."""

    by_digest: Mapping[bytes, KeyRecord]
    by_owner: Mapping[str, KeyRecord]
    """The same records by batch owner fingerprint (:func:`owner_of`)."""

    def __bool__(self) -> bool:
        return bool(self.by_digest)

    def lookup(self, given: bytes | None) -> KeyRecord | None:
        if given is None:
            return None
        return self.by_digest.get(hashlib.sha256(given).digest())


NO_KEYS = KeyTable({}, {})
"""The table of a router that needs no key."""


def _canonical(config: Config) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, entry in config.models.items():
        out[name] = name
        for alias in entry.aliases:
            out.setdefault(alias, name)
    return out


def key_table(config: Config, extra: Iterable[str] = ()) -> KeyTable:
    """The table of ``config``'s keys plus ``extra`` plain keys (``VLMHUB_API_KEYS``). A named
    key's models are mapped to canonical names (an alias allows its model; another name is
    kept as written: it allows a model of that name only)."""
    names = _canonical(config)
    records: dict[bytes, tuple[bytes, KeyRecord]] = {}
    for entry in [*config.router.api_keys, *extra]:
        if isinstance(entry, NamedKey):
            secret = entry.secret.encode()
            models = None if entry.models is None else frozenset(
                names.get(m, m) for m in entry.models)
            rec = KeyRecord(entry.name, models, entry.rpm, entry.tpm, entry.expires_at())
        else:
            secret = entry.encode()
            rec = KeyRecord(plain_label(secret))
        records.setdefault(hashlib.sha256(secret).digest(), (secret, rec))
    return KeyTable({d: r for d, (_, r) in records.items()},
                    {owner_of(s): r for s, r in records.values()})


class Limiter:
    """Per-key request and token counts in fixed one-minute windows (one per key name).

    A window starts at a key's first request after the previous one ended. ``admit`` counts
    the request and refuses it when the key is over its rpm, or already over its tpm (tokens
    are added after each answer by :meth:`add_tokens`, so the request that crosses the limit
    completes and the next one is refused until the window ends)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.windows: dict[str, list[float]] = {}  # name -> [start, requests, tokens]

    def _window(self, name: str, now: float) -> list[float]:
        w = self.windows.get(name)
        if w is None or now - w[0] >= WINDOW_S:
            w = self.windows[name] = [now, 0.0, 0.0]
        return w

    def admit(self, rec: KeyRecord) -> tuple[str, float] | None:
        """None when ``rec`` may send a request now (it is counted); else the limit hit
        (``requests`` or ``tokens``) and the seconds until the window ends."""
        if rec.rpm is None and rec.tpm is None:
            return None
        now = self.clock()
        w = self._window(rec.name, now)
        wait = w[0] + WINDOW_S - now
        if rec.tpm is not None and w[2] >= rec.tpm:
            return "tokens", wait
        if rec.rpm is not None and w[1] >= rec.rpm:
            return "requests", wait
        w[1] += 1
        return None

    def add_tokens(self, rec: KeyRecord, tokens: int) -> None:
        if rec.tpm is not None:
            self._window(rec.name, self.clock())[2] += tokens


REVOKED = KeyRecord("revoked", frozenset())
"""A batch owner whose key left models.yaml: its remaining lines may use no model."""


def batch_key(table: KeyTable, owner: str | None) -> KeyRecord:
    """The key a batch runs under: its owner's record (models, usage name), anonymous for a
    batch created without keys, :data:`REVOKED` when the owner's key was removed."""
    if owner is None:
        return ANONYMOUS_RECORD
    return table.by_owner.get(owner, REVOKED)


def unauthorized(message: str, code: str) -> JSONResponse:
    return error_response(401, message, "invalid_request_error", code,
                          {"WWW-Authenticate": "Bearer"})


MISSING_KEY = ("Incorrect or missing API key. Send it as `Authorization: Bearer <key>` "
               "(the OpenAI SDKs do this with api_key=...).")


def identify(request: Request, table: KeyTable, now: float) -> KeyRecord | JSONResponse:
    """The request's key record, or the 401 to answer (a missing, wrong or expired key)."""
    if not table:
        return ANONYMOUS_RECORD
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    rec = table.lookup(token.encode()) if scheme.lower() == "bearer" and token else None
    if rec is None:
        return unauthorized(MISSING_KEY, "invalid_api_key")
    if rec.expires is not None and now >= rec.expires:
        return unauthorized(f"The API key {rec.name!r} has expired; ask for a new one.",
                            "expired_api_key")
    return rec


def rate_limited(rec: KeyRecord, kind: str, wait_s: float, model: str) -> JSONResponse:
    """429 in OpenAI's shape: type ``requests`` or ``tokens``, code ``rate_limit_exceeded``."""
    limit, unit = (rec.rpm, "requests per min (RPM)") if kind == "requests" else (
        rec.tpm, "tokens per min (TPM)")
    headers = retry_after_header(wait_s)
    return error_response(
        429, f"Rate limit reached for {model} for key {rec.name!r} on {unit}: Limit {limit}. "
        f"Please try again in {headers['Retry-After']}s.", kind, "rate_limit_exceeded",
        headers)
