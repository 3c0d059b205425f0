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

**Tensor parallelism.** An engine with ``devices: k > 1`` (``tensor_parallel_size``) is placed
on k device nodes at once, named together ``gpu0+gpu1`` (:func:`joined`, :func:`members`): it
holds its ``footprint_gib`` (one rank's) on each. It counts on every one of its devices
(:func:`on_node`), its plan (:func:`plan_on`) makes room on each of them (a victim chosen for
one device frees its share on the others too), and its operation takes all of them: no other
operation runs on any of its devices meanwhile (:func:`taken`). The k devices are the live
ones with room (most room left at the tightest), else the cheapest evictions, as above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import combinations

from vlmhub.scheduling.policy import Decision, Demand, Params
from vlmhub.scheduling.policy import decide as decide_one
from vlmhub.scheduling.scheduler import Evict, Plan, ReplicaView, free_gib, plan

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


JOIN = "+"
"""Joins the device nodes of a tensor-parallel engine's placement: ``gpu0+gpu1``."""


def members(node: str) -> tuple[str, ...]:
    """The device nodes of a placement: ``gpu0+gpu1`` -> (gpu0, gpu1); one node alone."""
    return tuple(node.split(JOIN)) if JOIN in node else (node,)


def joined(devices: Iterable[str]) -> str:
    """The placement on ``devices`` (the inverse of :func:`members`)."""
    return JOIN.join(devices)


def live(node: str, nodes: Mapping[str, float]) -> bool:
    """Whether every device of ``node`` is a live node."""
    return all(m in nodes for m in members(node))


def taken(busy: Iterable[str]) -> frozenset[str]:
    """The device nodes whose engine slot is taken, given the placements whose operation runs
    (an operation on ``gpu0+gpu1`` takes both)."""
    return frozenset(m for node in busy for m in members(node))


def free(node: str, busy: Iterable[str]) -> bool:
    """Whether no device of ``node`` runs an operation (``busy``: placements that do)."""
    return not set(members(node)) & taken(busy)


def on_node(views: Sequence[ReplicaView], where: Mapping[str, str], node: str) -> list[ReplicaView]:
    """The replicas that hold (or are changing) memory on any device of ``node``."""
    devs = set(members(node))
    return [v for v in views if v.name in where and devs & set(members(where[v.name]))
            and (v.state in PLACED or v.draining)]


def plan_on(
    target: str,
    views: Sequence[ReplicaView],
    node: str,
    nodes: Mapping[str, float],
    where: Mapping[str, str],
    now: float,
    host_gib: float = math.inf,
) -> Plan:
    """:func:`~vlmhub.scheduling.scheduler.plan` for ``target`` on ``node``, device by device
    for a tensor-parallel placement: each device must hold the target's footprint; a victim
    chosen on one device is counted as evicted on the next (it frees its share there too), a
    sleeping victim another device needs stopped is stopped. Refused or waiting on any device:
    that plan (the device named). Pure."""
    by_name = {v.name: v for v in views}
    t = by_name[target]
    devs = members(node)
    current = dict(by_name)
    chosen: dict[str, Evict] = {}
    action: Plan | None = None
    for d in devs:
        resident = [v for v in on_node(list(current.values()), where, d) if v.name != target]
        p = plan(target, [*resident, t], nodes[d], now, host_gib)
        if p.action not in ("start", "wake"):
            if p.action == "refuse" and len(devs) > 1:
                return replace(p, reason=f"{d}: {p.reason}")
            return p
        action = p
        for ev in p.evict:
            if ev.name not in chosen or ev.mode == "stop":
                chosen[ev.name] = ev
            v = current[ev.name]
            current[ev.name] = (replace(v, state="sleeping", level=ev.level, in_flight=0)
                                if ev.mode == "sleep" else replace(v, state="stopped"))
    assert action is not None
    return replace(action, evict=tuple(chosen.values()))


def _left(target: ReplicaView, node: str, views: Sequence[ReplicaView],
          where: Mapping[str, str], nodes: Mapping[str, float]) -> float:
    """The room left at the tightest device of ``node`` with ``target`` started there."""
    return min(free_gib([*[v for v in on_node(views, where, d) if v.name != target.name],
                         target], nodes[d]) for d in members(node))


def candidates(target: ReplicaView, nodes: Mapping[str, float]) -> list[str]:
    """The placements ``target`` may take: each live node, or for ``devices: k > 1`` each set
    of k live device nodes (in the nodes' order)."""
    if target.devices <= 1:
        return list(nodes)
    return [joined(c) for c in combinations(list(nodes), target.devices)]


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
        if not live(home, nodes):  # the node watch fails it at once; then it starts elsewhere
            return None, Plan("wait", target.name, reason=f"its node {home} is gone")
        views = [*[v for v in views if v.name != target.name], target]
        return home, plan_on(target.name, views, home, nodes, where, now, host_gib)
    by_name = {v.name: v for v in views}
    best: tuple[tuple[float, ...], str, Plan] | None = None
    refusals: list[str] = []
    others = [v for v in views if v.name != target.name]
    busy = taken(busy)
    for node in candidates(target, nodes):
        p = plan_on(target.name, [*others, target], node, nodes, where, now, host_gib)
        if p.action == "refuse":
            refusals.append(f"{node or 'GPU'}: {p.reason}")
            continue
        slot = 1.0 if set(members(node)) & busy or p.action == "wait" else 0.0
        if p.action in ("start", "wake") and not p.evict:
            key: tuple[float, ...] = (0.0, slot, -_left(target, node, others, where, nodes))
        elif p.action in ("start", "wake"):
            key = (1.0, slot, *_value(p, by_name, now))
        else:  # wait: the node is changing another engine
            left = _left(target, node, others, where, nodes) + target.footprint_gib
            key = (0.0 if left >= target.footprint_gib else 1.0, 2.0, -left)
        if best is None or (key, node) < (best[0], best[1]):
            best = (key, node, p)
    if best is None:
        why = "; ".join(refusals) if refusals else "no GPU node is available (no live Ray node)"
        if target.devices > 1 and len(nodes) < target.devices:
            why = (f"{target.name} spans {target.devices} GPUs (tensor_parallel_size); "
                   f"{len(nodes)} are live")
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
    for node in [home] if held and home is not None and live(home, nodes) else (
            [] if held else candidates(target, nodes)):
        if not free(node, busy):
            continue
        resident = [v for v in on_node(views, where, node) if v.name != name]
        p = plan_on(name, views, node, nodes, where, now=0.0, host_gib=host_gib)
        if p.action in ("start", "wake") and not p.evict:
            shared = 1.0 if any(sibling(v.name, name) for v in resident) else 0.0
            key = (shared, -_left(target, node, views, where, nodes))
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
    claimed = set(taken(busy))  # devices an operation runs on, or gets in this pass
    for node, node_demand in per_node.items():
        if set(members(node)) & claimed:
            waiting.update((node, *members(node)))
            continue
        local = on_node(views, placed, node)
        here = {v.name for v in local}
        local += [by_name[dm.name] for dm in node_demand if dm.name not in here]
        planner = partial(_plan_here, node=node, nodes=nodes, where=placed)
        nd = decide_one(local, node_demand, min(nodes[d] for d in members(node)), now, params,
                        host_gib, planner=planner)
        decisions.append((node, nd))
        refuse.extend(nd.refuse)
        deferred.extend(nd.deferred)
        if nd.plan is not None:
            plans.append((node, nd.plan))
            claimed.update(members(node))  # and every device of a victim spanning several
            claimed.update(m for ev in nd.plan.evict for m in members(placed.get(ev.name, "")))
        elif _pending(node_demand, nd):
            waiting.update((node, *members(node)))
    recheck = [nd.recheck_at for _, nd in decisions if nd.recheck_at is not None]
    return NodeDecision(tuple(plans), tuple(refuse), tuple(deferred), frozenset(waiting),
                        min(recheck, default=None), tuple(decisions))


def _plan_here(target: str, replicas: Sequence[ReplicaView], usable_gib: float, now: float,
               host_gib: float, *, node: str, nodes: Mapping[str, float],
               where: Mapping[str, str]) -> Plan:
    """The swap policy's planner on ``node`` (:func:`plan_on`: every device of a tensor-parallel
    placement; ``usable_gib`` is each device's own, from ``nodes``)."""
    return plan_on(target, replicas, node, nodes, where, now, host_gib)


def _pending(demand: Sequence[Demand], d: Decision) -> bool:
    """Whether queued requests wait on an engine that is changing (not refused, not deferred):
    then nothing else (a ttl stop) runs on that node in this pass."""
    settled = {n for n, _ in (*d.refuse, *d.deferred)}
    return any(dm.waiters and dm.name not in settled for dm in demand)
