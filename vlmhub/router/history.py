"""The last hour of the router, kept in its own memory for the web page's chart: GPU memory
held per model over time, and the loads and evictions.

:class:`History` is an observer of the supervisor (``observe_load``/``observe_eviction``, as
:class:`~vlmhub.router.metrics.RouterMetrics`; :class:`Tee` hands every event to both), and
samples the supervisor's snapshot every ``interval_s`` (:meth:`History.run`), keeping a sample
only when what a model holds changed, plus one a minute so the chart's line goes on. Both
are bounded: samples and events older than ``window_s`` are dropped, and at most
``max_events`` events are kept. Everything runs on the event loop and never blocks.
:func:`attach_history` wires one to a router app: the sampler runs for the app's lifespan and
``GET /api/ui/history`` (vlmhub.router.ui) reads it from ``app.state.history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette

from vlmhub.control.contract import Observer, ReplicaInfo, SupervisorLike

WINDOW_S = 3600.0
KEEPALIVE_S = 60.0  # a sample at least this often, even when nothing changed
HOLDS_BUDGET = frozenset({"ready", "starting", "stopping"})


@dataclass(frozen=True)
class Event:
    """A load (``load``, ``load_failed``, with its seconds) or an eviction (``evict_stop``,
    ``evict_sleep``) at wall-clock time ``t``."""

    t: float
    model: str
    kind: str
    seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "model": self.model, "kind": self.kind,
                "seconds": None if self.seconds is None else round(self.seconds, 3)}


def held_gib(info: ReplicaInfo, sleep_gib: float) -> float:
    """What a model holds on the GPU in this state: its budget while it runs (starting and
    stopping included: vLLM holds the memory until the process has gone), its sleep residual
    while asleep, else nothing. External models hold nothing here."""
    if info.external:
        return 0.0
    if info.state in HOLDS_BUDGET:
        return info.budget_gib
    return sleep_gib if info.state == "sleeping" else 0.0


class History:
    """Bounded samples of GPU memory held per model, and load/eviction events."""

    def __init__(self, window_s: float = WINDOW_S, max_events: int = 2000,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[tuple[float, dict[str, float]]] = deque()
        self.events: deque[Event] = deque(maxlen=max_events)
        self.started = clock()

    # -- the supervisor's observer ------------------------------------------------------
    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        self.events.append(Event(self.clock(), model, "load" if ok else "load_failed", seconds))
        self._trim()

    def observe_eviction(self, model: str, mode: str) -> None:
        self.events.append(Event(self.clock(), model, f"evict_{mode}"))
        self._trim()

    # -- sampling ------------------------------------------------------------------------
    def sample(self, snapshot: Iterable[ReplicaInfo], sleep_gib: dict[str, float]) -> bool:
        """Record what each model holds now; True when a sample was kept (it changed, or
        the last one is a minute old)."""
        now = self.clock()
        held = {i.name: round(sum(held_gib(x, sleep_gib.get(i.name, 0.0))  # every replica
                                  for x in i.replicas or (i,)), 3) for i in snapshot}
        if self.samples:
            last_t, last = self.samples[-1]
            if last == held and now - last_t < KEEPALIVE_S:
                return False
        self.samples.append((now, held))
        self._trim()
        return True

    async def run(self, supervisor: SupervisorLike, interval_s: float = 1.0) -> None:
        """Sample ``supervisor`` every ``interval_s`` until cancelled."""
        while True:
            self.sample(supervisor.snapshot(), sleep_residuals(supervisor))
            await asyncio.sleep(interval_s)

    def _trim(self) -> None:
        cutoff = self.clock() - self.window_s
        while len(self.samples) > 1 and self.samples[1][0] <= cutoff:
            self.samples.popleft()  # the last one before the window stays: the line's start
        while self.events and self.events[0].t < cutoff:
            self.events.popleft()

    def as_json(self) -> dict[str, Any]:
        """The window for ``GET /api/ui/history``: times are Unix seconds."""
        self._trim()
        return {"now": round(self.clock(), 3), "window_s": self.window_s,
                "since": round(self.started, 3), "recording": True,
                "samples": [{"t": round(t, 3), "held_gib": held} for t, held in self.samples],
                "events": [e.as_json() for e in self.events]}


class Tee:
    """Hands every supervisor event to each of ``observers`` (metrics and history)."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        for o in self.observers:
            o.observe_load(model, seconds, ok)

    def observe_eviction(self, model: str, mode: str) -> None:
        for o in self.observers:
            o.observe_eviction(model, mode)


def sleep_residuals(supervisor: SupervisorLike) -> dict[str, float]:
    """Each model's GPU memory while asleep, from the supervisor's resolved models."""
    replicas = getattr(supervisor, "replicas", None)
    found: dict[str, float] = {}
    for replica in (replicas.values() if isinstance(replicas, dict) else ()):
        model = getattr(replica, "model", None)  # one of several replicas: its model's
        name, residual = getattr(model, "name", None), getattr(
            getattr(model, "budget", None), "sleep_residual_gib", None)
        if isinstance(name, str) and isinstance(residual, int | float):
            found[name] = float(residual)
    return found


def attach_history(app: Starlette, supervisor: SupervisorLike, history: History,
                   interval_s: float = 1.0) -> None:
    """Serve ``history`` at ``/api/ui/history`` and sample ``supervisor`` into it for as long
    as the app runs (its lifespan, wrapped around the app's own)."""
    app.state.history = history
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Starlette) -> AsyncIterator[Any]:
        task = asyncio.create_task(history.run(supervisor, interval_s))
        try:
            async with inner(a) as state:
                yield state
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.router.lifespan_context = lifespan
