"""The swap policy: which waiting model the loop serves next, and whether a swap pays now.

Pure, like :mod:`vlmhub.scheduling.scheduler` (whose :func:`~vlmhub.scheduler.plan` it uses for each
candidate): no I/O, no logging, the clock only through ``now``. The supervisor's control loop
calls :func:`decide` on every pass, and ``vlmhub simulate`` calls the same function with
simulated time, so what is simulated is what runs.

Policies (``--policy`` in ``vlmhub simulate``; ``router.policy`` in models.yaml):

``vlmhub`` (the default) amortizes every reload over the work it unlocks:
  1. A start that needs no eviction happens at once (it costs nobody anything).
  2. A swap (a start that evicts a model) happens when it is worth its price:
     the waiting work ``value = sum(weight(priority) x age)`` over the target's waiters reaches
     ``value_factor x cost``, where ``cost`` is what bringing the target in costs (a wake at
     its sleep level, else its reload) plus, for every victim that still has work (in flight
     or queued), what bringing it back costs (a wake where it is put to sleep, else a reload).
     Victims with no work cost nothing, but such a swap waits while another resident model of
     the target's class is serving, so one load takes many waiters along (rule 5 bounds the
     wait). A ready model used less than ``busy_grace_s`` ago counts as serving (and as having
     work): a closed-loop client's next request is one round trip behind its answer.
     ``Decision.recheck_at`` says when that grace ends, so the loop decides again then rather
     than at its next tick.
  3. A model that was loaded at cost C and still has work keeps its place for
     ``hold_factor x C`` seconds after it became ready, whatever its priority.
  4. Interactive before batch: among candidates, interactive ones are served first, and a
     model with interactive work (in flight or queued) is not evicted for batch work. A batch
     model without work yields to interactive work at once; one that still has work is held
     (rule 3) and priced (rule 2) like any other, so a costly batch load is not thrown away
     for one chat request.
  5. The bound: a waiter's swap is forced ``lead_factor`` x the target's reload cost before
     its model's ``max_wait_s`` (per priority), so the load ends within the bound, whatever
     the rules above say. Forced targets go first, the latest against its bound first.
``fifo``: vlmhub's policy before the swap-cost rules: the oldest waiting request's model is
  started at once, evicting as :func:`~vlmhub.scheduler.plan` says.
``lru``: like fifo, but victims are chosen by least recent use alone, and never put to sleep.
``exclusive``: one model at a time (llama-swap's groups): every other model is stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from vlmhub.scheduling.scheduler import Evict, Plan, ReplicaView, plan

if TYPE_CHECKING:
    from vlmhub.config.schema import Config, ResolvedModel

Priority = Literal["interactive", "batch"]
PolicyName = Literal["vlmhub", "fifo", "lru", "exclusive"]
POLICIES: tuple[PolicyName, ...] = ("vlmhub", "fifo", "lru", "exclusive")
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
Planner = Callable[[str, Sequence[ReplicaView], float, float, float], Plan]
"""``(target, replicas, usable_gib, now, host_gib) -> Plan``, as :func:`plan`."""


@dataclass(frozen=True)
class Waiter:
    """One queued request: when it arrived and its priority."""

    arrived: float
    priority: Priority = "interactive"


@dataclass(frozen=True)
class Demand:
    """What waits for one model that is not ready."""

    name: str
    waiters: tuple[Waiter, ...] = ()
    wanted: bool = False
    """A start was asked for without a request (preload, admin load): it goes first."""


@dataclass(frozen=True)
class Params:
    """The policy's knobs (docs/scheduling.md lists them with their defaults)."""

    name: PolicyName = "vlmhub"
    value_factor: float = 2.0
    hold_factor: float = 4.0
    interactive_weight: float = 4.0
    interactive_wait_factor: float = 3.0
    batch_wait_factor: float = 10.0
    min_wait_s: float = 10.0
    max_wait_cap_s: float = 1800.0
    lead_factor: float = 1.25
    """The bound forces a swap this many reload costs before it, so the load (and the victim's
    stop) ends within it."""
    busy_grace_s: float = 0.25
    """A ready model used less than this long ago counts as serving even with nothing in
    flight: a closed-loop client's next request is one HTTP round trip behind its answer."""
    max_wait_s: Mapping[str, Mapping[Priority, float]] = field(default_factory=dict)
    """Per model (and priority), set in models.yaml: overrides the derived default."""


@dataclass(frozen=True)
class Decision:
    """What the loop does now: at most one operation (``plan``), plus requests to refuse."""

    plan: Plan | None = None
    refuse: tuple[tuple[str, str], ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    """Swaps not worth their price yet, with why (shown in /api/models, not acted on)."""
    recheck_at: float | None = None
    """When nothing is chosen: the moment a deferral ends by time alone (a ``busy_grace_s``
    running out, or a wait bound forcing a swap); the loop decides again then."""


def max_wait(
    target: ReplicaView, replicas: Sequence[ReplicaView], priority: Priority, p: Params
) -> float:
    """The longest a ``priority`` request for ``target`` waits before its swap is forced.

    Default: a multiple of what the swap can cost (the target's reload plus the costliest
    other model's), ``interactive_wait_factor`` or ``batch_wait_factor``, within
    ``[min_wait_s, max_wait_cap_s]``; a per-model setting wins. (Cold costs, also for a
    sleeping target: bounds derived from wake costs forced swaps that threw away fresh cold
    loads on mixed3, docs/benchmarks.md.)
    """
    own = p.max_wait_s.get(target.name, {}).get(priority)
    if own is not None:
        return own
    out = max((r.reload_cost_s for r in replicas if r.name != target.name), default=0.0)
    factor = p.interactive_wait_factor if priority == "interactive" else p.batch_wait_factor
    return min(max(factor * (target.reload_cost_s + out), p.min_wait_s), p.max_wait_cap_s)


def decide(
    replicas: Sequence[ReplicaView],
    demand: Sequence[Demand],
    usable_gib: float,
    now: float,
    params: Params | None = None,
    host_gib: float = math.inf,
    planner: Planner = plan,
) -> Decision:
    """The one operation to run now (or none), given every replica and what waits
    (``host_gib``: the host RAM level-1 sleepers may fill; ``planner``: what a start needs,
    :func:`~vlmhub.scheduling.scheduler.plan` on one GPU, the placement's per-device plan
    where an engine spans several). Pure."""
    p = params or Params()
    views = _views_for(p, replicas)
    by_name = {r.name: r for r in views}
    refuse: list[tuple[str, str]] = []
    deferred: list[tuple[str, str]] = []
    ranked: list[tuple[tuple[float, ...], Plan]] = []
    recheck: list[float] = []
    for d in demand:
        t = by_name[d.name]
        if t.state == "ready" or (not d.waiters and not d.wanted):
            continue
        pl = _plan(p, d.name, views, usable_gib, now, host_gib, planner)
        if pl.action == "wait":
            return Decision(None, tuple(refuse), tuple(deferred), _first(recheck))
        if pl.action == "refuse":
            refuse.append((d.name, pl.reason))
            continue
        if pl.action == "ready":
            continue
        oldest = min((w.arrived for w in d.waiters), default=now)
        if p.name != "vlmhub":
            ranked.append(((0 if d.wanted else 1, oldest), pl))
            continue
        rank, why, until = _rank(p, d, t, pl, views, demand, now)
        if until is not None:
            recheck.append(until)
        if rank is None:
            deferred.append((d.name, why))
            recheck.append(_due(p, d, t, views))
            continue
        ranked.append((rank, pl))
    if not ranked:
        return Decision(None, tuple(refuse), tuple(deferred), _first(recheck))
    ranked.sort(key=lambda x: x[0])
    return Decision(ranked[0][1], tuple(refuse), tuple(deferred))


def _dues(p: Params, d: Demand, t: ReplicaView, views: Sequence[ReplicaView]) -> list[float]:
    """When each waiter's swap is forced: early enough (``lead_factor`` x the target's reload
    cost before its ``max_wait_s``) for the load to end by the bound."""
    lead = p.lead_factor * t.bring_cost_s
    return [w.arrived + max_wait(t, views, w.priority, p) - lead for w in d.waiters]


def _due(p: Params, d: Demand, t: ReplicaView, views: Sequence[ReplicaView]) -> float:
    return min(_dues(p, d, t, views), default=math.inf)


def _first(times: list[float]) -> float | None:
    return min((x for x in times if x < math.inf), default=None)


def _active(r: ReplicaView, now: float, p: Params) -> bool:
    """Serving now: requests in flight, or a ready model used within ``busy_grace_s``."""
    return r.in_flight > 0 or (r.state == "ready" and now - r.last_used < p.busy_grace_s)


def _grace_ends(rs: Sequence[ReplicaView], p: Params) -> float | None:
    """When the last of ``rs`` stops counting as serving, if only the grace keeps them so."""
    if any(r.in_flight > 0 for r in rs):
        return None
    return max((r.last_used + p.busy_grace_s for r in rs), default=None)


def _views_for(p: Params, replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
    if p.name in ("lru", "exclusive"):  # plain baselines: no sleep, recency only
        return [replace(r, can_sleep=False, reload_cost_s=1.0) for r in replicas]
    return list(replicas)


def _plan(
    p: Params, target: str, views: list[ReplicaView], usable_gib: float, now: float,
    host_gib: float, planner: Planner = plan,
) -> Plan:
    pl = planner(target, views, usable_gib, now, host_gib)
    if p.name != "exclusive" or pl.action not in ("start", "wake"):
        return pl
    named = {e.name for e in pl.evict}
    extra = tuple(
        Evict(r.name, "stop", busy=r.in_flight > 0)
        for r in views
        if r.name != target and r.name not in named and not r.pinned and not r.external
        and r.state in ("ready", "sleeping")
    )
    return replace(pl, evict=(*pl.evict, *extra))


def _rank(
    p: Params,
    d: Demand,
    t: ReplicaView,
    pl: Plan,
    views: list[ReplicaView],
    demand: Sequence[Demand],
    now: float,
) -> tuple[tuple[float, ...] | None, str, float | None]:
    """The vlmhub policy's order key for this candidate (lower first), or None and why not,
    and when the ``busy_grace_s`` that holds it back runs out (None: not the grace)."""
    oldest = min((w.arrived for w in d.waiters), default=now)
    interactive = any(w.priority == "interactive" for w in d.waiters) or d.wanted
    klass = 0.0 if interactive else 1.0
    if d.wanted:
        return (0.0, oldest), "", None
    lead = p.lead_factor * t.bring_cost_s
    overdue = [now - due - lead for due in _dues(p, d, t, views) if now >= due]
    if overdue:  # the latest against its bound first
        return (1.0, -max(overdue)), "", None
    if not pl.evict:
        return (2.0, klass, oldest), "", None
    by_name = {r.name: r for r in views}
    victims = {e.name for e in pl.evict}
    if not any(e.busy for e in pl.evict):
        serving = [
            r for r in views
            if r.state == "ready" and _active(r, now, p) and r.name not in victims
            and (r.priority == "interactive") == interactive
        ]
        if serving:  # batch the waiters: the GPU is busy serving their class anyway
            return None, (
                f"{serving[0].name} is still serving; the swap waits to take more requests "
                "along (until the oldest reaches max_wait_s)"
            ), _grace_ends(serving, p)
    queued = {x.name: x.waiters for x in demand}
    cost = own = t.bring_cost_s
    for ev in pl.evict:
        v = by_name[ev.name]
        v_waiters = queued.get(v.name, ())
        has_work = _active(v, now, p) or bool(v_waiters)
        v_interactive = v.priority == "interactive" or any(
            w.priority == "interactive" for w in v_waiters
        )
        back = v.return_cost_s(ev.mode, ev.level)  # a wake where it sleeps, else a start
        hold = p.hold_factor * v.reload_cost_s
        until = None if v_waiters else _grace_ends([v], p)
        if not interactive and v_interactive and has_work:
            return None, f"{v.name} has interactive work; batch waits (max_wait bounds it)", until
        if has_work and now - v.loaded_at < hold:
            return None, (
                f"{v.name} was loaded {now - v.loaded_at:.0f} s ago and still has work"
            ), until
        if has_work:
            cost += back
    value = sum(
        (p.interactive_weight if w.priority == "interactive" else 1.0) * (now - w.arrived)
        for w in d.waiters
    )
    if cost > own and value + 1e-9 < p.value_factor * cost:
        return None, (
            f"waiting work ({value:.1f} request-s) is worth less than {p.value_factor:g} x the "
            f"swap's cost ({cost:.1f} s)"
        ), None
    return (3.0, klass, -value, oldest), "", None


def describe(
    replicas: Sequence[ReplicaView], demand: Sequence[Demand], now: float, d: Decision
) -> dict[str, object]:
    """One decision with its inputs, as plain data (the supervisor's debug log, logger
    ``vlmhub.scheduling.policy``): what each replica was doing, what waited, and what was chosen or
    deferred."""
    return {
        "now": round(now, 3),
        "replicas": {
            r.name: {"state": r.state, "in_flight": r.in_flight,
                     "idle_s": round(now - r.last_used, 3),
                     "ready_s": round(now - r.loaded_at, 3), "cost_s": round(r.reload_cost_s, 2)}
            for r in replicas
        },
        "demand": {
            x.name: {"waiters": len(x.waiters),
                     "oldest_s": round(now - min((w.arrived for w in x.waiters), default=now), 3)}
            for x in demand
        },
        "plan": None if d.plan is None else {
            "action": d.plan.action, "target": d.plan.target,
            "evict": [e.name for e in d.plan.evict],
        },
        "deferred": dict(d.deferred),
    }


def params_from(config: Config, models: Sequence[ResolvedModel]) -> Params:
    """The policy's parameters from models.yaml (``router.policy``, per-model ``max_wait_s``)."""
    waits: dict[str, dict[Priority, float]] = {}
    for m in models:
        if m.entry.max_wait_s is not None:
            waits[m.name] = {"interactive": m.entry.max_wait_s, "batch": m.entry.max_wait_s}
    cap = min(Params.max_wait_cap_s, config.router.queue_timeout_s / 2)  # bound under timeout
    return Params(name=config.router.policy, max_wait_s=waits, max_wait_cap_s=cap)
