"""The router's own settings (``router:`` in models.yaml) as one immutable object.

Every request reads :class:`RouterSettings` once from its :class:`~vlmhub.router.state.
RouterState` (one attribute load; docs/benchmarks.md measures it); a reload builds a new one
and swaps the reference (:meth:`RouterState.apply`), so a request sees either the old settings
or the new ones, never a mix, and a revoked key is refused from the next request on. Pure: no
I/O, nothing blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmhub.config.schema import Config, RouterConfig, api_keys
from vlmhub.router.keys import NO_KEYS, KeyTable, key_table

RESTART_ONLY = ("host", "port", "log_format")
"""Router settings a running router cannot change: they take effect at the next start (the
state dir, a command-line option, is fixed for the router's life too)."""


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """What the router's handlers and middlewares read per request."""

    api_keys: tuple[bytes, ...] = ()
    """Keys for /v1 (models.yaml plus ``VLMHUB_API_KEYS``); empty: no key needed."""
    keys: KeyTable = NO_KEYS
    """The same keys by digest, with their names, models and limits (vlmhub.router.keys)."""
    admin_key: bytes | None = None
    max_body: int = 50 * 1024 * 1024
    body_timeout_s: float = 30.0
    loading_comments_s: float = 5.0
    """Seconds between SSE loading comments for a streamed request that waits (0: none)."""
    cors_origins: frozenset[str] = frozenset()
    trust_loopback: bool = True

    @classmethod
    def from_config(cls, config: Config) -> RouterSettings:
        """The settings of ``config`` (``admin_key: auto`` must already be the token, see
        :func:`vlmhub.router.state.with_admin_key`)."""
        rc = config.router
        secrets = api_keys(config)
        return cls(
            api_keys=tuple(k.encode() for k in secrets),
            keys=key_table(config, secrets[len(rc.api_keys):]),
            admin_key=rc.admin_key.encode() if rc.admin_key else None,
            max_body=int(rc.max_body_mb * 1024 * 1024),
            body_timeout_s=rc.body_timeout_s,
            loading_comments_s=rc.loading_comments_s,
            cors_origins=frozenset(rc.cors_origins),
            trust_loopback=rc.trust_loopback,
        )


def needs_restart(old: RouterConfig, new: RouterConfig) -> list[str]:
    """The :data:`RESTART_ONLY` settings that differ between ``old`` and ``new``."""
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
