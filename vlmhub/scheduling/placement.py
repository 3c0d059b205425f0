"""Placement: which GPU (Ray node) each waiting model goes to, and what runs there next.

Pure, like :mod:`.scheduler` and :mod:`.policy`, which it drives once per node: no
I/O, no logging, the clock only through ``now``. One GPU is one node here (a Ray node declares
its GPU memory as the ``vram_gib`` resource, see docs/scale-out.md); a single-GPU setup is one
implicit node named ``""``, and then :func:`decide` is exactly :func:`vlmhub.policy.decide`.

For a model that waits, the node is:
1. the node where it already runs, sleeps, starts or stops (a sleeping engine wakes where it
   sleeps);
2. else a live node where it starts without evicting anything (the one with most room left);
   (:func:`room`: also how a model's further replicas are placed, never evicting anything,
   on a node without another replica of the model first);
3. else the live node whose evictions cost the least: its engine slot free before one that is
   busy, then no busy victim, then victims idle longest for their reload cost (the
   scheduler's own eviction order), then the least reload cost in all;
4. never a node that is gone, nor one whose budget is too small for it (refused when no node
   can ever hold it).
Then, on every node whose engine slot is free, :func:`vlmhub.policy.decide` picks the one
operation to run there: the one-start-at-a-time rule, pins, busy victims, the swap price and
``together`` groups hold per node, and nodes change concurrently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vlmhub.scheduling.policy import Decision, Demand, Params
from vlmhub.scheduling.policy import decide as decide_one
from vlmhub.scheduling.scheduler import Plan, ReplicaView, free_gib, plan

PLACED = frozenset({"starting", "ready", "sleeping", "stopping"})
"""The states in which a replica holds memory on its node."""


@dataclass(frozen=True)
class NodeDecision:
    """What the loop does now: at most one operation per node, plus refusals and deferrals."""

    plans: tuple[tuple[str, Plan], ...] = ()
    """(node, plan): at most one per node, only on nodes whose engine slot is free."""
    refuse: tuple[tuple[str, str], ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    busy_nodes: frozenset[str] = frozenset()
    """Nodes with work waiting on an engine that is changing there: no ttl stop runs there."""
    recheck_at: float | None = None
    """The earliest moment a node's deferral ends by time alone (Decision.recheck_at)."""
    decisions: tuple[tuple[str, Decision], ...] = ()
    """Each free node's policy decision (the supervisor's debug log)."""


def on_node(views: Sequence[ReplicaView], where: Mapping[str, str], node: str) -> list[ReplicaView]:
    """The replicas that hold (or are changing) memory on ``node``."""
    return [v for v in views if where.get(v.name) == node and (v.state in PLACED or v.draining)]


def _value(p: Plan, by_name: Mapping[str, ReplicaView], now: float) -> tuple[float, ...]:
    """What a plan's evictions cost, lowest first, in the scheduler's own eviction order:
    a busy victim last; then the victims idle longest for their reload cost; then the total
    reload cost."""
    victims = [by_name[e.name] for e in p.evict]
    busy = 1.0 if any(e.busy for e in p.evict) else 0.0
    idle = min(max(now - v.last_used, 0.0) / max(v.reload_cost_s, 1e-9) for v in victims)
    return (busy, -idle, sum(v.reload_cost_s for v in victims))


def choose_node(
    target: ReplicaView,
    nodes: Mapping[str, float],
    views: Sequence[ReplicaView],
    where: Mapping[str, str],
    now: float,
    busy: frozenset[str] = frozenset(),
    host_gib: float = math.inf,
) -> tuple[str | None, Plan]:
    """The node for ``target`` (see the module docs) and the plan there; ``(None, refuse)``
    when no live node can hold it, ``(None, wait)`` while it is still placed on a node that
    is gone (until it is failed there). ``busy``: nodes whose engine slot is taken."""
    home = where.get(target.name)
    if home is not None and (target.state in PLACED or target.draining):
        if home not in nodes:  # the node watch fails it at once; then it starts elsewhere
            return None, Plan("wait", target.name, reason=f"its node {home} is gone")
        return home, plan(target.name, [*on_node(views, where, home), target], nodes[home], now,
                          host_gib)
    by_name = {v.name: v for v in views}
    best: tuple[tuple[float, ...], str, Plan] | None = None
    refusals: list[str] = []
    for node, usable in nodes.items():
        resident = [v for v in on_node(views, where, node) if v.name != target.name]
        p = plan(target.name, [*resident, target], usable, now, host_gib)
        if p.action == "refuse":
            refusals.append(f"{node or 'GPU'}: {p.reason}")
            continue
        slot = 1.0 if node in busy or p.action == "wait" else 0.0
        if p.action in ("start", "wake") and not p.evict:
            key: tuple[float, ...] = (0.0, slot, -free_gib([*resident, target], usable))
        elif p.action in ("start", "wake"):
            key = (1.0, slot, *_value(p, by_name, now))
        else:  # wait: the node is changing another engine
            idle = free_gib(resident, usable) >= target.footprint_gib
            key = (0.0 if idle else 1.0, 2.0, -free_gib(resident, usable))
        if best is None or (key, node) < (best[0], best[1]):
            best = (key, node, p)
    if best is None:
        why = "; ".join(refusals) if refusals else "no GPU node is available (no live Ray node)"
        return None, Plan("refuse", target.name, reason=why)
    return best[1], best[2]


def room(
    name: str,
    nodes: Mapping[str, float],
    views: Sequence[ReplicaView],
    where: Mapping[str, str],
    busy: frozenset[str] = frozenset(),
    host_gib: float = math.inf,
) -> tuple[str | None, Plan | None]:
    """The free node where ``name`` starts (or wakes where it sleeps) without evicting
    anything: one that holds no other replica of its model first (replicas spread over the
    nodes while room allows), then the one with most room left; and the plan there.
    ``(None, None)`` when there is none (another engine changes there, or only an eviction
    would make room). ``busy``: nodes whose engine slot is taken. Pure."""
    target = next(v for v in views if v.name == name)
    home = where.get(name)
    held = target.state in PLACED or target.draining
    best: tuple[tuple[float, float], str, Plan] | None = None
    for node, usable in nodes.items():
        if node in busy or (held and node != home):
            continue
        resident = [v for v in on_node(views, where, node) if v.name != name]
        p = plan(name, [*resident, target], usable, now=0.0, host_gib=host_gib)
        if p.action in ("start", "wake") and not p.evict:
            shared = 1.0 if any(sibling(v.name, name) for v in resident) else 0.0
            key = (shared, -free_gib([*resident, target], usable))
            if best is None or (key, node) < (best[0], best[1]):
                best = (key, node, p)
    return (best[1], best[2]) if best is not None else (None, None)


def sibling(a: str, b: str) -> bool:
    """Whether replicas ``a`` and ``b`` serve one model (``<model>#<n>``, control/group.py)."""
    return "#" in a and "#" in b and a.rsplit("#", 1)[0] == b.rsplit("#", 1)[0]


def decide(
    nodes: Mapping[str, float],
    views: Sequence[ReplicaView],
    where: Mapping[str, str],
    demand: Sequence[Demand],
    now: float,
    params: Params | None = None,
    busy: frozenset[str] = frozenset(),
    host_gib: float = math.inf,
) -> NodeDecision:
    """The operations to run now, at most one per free node. Pure.

    ``nodes``: live node -> usable GiB; ``where``: replica -> the node it is placed on (only
    meaningful while it holds memory); ``busy``: nodes whose engine slot is taken (their
    demand waits); ``host_gib``: the host RAM level-1 sleepers may fill on each node. With one
    node named ``""`` this is :func:`vlmhub.policy.decide`.
    """
    by_name = {v.name: v for v in views}
    if list(nodes) == [""]:  # one GPU: exactly the single-GPU policy
        if "" in busy:
            return NodeDecision(busy_nodes=frozenset({""}))
        d = decide_one(views, demand, nodes[""], now, params, host_gib)
        return NodeDecision(
            (("", d.plan),) if d.plan is not None else (),
            d.refuse, d.deferred,
            frozenset({""}) if d.plan is None and _pending(demand, d) else frozenset(),
            d.recheck_at, (("", d),),
        )
    placed = dict(where)
    per_node: dict[str, list[Demand]] = {}
    refuse: list[tuple[str, str]] = []
    seen = dict(by_name)  # a model given a node below counts as starting there for the next
    for dm in demand:
        t = by_name[dm.name]
        if t.state == "ready":
            continue
        node, p = choose_node(t, nodes, list(seen.values()), placed, now, busy, host_gib)
        if node is None:
            if p.action == "refuse":
                refuse.append((dm.name, p.reason))
            continue
        per_node.setdefault(node, []).append(dm)
        placed[dm.name] = node
        if p.action in ("start", "wake"):
            seen[dm.name] = replace(t, state="starting")
    plans: list[tuple[str, Plan]] = []
    deferred: list[tuple[str, str]] = []
    waiting: set[str] = set()
    decisions: list[tuple[str, Decision]] = []
    for node, node_demand in per_node.items():
        if node in busy:
            waiting.add(node)
            continue
        local = on_node(views, placed, node)
        here = {v.name for v in local}
        local += [by_name[dm.name] for dm in node_demand if dm.name not in here]
        nd = decide_one(local, node_demand, nodes[node], now, params, host_gib)
        decisions.append((node, nd))
        refuse.extend(nd.refuse)
        deferred.extend(nd.deferred)
        if nd.plan is not None:
            plans.append((node, nd.plan))
        elif _pending(node_demand, nd):
            waiting.add(node)
    recheck = [nd.recheck_at for _, nd in decisions if nd.recheck_at is not None]
    return NodeDecision(tuple(plans), tuple(refuse), tuple(deferred), frozenset(waiting),
                        min(recheck, default=None), tuple(decisions))


def _pending(demand: Sequence[Demand], d: Decision) -> bool:
    """Whether queued requests wait on an engine that is changing (not refused, not deferred):
    then nothing else (a ttl stop) runs on that node in this pass."""
    settled = {n for n, _ in (*d.refuse, *d.deferred)}
    return any(dm.waiters and dm.name not in settled for dm in demand)
