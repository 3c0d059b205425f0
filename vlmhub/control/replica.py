"""The supervisor's per-model state machine (:class:`Replica`) and its queue entries.

Owned by the supervisor's event loop: nothing here blocks or is shared across threads.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmhub.config.schema import sleep_ok
from vlmhub.control.contract import Lease, ReplicaInfo, State
from vlmhub.scheduling.scheduler import ReplicaView, SleepLevel
from vlmhub.sizing.sleepfacts import SleepFacts, wake_price_s

if TYPE_CHECKING:
    from vlmhub.config.schema import ResolvedModel
    from vlmhub.engines.base import EngineHandle


@dataclass(eq=False)
class Queued:
    """One request waiting in a model's queue: its future lease, arrival and priority."""

    fut: asyncio.Future[Lease]
    arrived: float
    priority: str = "interactive"


@dataclass
class Replica:
    """One engine's mutable state (a model's, or one of its replicas': the queue is its
    :class:`vlmhub.control.group.Group`'s). Touched only from the event loop."""

    model: ResolvedModel
    rname: str = ""
    """Its own name: ``<model>#<index>`` for one of several replicas; "" is the model's."""
    index: int = 0
    """1.. among several replicas; 0 for a model's only one."""
    state: State = "stopped"
    phase: str = ""
    handle: EngineHandle | None = None
    in_flight: int = 0
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
    retiring_gib: float = 0.0
    """With ``retire == "changed"``: the footprint of the engine started from the old config,
    which holds its memory until it is stopped (:attr:`footprint` counts the larger)."""
    budget_note: str | None = None
    """What the last start taught the budgets file ("measured ...", "raised ...")."""
    healthy_at: float = 0.0
    """When the engine last answered its health path (monotonic)."""
    leases: dict[int, Lease] = field(default_factory=dict)
    """The leases out on this engine, by ``id()``: revoked when the engine fails."""
    node: str = ""
    """The GPU node its engine is placed on (a Ray node's name; "" with one GPU). Set when an
    operation is planned there; meaningful while it holds memory (starting..stopping)."""
    sleep_level: SleepLevel = 1
    """The level of its last sleep: what a wake undoes (level 2 reloads the weights)."""
    sleep_facts: SleepFacts = field(default_factory=SleepFacts)
    """What its sleeps taught (the budgets file, then this run): residue, wakes, barred
    levels (vlmhub.sizing.sleepfacts)."""

    @property
    def name(self) -> str:
        return self.rname or self.model.name

    @property
    def footprint(self) -> float:
        """The GPU memory (GiB) planned for this replica's engine. While a reload's change
        waits for the old engine to go (``retire == "changed"``), the larger of the old and
        the new footprint: the old engine holds its memory until it is stopped."""
        gib = self.model.budget.footprint_gib if self.model.budget else 0.0
        return max(gib, self.retiring_gib) if self.retire == "changed" else gib

    def view(self) -> ReplicaView:
        """What the scheduler and the swap policy know of this replica."""
        m = self.model
        return ReplicaView(
            name=self.name,
            state=self.state,
            footprint_gib=self.footprint,
            sleep_gib=self.residue_gib,
            in_flight=self.in_flight,
            pinned=m.entry.pinned,
            last_used=self.last_used,
            reload_cost_s=self.last_load_s or (m.spec.reload_cost_s if m.spec else 1),
            can_sleep=self.sleep_ok and len(self.sleep_facts.barred) < 2,
            external=m.external,
            draining=self.draining,
            loaded_at=self.loaded_at,
            priority=self.priority,
            group=",".join(m.group.names) if m.group else None,
            host_gib=(math.inf if 1 in self.sleep_facts.barred  # never a level-1 sleep
                      else m.budget.weights_gib * self.ranks if m.budget else 0.0),
            level=self.sleep_level,
            wake_s=self.wake_cost(1),
            wake2_s=self.wake_cost(2),
            devices=self.ranks,
        )

    @property
    def ranks(self) -> int:
        """The GPUs its engine spans (``tensor_parallel_size``; its budget is one rank's)."""
        return self.model.spec.options.tensor_parallel_size if self.model.spec else 1

    @property
    def residue_gib(self) -> float:
        """What it keeps on the GPU while asleep: measured, else its plugin's figure."""
        if self.sleep_facts.residue_gib is not None:
            return self.sleep_facts.residue_gib
        return self.model.budget.sleep_residual_gib if self.model.budget else 0.0

    def wake_cost(self, level: int) -> float:
        """A wake's cost from ``level`` (:func:`vlmhub.sizing.sleepfacts.wake_price_s`, the rule
        ``vlmhub simulate`` uses too: measured, else a share of the cold cost); a barred level
        costs infinitely much."""
        if level in self.sleep_facts.barred:
            return math.inf
        cold = self.last_load_s or (self.model.spec.reload_cost_s if self.model.spec else 1)
        return wake_price_s(level, cold, self.sleep_facts.wake_s.get(level))

    def info(self, runtime_kind: str) -> ReplicaInfo:
        """A read-only snapshot of this replica."""
        spec = self.model.spec
        return ReplicaInfo(
            name=self.model.name,
            state=self.state,
            phase=self.phase,
            runtime="external" if self.model.external else runtime_kind,
            port=self.handle.port if self.handle else None,
            budget_gib=round(self.footprint, 3),
            in_flight=self.in_flight,
            queued=0,
            pinned=self.model.entry.pinned,
            external=self.model.external,
            last_used=self.last_used or None,
            last_load_s=self.last_load_s,
            last_error=self.last_error,
            aliases=tuple(self.model.aliases),
            max_model_len=spec.options.max_model_len if spec else None,
            draining=self.draining,
            restarts=self.restarts,
            waiting_reason=self.waiting_reason,
            node=self.node if self.state != "stopped" else "",
            replica=self.rname,
            host_gib=round(self.view().host_held_gib, 3),
        )


def new_replica(m: ResolvedModel, name: str = "", index: int = 0) -> Replica:
    """A replica for ``m`` (``name``: its own, see :attr:`Replica.rname`): stopped (an
    external endpoint: ready), idle."""
    r = Replica(m, "" if name == m.name else name, index, sleep_ok=sleep_ok(m))
    r.idle.set()
    if m.external:
        r.state = "ready"
    return r
