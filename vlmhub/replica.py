"""The contract between the router and the supervisor: leases, replica snapshots, refusals;
and the supervisor's per-model state (:class:`Replica`) and its event sink (:class:`Observer`).

The router asks :meth:`Supervisor.acquire` for a :class:`Lease` on a model, forwards the request
to ``lease.base_url``, and releases the lease when the last byte has gone (or the client left).
While a lease is held the model counts as busy and is never evicted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from vlmhub.scheduler import ReplicaView

if TYPE_CHECKING:
    from vlmhub.config import ResolvedModel
    from vlmhub.runtimes.base import EngineHandle

State = Literal["stopped", "starting", "ready", "sleeping", "stopping", "failed"]
STATES: tuple[State, ...] = ("stopped", "starting", "ready", "sleeping", "stopping", "failed")


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

    def revoke(self, reason: str) -> None:
        """End the exchange running under this lease (its engine failed). Idempotent."""
        if self.revoked is not None and not self.revoked.done():
            self.revoked.set_result(reason)


@dataclass(eq=False)
class Queued:
    """One request waiting in a model's queue: its future lease, arrival and priority."""

    fut: asyncio.Future[Lease]
    arrived: float
    priority: str = "interactive"


@dataclass(frozen=True)
class ReplicaInfo:
    """A read-only snapshot of one model for /v1/models, /api/models, ps and metrics."""

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


@dataclass
class Replica:
    """One model's mutable state. Touched only from the event loop."""

    model: ResolvedModel
    state: State = "stopped"
    phase: str = ""
    handle: EngineHandle | None = None
    in_flight: int = 0
    waiters: deque[Queued] = field(default_factory=deque)
    wanted: list[asyncio.Future[None]] = field(default_factory=list)
    last_used: float = 0.0
    last_load_s: float | None = None
    last_error: str | None = None
    draining: bool = False
    failures: list[float] = field(default_factory=list)
    restarts: int = 0
    sleep_ok: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    loaded_at: float = 0.0
    """When the engine last became ready (monotonic): the policy holds a costly load."""
    priority: str = "interactive"
    """The class of the latest request leased on it (the policy protects interactive work)."""
    waiting_reason: str | None = None
    retire: str | None = None
    """Set by a config reload: ``removed`` or ``changed``; its engine is drained and stopped."""
    budget_note: str | None = None
    """What the last start taught the budgets file ("measured ...", "raised ...")."""
    healthy_at: float = 0.0
    """When the engine last answered its health path (monotonic)."""
    leases: dict[int, Lease] = field(default_factory=dict)
    """The leases out on this engine, by ``id()``: revoked when the engine fails."""
    node: str = ""
    """The GPU node its engine is placed on (a Ray node's name; "" with one GPU). Set when an
    operation is planned there; meaningful while it holds memory (starting..stopping)."""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def leases_at_once(self) -> bool:
        """Whether a new request is leased this engine at once (ready, not draining, nobody
        queued ahead of it) rather than queued."""
        return self.state == "ready" and not self.draining and not self.waiters

    @property
    def footprint(self) -> float:
        return self.model.budget.footprint_gib if self.model.budget else 0.0

    def view(self) -> ReplicaView:
        """What the scheduler and the swap policy know of this replica."""
        m = self.model
        return ReplicaView(
            name=self.name,
            state=self.state,
            footprint_gib=self.footprint,
            sleep_gib=m.budget.sleep_residual_gib if m.budget else 0.0,
            in_flight=self.in_flight,
            pinned=m.entry.pinned,
            last_used=self.last_used,
            reload_cost_s=self.last_load_s or (m.spec.reload_cost_s if m.spec else 1),
            can_sleep=self.sleep_ok,
            external=m.external,
            draining=self.draining,
            loaded_at=self.loaded_at,
            priority=self.priority,
            group=",".join(m.group.names) if m.group else None,
        )

    def info(self, runtime_kind: str) -> ReplicaInfo:
        """A read-only snapshot of this replica."""
        spec = self.model.spec
        return ReplicaInfo(
            name=self.name,
            state=self.state,
            phase=self.phase,
            runtime="external" if self.model.external else runtime_kind,
            port=self.handle.port if self.handle else None,
            budget_gib=round(self.footprint, 3),
            in_flight=self.in_flight,
            queued=len(self.waiters),
            pinned=self.model.entry.pinned,
            external=self.model.external,
            last_used=self.last_used or None,
            last_load_s=self.last_load_s,
            last_error=self.last_error,
            aliases=tuple(self.model.aliases),
            max_model_len=spec.options.max_model_len if spec else None,
            draining=self.draining,
            restarts=self.restarts,
            waiting_reason=self.waiting_reason if self.waiters else None,
            node=self.node if self.state != "stopped" else "",
        )


def sleep_ok(m: ResolvedModel) -> bool:
    """Whether ``m``'s engine is started with sleep mode (asked for, and vLLM can)."""
    from vlmhub.flags import engine_version
    from vlmhub.spec import version_tuple

    return bool(
        m.entry.sleep
        and m.spec is not None
        and version_tuple(engine_version(m.spec)) >= version_tuple(m.spec.sleep_min_vllm)
    )


def new_replica(m: ResolvedModel) -> Replica:
    """A replica for ``m``: stopped (an external endpoint: ready), idle."""
    r = Replica(m, sleep_ok=sleep_ok(m))
    r.idle.set()
    if m.external:
        r.state = "ready"
    return r
