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
6. :class:`Expire`: ready or sleeping models idle past their ``ttl``, one per free node, except
   on a node where queued work waits for an engine that is changing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
) -> Step:
    """One pass (see the module docs). ``nodes``: live node -> usable GiB; ``busy``: node ->
    the model its running operation brings in (None: a stop), for every node whose operation
    runs now; ``host_gib``: the host RAM level-1 sleepers may fill (each node's). Pure."""
    rules = rules or Rules()
    taken = dict(busy or {})
    if nodes and all(n in taken for n in nodes):
        return Step()
    actions: list[Action] = []
    for e in entries:  # engines a health check failed: stop them first
        if e.view.state == "stopping" and e.node not in taken:
            actions.append(StopFailed(e.view.name, e.node))
            taken[e.node] = None
    for e in entries:  # models a reload removed or changed
        if e.retire and e.node not in taken:
            actions.append(Retire(e.view.name, e.node))
            taken[e.node] = None
    if nodes and all(n in taken for n in nodes):
        return Step(tuple(actions))
    bringing = {t for t in (busy or {}).values() if t is not None}
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
    if not demand:
        _expire(entries, now, taken, frozenset(), actions)
        return Step(tuple(actions))
    views = [e.view for e in entries]
    where = {e.view.name: e.node for e in entries}
    d = placement.decide(nodes, views, where, demand, now, rules.policy, frozenset(taken),
                         host_gib)
    actions.extend(Defer(n, why) for n, why in d.deferred)
    actions.extend(Refuse(n, why) for n, why in d.refuse)
    for node, p in d.plans:
        actions.append(Run(node, p))
        taken[node] = p.target
    _expire(entries, now, taken, d.busy_nodes, actions)
    return Step(tuple(actions), True, d.recheck_at, tuple(demand), d.decisions)


def _expire(
    entries: Sequence[Entry],
    now: float,
    taken: dict[str, str | None],
    held: frozenset[str],
    actions: list[Action],
) -> None:
    """Append the ttl stops (one per free node not ``held``) to ``actions``."""
    ttl = {e.view.name: e.ttl for e in entries}
    where = {e.view.name: e.node for e in entries}
    for name in expired([e.view for e in entries], ttl, now):
        node = where[name]
        if node not in taken and node not in held:
            actions.append(Expire(name, node))
            taken[node] = None
