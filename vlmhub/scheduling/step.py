"""One pass of the control loop, as a pure function: what the loop does now, on every GPU node.

The supervisor (:meth:`vlmhub.control.supervisor.Supervisor._reconcile`) and ``vlmhub
simulate`` (:mod:`vlmhub.scheduling.simulate`) both call :func:`decide` on every pass with what
they know (each replica's :class:`~vlmhub.scheduling.scheduler.ReplicaView`, where it is placed,
what waits for it, its recent failures; the live nodes and their usable GiB; which nodes run an
operation; ``now``) and carry out the actions it returns, in order. So what is simulated is what
runs, with one GPU or several. Pure, like :mod:`.placement` which it drives: no I/O, no
logging, no asyncio, the clock only through ``now``.

One pass, in order (a node that runs an operation, or gets one in this pass, gets no other):
1. :class:`StopFailed`: an engine a health check failed (state ``stopping`` on a free node);
2. :class:`Retire`: an engine a config reload removed or changed;
3. if every node is busy now: nothing more;
4. the demand: every model that is not ready with requests queued or a start asked for, unless
   a running operation already brings it in; a failed model only once its restart backoff
   (:func:`~vlmhub.scheduling.scheduler.restart_delay`) has passed, and never in a crash loop
   (``crash_loop_max`` failures within ``crash_loop_window_s``: :class:`CrashLoop`);
5. :func:`vlmhub.scheduling.placement.decide` over it: :class:`Refuse`, :class:`Defer`,
   :class:`Run` (at most one per free node);
6. replicas (:class:`Pool`, docs/scheduling.md "Replicas"): a model with several replicas has
   one queue; its first replica is demanded as any model (step 4); more start, one per free
   node, only where :func:`vlmhub.scheduling.placement.room` finds room without evicting
   anything (a start that evicts nobody costs nobody anything: the swap policy's rule 1):
   all ``high`` of a fixed pool while it is in use, or one more of an autoscaled pool while
   its work per running replica is above its ``target``;
7. :class:`Expire`: ready or sleeping models idle past their ``ttl``, one per free node, except
   on a node where queued work waits for an engine that is changing, and never a pool's
   replica that keeps it at its ``low``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from vlmhub.scheduling import placement
from vlmhub.scheduling.policy import Decision, Demand, Params, Waiter
from vlmhub.scheduling.scheduler import Plan, ReplicaView, expired, restart_delay


@dataclass(frozen=True)
class Entry:
    """One replica as the pass sees it."""

    view: ReplicaView
    node: str = ""
    """The GPU node it is placed on ("" with one GPU); meaningful while it holds memory."""
    waiters: tuple[Waiter, ...] = ()
    wanted: bool = False
    """A start was asked for without a request (preload, admin load)."""
    failures: tuple[float, ...] = ()
    """When its engine failed, within the crash-loop window, oldest first."""
    ttl: float | None = None
    retire: bool = False
    """A config reload removed or changed it and its engine still runs: stop it."""


@dataclass(frozen=True)
class Pool:
    """The replicas of one model (several engines, one queue). Its members' entries carry no
    waiters of their own: the pool's queue is granted by whichever member is ready first."""

    members: tuple[str, ...]
    """Its replicas' names, in order."""
    waiters: tuple[Waiter, ...] = ()
    wanted: bool = False
    low: int = 0
    """Replicas kept through their idle ``ttl`` (autoscaled ``min``; 0 with a fixed count)."""
    high: int = 1
    """The most replicas that run."""
    target: float | None = None
    """Autoscaled: queued and in-flight requests per running replica above which one more
    starts. None: fixed, every member runs while the model is in use."""


@dataclass(frozen=True)
class Rules:
    """The swap policy's parameters and the router's restart rules."""

    policy: Params = field(default_factory=Params)
    crash_loop_max: int = 3
    crash_loop_window_s: float = 300.0
    restart_backoff_s: float = 2.0


@dataclass(frozen=True)
class StopFailed:
    name: str
    node: str


@dataclass(frozen=True)
class Retire:
    name: str
    node: str


@dataclass(frozen=True)
class CrashLoop:
    """Fail ``name``'s waiters: it failed ``failures`` times in the window."""

    name: str
    failures: int
    retry_after: float


@dataclass(frozen=True)
class Refuse:
    name: str
    reason: str


@dataclass(frozen=True)
class Defer:
    """A swap not worth its price yet (shown as the model's waiting reason)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Run:
    """Run ``plan`` (evict its victims, then start or wake its target) as ``node``'s operation."""

    node: str
    plan: Plan


@dataclass(frozen=True)
class Expire:
    """Stop ``name`` (idle past its ttl) as ``node``'s operation."""

    name: str
    node: str


Action = StopFailed | Retire | CrashLoop | Refuse | Defer | Run | Expire
"""StopFailed, Retire, Run and Expire each take their node's one engine operation."""


@dataclass(frozen=True)
class Step:
    """What one pass decided."""

    actions: tuple[Action, ...] = ()
    placed: bool = False
    """The policy ran: every waiting reason is renewed (the models without a Defer have none)."""
    recheck_at: float | None = None
    """Decide again at this moment (a deferral ends by time alone), before the next tick."""
    demand: tuple[Demand, ...] = ()
    decisions: tuple[tuple[str, Decision], ...] = ()
    """Each free node's policy decision, for the debug log (:func:`policy.describe`)."""


def bounds(replicas: object) -> tuple[int, int, float | None]:
    """``(low, high, target)`` of a model's ``replicas`` in models.yaml: ``N`` (fixed) or
    ``{min, max, target}`` (autoscaled); see :class:`Pool`."""
    if isinstance(replicas, int):
        return 0, replicas, None
    low, high, target = (getattr(replicas, k) for k in ("min", "max", "target"))
    return int(low), int(high), float(target)


def restart(e: Entry, now: float, rules: Rules) -> CrashLoop | bool:
    """Whether a failed replica may start again now: the crash-loop guard's verdict
    (``crash_loop_max`` failures within ``crash_loop_window_s``), else whether its restart
    backoff (:func:`~vlmhub.scheduling.scheduler.restart_delay`) has passed."""
    window = rules.crash_loop_window_s
    recent = [t for t in e.failures if now - t < window]
    if len(recent) >= rules.crash_loop_max:
        return CrashLoop(e.view.name, len(recent), max(window - (now - recent[0]), 1.0))
    delay = restart_delay(len(recent), rules.restart_backoff_s)
    return not recent or now - recent[-1] >= delay


def decide(
    entries: Sequence[Entry],
    nodes: Mapping[str, float],
    now: float,
    rules: Rules | None = None,
    busy: Mapping[str, str | None] | None = None,
    host_gib: float = math.inf,
    pools: Sequence[Pool] = (),
) -> Step:
    """One pass (see the module docs). ``nodes``: live node -> usable GiB; ``busy``: node ->
    the model its running operation brings in (None: a stop), for every node whose operation
    runs now; ``host_gib``: the host RAM level-1 sleepers may fill (each node's); ``pools``:
    the models with several replicas (each member has an entry). Pure."""
    rules = rules or Rules()
    bringing = {t for t in (busy or {}).values() if t is not None}
    entries, more, floor = _pooled(entries, pools, bringing, now, rules)
    taken = dict(busy or {})
    if nodes and all(n in placement.taken(taken) for n in nodes):
        return Step()
    actions: list[Action] = []
    for e in entries:  # engines a health check failed: stop them first
        if e.view.state == "stopping" and placement.free(e.node, taken):
            actions.append(StopFailed(e.view.name, e.node))
            taken[e.node] = None
    for e in entries:  # models a reload removed or changed
        if e.retire and placement.free(e.node, taken):
            actions.append(Retire(e.view.name, e.node))
            taken[e.node] = None
    if nodes and all(n in placement.taken(taken) for n in nodes):
        return Step(tuple(actions))
    demand: list[Demand] = []
    for e in entries:
        v = e.view
        if not (e.waiters or e.wanted) or v.state == "ready" or v.name in bringing:
            continue
        if v.state == "failed":
            ok = restart(e, now, rules)
            if isinstance(ok, CrashLoop):
                actions.append(ok)
            if ok is not True:
                continue
        demand.append(Demand(v.name, e.waiters, e.wanted))
    views = [e.view for e in entries]
    where = {e.view.name: e.node for e in entries}
    if not demand:
        _more(more, views, where, nodes, taken, host_gib, actions)
        _expire(entries, now, taken, frozenset(), actions, floor)
        return Step(tuple(actions))
    d = placement.decide(nodes, views, where, demand, now, rules.policy, frozenset(taken),
                         host_gib)
    actions.extend(Defer(n, why) for n, why in d.deferred)
    actions.extend(Refuse(n, why) for n, why in d.refuse)
    for node, p in d.plans:
        actions.append(Run(node, p))
        taken[node] = p.target
    _more(more, views, where, nodes, taken, host_gib, actions)
    _expire(entries, now, taken, d.busy_nodes, actions, floor)
    return Step(tuple(actions), True, d.recheck_at, tuple(demand), d.decisions)


UP = frozenset({"starting", "ready"})
"""The states of a replica that serves or soon will."""


def _pooled(
    entries: Sequence[Entry], pools: Sequence[Pool], bringing: set[str], now: float,
    rules: Rules,
) -> tuple[list[Entry], list[str], dict[str, tuple[str, int]]]:
    """Each pool's part of the pass: ``entries`` with the pool's queue on the member demanded
    as its first replica (when none is up), the members to start where room exists without
    eviction (in order), and, for every up member, its pool and how many of the pool's up
    members a ttl stop may still take (the ones above ``low``)."""
    out = list(entries)
    at = {e.view.name: i for i, e in enumerate(out)}
    more: list[str] = []
    floor: dict[str, tuple[str, int]] = {}
    for pool in pools:
        es = [out[at[n]] for n in pool.members if n in at]
        up = [e for e in es if (e.view.state in UP and not e.view.draining)
              or e.view.name in bringing]
        for e in up:
            floor[e.view.name] = (pool.members[0], max(len(up) - pool.low, 0))
        if not up and (pool.waiters or pool.wanted or pool.low):
            first = _first_member(es, now, rules)
            if first is not None:
                out[at[first.view.name]] = replace(
                    first, waiters=pool.waiters, wanted=pool.wanted or bool(pool.low))
            continue
        if any(e.view.name in bringing for e in es):
            continue  # one start of a pool at a time: its work is measured again after it
        load = len(pool.waiters) + sum(e.view.in_flight for e in es)
        if pool.target is None:
            want = pool.high if (up or pool.waiters or pool.wanted) else 0
        else:
            want = max(pool.low, len(up) + (1 if load > pool.target * len(up) else 0))
        down = [e for e in es if e not in up and e.view.state in ("stopped", "sleeping", "failed")
                and (e.view.state != "failed" or restart(e, now, rules) is True)]
        down.sort(key=lambda e: e.view.state != "sleeping")  # a wake before a cold start
        more += [e.view.name for e in down[:max(min(want, pool.high) - len(up), 0)]]
    return out, more, floor


def _first_member(es: Sequence[Entry], now: float, rules: Rules) -> Entry | None:
    """The member a pool with no replica up brings in first: a sleeping one (a wake), else a
    stopped one, else a failed one (its restart rules apply in the pass: a crash loop fails
    the pool's queue); None while one still stops."""
    if any(e.view.state == "stopping" or e.view.draining for e in es):
        return None
    for state in ("sleeping", "stopped"):
        for e in es:
            if e.view.state == state:
                return e
    failed = [e for e in es if e.view.state == "failed"]
    verdicts = [restart(e, now, rules) for e in failed]
    for ok in (True, False):  # one that may restart now, else one in its backoff
        for e, v in zip(failed, verdicts, strict=True):
            if v is ok:
                return e
    return failed[0] if failed else None  # every one in a crash loop: the pass says so


def _more(
    names: Sequence[str], views: Sequence[ReplicaView], where: Mapping[str, str],
    nodes: Mapping[str, float], taken: dict[str, str | None], host_gib: float,
    actions: list[Action],
) -> None:
    """Start (or wake) each of ``names`` on a free node with room without eviction."""
    for name in names:
        node, p = placement.room(name, nodes, views, where, frozenset(taken), host_gib)
        if node is not None and p is not None:
            actions.append(Run(node, p))
            taken[node] = name


def _expire(
    entries: Sequence[Entry],
    now: float,
    taken: dict[str, str | None],
    held: frozenset[str],
    actions: list[Action],
    floor: Mapping[str, tuple[str, int]] | None = None,
) -> None:
    """Append the ttl stops (one per free node not ``held``) to ``actions``; a pool's member
    only while the pool keeps ``low`` replicas up (``floor``: member -> pool, stops left)."""
    ttl = {e.view.name: e.ttl for e in entries}
    where = {e.view.name: e.node for e in entries}
    left = {pool: n for pool, n in (floor or {}).values()}
    for name in expired([e.view for e in entries], ttl, now):
        node = where[name]
        pool = (floor or {}).get(name, (None, 0))[0]
        if placement.free(node, [*taken, *held]) and (pool is None or left[pool] > 0):
            actions.append(Expire(name, node))
            taken[node] = None
            if pool is not None:
                left[pool] -= 1
