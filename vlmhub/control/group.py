"""A model's replicas as one group: its queue, its balancing and its snapshot.

Each :class:`~vlmhub.control.replica.Replica` is ONE engine's state machine; a model with
``replicas: N`` (or ``{min, max, target}``) has N of them, named ``<model>#1`` .. ``#N`` (a
model with one replica keeps its own name, so engines, logs and metrics of such models are as
before). The :class:`Group` holds what they share: the model's bounded queue (a waiting
request is granted by whichever replica becomes ready first) and the asks for a start without
a request (preload, admin load). The supervisor owns the groups; everything here runs on its
event loop, synchronously, and never blocks.

Balancing (:meth:`Group.pick`): a request goes to the ready replica with the fewest requests
in flight, ties to the least recently used; a draining, sleeping, starting or failed replica
gets none. When a replica fails, only the leases out on it are revoked; the queue stays with
the group while another replica is up (ready or starting), and moves to it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vlmhub.config.schema import ResolvedModel
from vlmhub.control.contract import AcquireError, Lease, ReplicaInfo, State
from vlmhub.control.replica import Queued, Replica, new_replica
from vlmhub.scheduling import policy, step

ORDER: tuple[State, ...] = ("ready", "starting", "stopping", "sleeping", "failed", "stopped")
"""A group's state in its snapshot: its most serving replica's."""


def replica_names(m: ResolvedModel) -> list[str]:
    """The names of ``m``'s replicas: its own name alone, or ``<name>#1`` .. ``#max``."""
    high = bounds(m)[1]
    return [m.name] if high == 1 else [f"{m.name}#{i}" for i in range(1, high + 1)]


def bounds(m: ResolvedModel) -> tuple[int, int, float | None]:
    """``(low, high, target)`` of ``m``'s ``replicas`` (:class:`vlmhub.scheduling.step.Pool`)."""
    return step.bounds(m.entry.replicas)


def new_members(m: ResolvedModel) -> list[Replica]:
    """Fresh (stopped) replicas of ``m``."""
    names = replica_names(m)
    return [new_replica(m, n, i + 1 if len(names) > 1 else 0) for i, n in enumerate(names)]


@dataclass
class Group:
    """One model's replicas and its queue. Touched only from the event loop."""

    model: ResolvedModel
    members: list[Replica]
    waiters: deque[Queued] = field(default_factory=deque)
    wanted: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.name

    def pick(self) -> Replica | None:
        """The replica a new request goes to: ready, not draining, fewest in flight, then
        least recently used; None when none is ready."""
        ready = [r for r in self.members
                 if r.state == "ready" and not r.draining and r.retire != "removed"]
        return min(ready, key=lambda r: (r.in_flight, r.last_used, r.index), default=None)

    @property
    def pooled(self) -> bool:
        """Several replicas (or autoscaled): the step sees its queue as a
        :class:`~vlmhub.scheduling.step.Pool`; else on its one replica's entry."""
        return len(self.members) > 1 or bounds(self.model)[2] is not None

    @property
    def leases_at_once(self) -> bool:
        """Whether a new request is leased at once (a replica is ready, nobody queued)."""
        return not self.waiters and self.pick() is not None

    def others_up(self, r: Replica, bringing: set[str]) -> bool:
        """Whether a replica besides ``r`` serves or is being brought in: then ``r``'s failure
        leaves the queue to it."""
        return any(x is not r and (x.state in ("ready", "starting") or x.name in bringing)
                   for x in self.members)

    def fail(self, err: AcquireError) -> None:
        """Fail every queued request and every ask for a start with ``err``."""
        while self.waiters:
            fut = self.waiters.popleft().fut
            if not fut.done():
                fut.set_exception(err)
        for w in self.wanted:
            if not w.done():
                w.set_exception(err)
        self.wanted.clear()

    def grant(self, lease: Callable[[Replica, str], Lease]) -> None:
        """Lease the queue, oldest first, each to the replica :meth:`pick` names then; the
        asks for a start are answered once a replica is ready."""
        while self.waiters and (r := self.pick()) is not None:
            q = self.waiters.popleft()
            if not q.fut.done():
                q.fut.set_result(lease(r, q.priority))
        if self.pick() is not None:
            for w in self.wanted:
                if not w.done():
                    w.set_result(None)
            self.wanted.clear()

    def pool(self) -> step.Pool:
        """What the pure step knows of the group (a model with several replicas)."""
        low, high, target = bounds(self.model)
        return step.Pool(  # a replica a reload removed only drains: not the pool's
            tuple(r.name for r in self.members if r.retire != "removed"),
            tuple(policy.Waiter(q.arrived, q.priority) for q in self.waiters),  # type: ignore[arg-type]
            bool(self.wanted), low, high, target,
        )

    def info(self, runtime_kind: str) -> ReplicaInfo:
        """The model's snapshot: its most serving replica's, with the group's totals and, for
        several replicas, each replica's own snapshot in ``replicas``."""
        each = [r.info(runtime_kind) for r in self.members]
        if len(each) == 1:
            one = each[0]
            return replace(one, queued=len(self.waiters),
                           waiting_reason=one.waiting_reason if self.waiters else None)
        best = min(each, key=lambda i: ORDER.index(i.state))
        reason = next((r.waiting_reason for r in self.members if r.waiting_reason), None)
        return replace(
            best, name=self.name, in_flight=sum(i.in_flight for i in each),
            queued=len(self.waiters), restarts=sum(i.restarts for i in each),
            last_used=max((i.last_used or 0.0 for i in each), default=0.0) or None,
            waiting_reason=reason if self.waiters else None, replica="",
            replicas=tuple(each),
        )


def grouped(replicas: dict[str, Replica], old: dict[str, Group] | None = None
            ) -> dict[str, Group]:
    """The groups of a replica table (in its order), keeping the queues of ``old`` groups."""
    out: dict[str, Group] = {}
    for r in replicas.values():
        g = out.get(r.model.name)
        if g is None:
            prev = (old or {}).get(r.model.name)
            g = out[r.model.name] = Group(r.model, [])
            if prev is not None:
                g.waiters, g.wanted = prev.waiters, prev.wanted
        g.members.append(r)
        g.model = r.model
    return out
