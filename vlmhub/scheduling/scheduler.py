"""The scheduler: a pure decision of what must happen for a model to become ready.

Given the usable GPU memory and a snapshot of every replica, :func:`plan` answers one of:
``ready`` (nothing to do), ``start``/``wake`` (after evicting ``evict``), ``wait`` (another
engine is starting or stopping: vLLM instances must start one at a time, because an instance
that profiles while another loads counts the other's memory), or ``refuse`` with a reason.

It does no I/O and no logging, and it reads the clock only through ``now``: it is table-tested
and can be driven with simulated time. The supervisor calls it from its one control loop.

Eviction order (see docs/scheduling.md):
1. idle replicas before busy ones (a busy victim is drained first, never cut off);
2. the highest ``idle_s / reload_cost_s`` first: long idle and cheap to bring back;
3. least recently used as the tie-break, then the name;
and victims that turn out not to be needed are kept (most valuable first), so one large
eviction beats two small ones.
Pinned and external replicas are never victims, nor a member of the target's ``together``
group (the group was sized to fit together); a sleep-capable victim is put to sleep
(keeping ``sleep_gib``) unless that does not free enough, in which case it is stopped.

Host RAM is a second budget (``host_gib``): a level-1 sleep moves the victim's weights
(``host_gib`` of its view) into host RAM, a level-2 sleep keeps nothing there and wakes by
reloading them (``wake2_s``). A victim sleeps at level 1 where the host has room for its
weights beside the other level-1 sleepers, else at level 2 where that wake is cheaper than a
cold start, else it is stopped: the plan never puts more on the host than ``host_gib``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

SleepLevel = Literal[1, 2]

State = Literal["stopped", "starting", "ready", "sleeping", "stopping", "failed"]
"""A replica's state (the control plane's state machine; the scheduler's input)."""
STATES: tuple[State, ...] = ("stopped", "starting", "ready", "sleeping", "stopping", "failed")
Action = Literal["ready", "start", "wake", "wait", "refuse"]
EvictMode = Literal["sleep", "stop"]
EPS = 1e-9


@dataclass(frozen=True)
class ReplicaView:
    """What the scheduler knows of one replica."""

    name: str
    state: State
    footprint_gib: float
    sleep_gib: float = 1.25
    in_flight: int = 0
    pinned: bool = False
    last_used: float = 0.0
    reload_cost_s: float = 60.0
    can_sleep: bool = False
    external: bool = False
    draining: bool = False
    loaded_at: float = 0.0
    """When it last became ready (the policy's hold after a costly load)."""
    priority: str = "interactive"
    """The class of its latest work: ``interactive`` or ``batch`` (see :mod:`.policy`)."""
    group: str | None = None
    """Its ``together`` group: planned to fit with the others, never evicted to make room for
    one of them (docs/vram.md)."""
    wake_s: float = 2.0
    """What a wake from a level-1 sleep costs (measured where known)."""
    wake2_s: float = 6.0
    """What a wake from a level-2 sleep costs: the weights are loaded again."""
    host_gib: float = 0.0
    """The host RAM a level-1 sleep of it takes (its weights)."""
    level: SleepLevel = 1
    """The level of its sleep, while it sleeps."""
    devices: int = 1
    """The GPUs its engine spans (``tensor_parallel_size``): it holds ``footprint_gib`` (and
    ``sleep_gib`` asleep) on EACH of them (:mod:`vlmhub.scheduling.placement`)."""

    @property
    def host_held_gib(self) -> float:
        """Host RAM this replica holds now: its weights while it sleeps at level 1."""
        return self.host_gib if self.state == "sleeping" and self.level == 1 else 0.0

    @property
    def bring_cost_s(self) -> float:
        """What making it serve costs from where it is: a wake at its level, else a start."""
        if self.state == "sleeping":
            return self.wake_s if self.level == 1 else self.wake2_s
        return self.reload_cost_s

    def return_cost_s(self, mode: EvictMode, level: SleepLevel = 1) -> float:
        """What bringing it back costs after an eviction by ``mode`` (at ``level``)."""
        if mode == "sleep":
            return self.wake_s if level == 1 else self.wake2_s
        return self.reload_cost_s

    @property
    def held_gib(self) -> float:
        """GPU memory this replica holds now. A starting engine counts in full."""
        if self.external:
            return 0.0
        if self.state in ("starting", "ready", "stopping"):
            return self.footprint_gib
        if self.state == "sleeping":
            return self.sleep_gib
        return 0.0


@dataclass(frozen=True)
class Evict:
    name: str
    mode: EvictMode
    busy: bool = False
    level: SleepLevel = 1
    """The sleep level (``mode == "sleep"``): 1 keeps the weights in host RAM, 2 does not."""


@dataclass(frozen=True)
class Plan:
    action: Action
    target: str
    evict: tuple[Evict, ...] = ()
    reason: str = ""


def free_gib(replicas: Sequence[ReplicaView], usable_gib: float) -> float:
    return usable_gib - sum(r.held_gib for r in replicas)


def host_free_gib(replicas: Sequence[ReplicaView], host_gib: float) -> float:
    """Host RAM left for level-1 sleepers (``host_gib``: what vlmhub may use there)."""
    return host_gib - sum(r.host_held_gib for r in replicas)


def sleep_mode(r: ReplicaView, host_free: float) -> tuple[EvictMode, SleepLevel]:
    """How to evict ``r`` (which can sleep) with ``host_free`` GiB of host RAM left: level 1
    where its weights fit there, else level 2 where that wake beats a cold start, else stop."""
    if r.host_gib <= host_free + EPS and math.isfinite(r.host_gib):  # inf: level 1 barred
        return "sleep", 1
    if r.wake2_s < r.reload_cost_s:
        return "sleep", 2
    return "stop", 1


def _order(candidates: list[ReplicaView], now: float) -> list[ReplicaView]:
    def key(r: ReplicaView) -> tuple[int, float, float, str]:
        idle = max(now - r.last_used, 0.0)
        return (1 if r.in_flight else 0, -(idle / max(r.reload_cost_s, EPS)), r.last_used, r.name)

    return sorted(candidates, key=key)


def _freed(r: ReplicaView, ev: Evict) -> float:
    if ev.mode == "sleep":
        return r.footprint_gib - r.sleep_gib
    return r.held_gib


def plan(
    target: str,
    replicas: Sequence[ReplicaView],
    usable_gib: float,
    now: float,
    host_gib: float = math.inf,
) -> Plan:
    """What must happen for ``target`` to serve (``host_gib``: the host RAM vlmhub may fill
    with level-1 sleepers). Pure and deterministic."""
    by_name = {r.name: r for r in replicas}
    t = by_name[target]
    if t.external:
        return Plan("ready", target)
    if t.state == "ready":
        return Plan("ready", target)
    if t.state in ("starting", "stopping"):
        return Plan("wait", target, reason=f"{target} is {t.state}")
    busy_op = [
        r
        for r in replicas
        if r.name != target and (r.state in ("starting", "stopping") or r.draining)
    ]
    if busy_op:
        r = busy_op[0]
        what = "draining" if r.draining else r.state
        return Plan("wait", target, reason=f"one engine changes at a time: {r.name} is {what}")
    action: Action = "wake" if t.state == "sleeping" else "start"
    if t.footprint_gib > usable_gib + EPS:
        return Plan(
            "refuse",
            target,
            reason=f"{target} needs {t.footprint_gib:.2f} GiB, more than the "
            f"{usable_gib:.2f} GiB this GPU budget allows",
        )
    need = t.footprint_gib - t.held_gib
    free = free_gib(replicas, usable_gib)
    if need <= free + EPS:
        return Plan(action, target)

    candidates = _order(
        [
            r
            for r in replicas
            if r.name != target
            and not r.pinned
            and not r.external
            and r.state in ("ready", "sleeping")
            and (t.group is None or r.group != t.group)
        ],
        now,
    )
    chosen: dict[str, Evict] = {}
    host = host_free_gib(replicas, host_gib)  # a sleeping target frees its share only once awake
    for r in candidates:  # pass 1: running replicas, sleeping them where they can
        if free + EPS >= need:
            break
        if r.state != "ready":
            continue
        mode, level = sleep_mode(r, host) if r.can_sleep else ("stop", 1)
        chosen[r.name] = Evict(r.name, mode, busy=r.in_flight > 0, level=level)
        free += r.footprint_gib - (r.sleep_gib if mode == "sleep" else 0.0)
        host -= r.host_gib if mode == "sleep" and level == 1 else 0.0
    for r in candidates:  # pass 2: sleeping residue, stopped outright
        if free + EPS >= need:
            break
        if r.state == "sleeping" or chosen.get(r.name, Evict(r.name, "stop")).mode == "sleep":
            chosen[r.name] = Evict(r.name, "stop", busy=r.in_flight > 0)
            free += r.sleep_gib
    if free + EPS < need:
        pinned = [r for r in replicas if r.pinned and r.held_gib > 0]
        held = ", ".join(f"{r.name} ({r.held_gib:.2f} GiB)" for r in pinned) or "none"
        return Plan(
            "refuse",
            target,
            reason=f"{target} needs {need:.2f} GiB; even after evicting every unpinned model "
            f"only {max(free, 0):.2f} GiB would be free. Pinned models hold: {held}. "
            "Unpin one, lower a budget, or raise gpu.budget_gib",
        )
    # prune: keep any victim (most valuable first) whose eviction turned out not to be needed
    by_name = {r.name: r for r in candidates}
    for r in reversed(candidates):
        ev = chosen.get(r.name)
        if ev is None:
            continue
        gain = _freed(by_name[r.name], ev)
        if free - gain + EPS >= need:
            del chosen[r.name]
            free -= gain
    ordered = tuple(e for r in candidates for e in [chosen.get(r.name)] if e is not None)
    return Plan(action, target, evict=ordered)


def expired(
    replicas: Sequence[ReplicaView], ttl_s: dict[str, float | None], now: float
) -> list[str]:
    """Ready, idle, unpinned replicas whose ``ttl`` has passed since their last use."""
    out: list[str] = []
    for r in replicas:
        ttl = ttl_s.get(r.name)
        if (
            ttl
            and r.state in ("ready", "sleeping")
            and not r.in_flight
            and not r.pinned
            and not r.external
            and now - r.last_used >= ttl
        ):
            out.append(r.name)
    return out


def restart_delay(recent_failures: int, base_s: float, cap_s: float = 60.0) -> float:
    """Backoff before restarting a crashed engine: none after the first failure, then
    ``base``, ``2 x base``, ``4 x base``... up to ``cap_s``."""
    if recent_failures <= 1:
        return 0.0
    return float(min(base_s * (2 ** (recent_failures - 2)), cap_s))
