"""The contract between the router and the supervisor: leases, replica snapshots, refusals,
the supervisor's face to the router (:class:`SupervisorLike`) and its event sink
(:class:`Observer`). All the router may import from the control plane.

The router asks :meth:`SupervisorLike.acquire` for a :class:`Lease` on a model, forwards the
request to ``lease.base_url``, and releases the lease when the last byte has gone (or the client
left). While a lease is held the model counts as busy and is never evicted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from vlmhub.scheduling.scheduler import STATES, State

__all__ = [
    "STATES",
    "AcquireError",
    "Lease",
    "LoadFailed",
    "LoadTimeout",
    "NullObserver",
    "Observer",
    "QueueFull",
    "Refused",
    "ReplicaInfo",
    "State",
    "SupervisorLike",
    "UnknownModel",
]


@dataclass
class Lease:
    """The right to send one request to a ready engine. Release exactly once."""

    model: str
    base_url: str
    api_name: str
    external: bool = False
    api_key: str | None = field(default=None, repr=False)
    released: bool = False
    revoked: asyncio.Future[str] | None = field(default=None, repr=False, compare=False)
    """Set (to the reason) when the engine fails under this lease: the exchange must end now."""
    replica: str = ""
    """The replica (engine) it is on: ``<model>#<n>``, or the model's name with one replica."""

    def revoke(self, reason: str) -> None:
        """End the exchange running under this lease (its engine failed). Idempotent."""
        if self.revoked is not None and not self.revoked.done():
            self.revoked.set_result(reason)


@dataclass(frozen=True)
class ReplicaInfo:
    """A read-only snapshot of one model (or one of its replicas) for /v1/models,
    /api/models, ps and metrics."""

    name: str
    state: State
    phase: str
    runtime: str
    port: int | None
    budget_gib: float
    in_flight: int
    queued: int
    pinned: bool
    external: bool
    last_used: float | None
    last_load_s: float | None
    last_error: str | None
    aliases: tuple[str, ...] = ()
    max_model_len: int | None = None
    draining: bool = False
    restarts: int = 0
    waiting_reason: str | None = None
    """Why the policy has not brought this model in yet for its queued requests."""
    node: str = ""
    """The GPU node it runs (or last ran, or failed) on: a Ray node's name; "" with one GPU."""
    host_gib: float = 0.0
    """Host RAM it holds: its weights while it sleeps at level 1 (docs/vram.md)."""
    replica: str = ""
    """One replica's own name (``<model>#<n>``) in ``replicas``; "" for a model's row."""
    replicas: tuple[ReplicaInfo, ...] = ()
    """A model with several replicas: each one's snapshot (its own port, state, budget...)."""


class AcquireError(Exception):
    """A request cannot be served now. ``status`` is the HTTP status to answer with."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class UnknownModel(AcquireError):
    status = 404
    error_type = "model_not_found"


class QueueFull(AcquireError):
    """The model's bounded queue is full (503 with Retry-After)."""


class Refused(AcquireError):
    """The scheduler cannot make room without evicting a pinned or busy model."""


class LoadFailed(AcquireError):
    """The engine failed to start; the message carries the parsed reason."""


class LoadTimeout(AcquireError):
    status = 504
    error_type = "timeout"


class SupervisorLike(Protocol):
    """What the router needs from the supervisor (see :class:`vlmhub.supervisor.Supervisor`).

    ``acquire`` waits (asynchronously) in the model's bounded queue until the model is ready,
    starting and evicting others as the scheduler decides; concurrent callers are safe.
    Every other method is synchronous and non-blocking.
    """

    def resolve(self, name: str) -> str | None:
        """The configured model for a name or alias, or None."""

    def names(self) -> list[str]:
        """Every configured model name."""

    async def acquire(self, name: str, priority: str | None = None) -> Lease:
        """A lease on a ready engine, or an :class:`AcquireError` subclass. ``priority``
        (``interactive`` or ``batch``; None: the model's own) orders swaps between queues."""

    def would_wait(self, name: str) -> bool:
        """Whether :meth:`acquire` of this (resolved) name would queue now rather than grant a
        lease at once (the router streams loading comments to such a request)."""

    def release(self, lease: Lease) -> None:
        """Give the lease back (idempotent). The model is idle again when none are held."""

    def report_failure(self, lease: Lease, reason: str) -> None:
        """The upstream broke mid-request: check the engine now instead of at the next tick."""

    def snapshot(self) -> list[ReplicaInfo]:
        """Every model's state, in config order."""

    async def load(self, name: str) -> ReplicaInfo:
        """Start a model now (admin). Waits until it is ready or failed."""

    async def unload(self, name: str) -> ReplicaInfo:
        """Stop a model now (admin), after draining its in-flight requests."""


class Observer(Protocol):
    """Receives supervisor events (the router's metrics). Must not block."""

    def observe_load(self, model: str, seconds: float, ok: bool) -> None: ...

    def observe_eviction(self, model: str, mode: str) -> None: ...


class NullObserver:
    """An observer that drops every event."""

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        pass

    def observe_eviction(self, model: str, mode: str) -> None:
        pass
