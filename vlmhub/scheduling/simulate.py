"""``vlmhub simulate``: the supervisor's queueing rules and its REAL control-loop step, in
simulated time. No engines, no sleeping, no clock: a discrete-event loop over a trace (.simtrace).

What is the same as :class:`vlmhub.control.supervisor.Supervisor` (its ``_reconcile`` pass):
- a request for a ready, non-draining model with nobody queued is leased at once; otherwise it
  joins the model's queue (``max_queue``: refused when full; ``queue_timeout_s``: 504);
- a ready model leases ALL its waiters at once (no engine concurrency limit: the router hands
  out leases and vLLM batches whatever arrives; a request's ``duration`` is its service time);
- every decision is :func:`vlmhub.scheduling.step.decide`, the supervisor's own pass, over the
  same :class:`~vlmhub.scheduling.scheduler.ReplicaView` the supervisor builds (reload cost: the
  last measured start, else the spec's ``reload_cost_s``): one engine operation at a time per
  GPU node (``gpus`` identical GPUs, placed by :mod:`.placement`), the swap policy, ``ttl``
  expiry, refusals, restart backoff and the crash-loop guard; ``preload`` models are wanted
  at t=0;
- an operation evicts each victim in turn (drain: wait for its in-flight requests, at most
  ``drain_timeout_s``, then sleep or stop), then wakes or starts the target;
- a pass runs after every batch of simultaneous events and at least every ``tick_s`` (0.5 s).
A closed-loop client's next request arrives ``rtt_s`` (0.02 s) after its answer: the HTTP round
trip during which, live, the model has nothing in flight. A model's first ``fails`` starts fail
(after ``start_s``): its waiters are not served (counted as ``refused``). What is not modelled:
health checks (an engine failing after it was ready), start-up jitter, and the router's own
latency. Costs: a cold start takes the model's ``start_s`` (by default the spec's
``reload_cost_s``), a wake ``wake_s`` (level 1) or ``wake2_s`` (level 2; by default each
model's as the supervisor prices an unmeasured wake: ``sleepfacts.wake_price_s``), a sleep
``sleep_s``, a stop ``stop_s``. Host RAM: a level-1 sleeper holds its weights
(``SimModel.host_gib``) in the host's ``host_gib``, and the step picks each sleep's level by
that room, as live; the result reports the peak (``host_peak_gib``).

Pure and single-threaded: :func:`simulate` runs to completion and returns a :class:`SimResult`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlmhub.config.schema import Config, ResolvedModel, sleep_ok
from vlmhub.scheduling import policy, scheduler, step
from vlmhub.scheduling.policy import PRIORITIES, Params, Priority, Waiter, params_from
from vlmhub.scheduling.scheduler import State
from vlmhub.scheduling.simtrace import Clients, Draw, Stream, Trace, draw
from vlmhub.sizing.parallel import ranks
from vlmhub.sizing.sleepfacts import wake_price_s

Step = tuple[Literal["delay"], float] | tuple[Literal["idle"], "_Rep"]
Op = Generator[Step, bool, object]
WORK = frozenset({"arrive", "done", "client", "stream"})
"""Events that keep the run going; timers (tick, queue and drain timeouts, operation steps)
matter only while something waits or an operation runs (:meth:`Simulation._busy`)."""
HORIZON_S = 30 * 86400.0
"""A trace still unfinished after 30 simulated days is a bug (or a policy that starves)."""


class SimulationStuck(RuntimeError):
    pass


@dataclass(frozen=True)
class SimModel:
    """One configured model as the simulation sees it."""

    name: str
    footprint_gib: float
    start_s: float
    """How long a cold start takes here."""
    reload_cost_s: float | None = None
    """What the policy assumes before the first measured start (the spec's); None: start_s."""
    sleep_gib: float = 1.25
    can_sleep: bool = False
    pinned: bool = False
    external: bool = False
    ttl: float | None = None
    priority: Priority = "interactive"
    max_queue: int = 32
    preload: bool = False
    fails: int = 0
    """Its first ``fails`` starts fail (a crash during start-up, after ``start_s``)."""
    host_gib: float = 0.0
    """The host RAM a level-1 sleep of it takes (its weights)."""
    replicas: tuple[int, int, float | None] = (0, 1, None)
    """``(low, high, target)`` (:func:`vlmhub.scheduling.step.bounds`): several engines."""
    devices: int = 1
    """The GPUs one engine spans (``tensor_parallel_size``), ``footprint_gib`` on each."""


@dataclass(frozen=True)
class SimConfig:
    models: tuple[SimModel, ...]
    usable_gib: float
    params: Params = field(default_factory=Params)
    wake_s: float | None = None
    """A wake from a level-1 sleep; None: each model's by the supervisor's rule
    (:func:`vlmhub.sizing.sleepfacts.wake_price_s`: a share of its cold start, capped)."""
    sleep_s: float = 1.0
    stop_s: float = 2.0
    tick_s: float = 0.5
    wake2_s: float | None = None
    """A wake from a level-2 sleep (the weights are loaded again, from the page cache); None:
    by the same rule."""
    host_gib: float = math.inf
    """The host RAM level-1 sleepers may fill (``host.total_gib`` less ``host.reserve_gib``)."""
    rtt_s: float = 0.02
    """A closed-loop client's round trip: from an answer's release (the router's last byte) to
    its next request reaching the router. Live, the resident models are idle for this long
    between a client's requests, and the policy sees it (policy ``busy_grace_s``)."""
    queue_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    gpus: int = 1
    """Identical GPUs of ``usable_gib`` each (nodes ``gpu0``, ``gpu1``...; one GPU: ``""``)."""
    restart_backoff_s: float = 2.0
    crash_loop_max: int = 3
    crash_loop_window_s: float = 300.0

    @property
    def nodes(self) -> dict[str, float]:
        """GPU node -> usable GiB, as the supervisor's ``nodes``."""
        if self.gpus == 1:
            return {"": self.usable_gib}
        return {f"gpu{i}": self.usable_gib for i in range(self.gpus)}

    @property
    def rules(self) -> step.Rules:
        return step.Rules(self.params, self.crash_loop_max, self.crash_loop_window_s,
                          self.restart_backoff_s)


@dataclass(frozen=True)
class ClassStats:
    """Queueing delay (arrival to lease) of one priority class's served requests."""

    served: int = 0
    total_wait_s: float = 0.0
    p50_s: float = 0.0
    p95_s: float = 0.0
    max_s: float = 0.0
    over_max_wait: int = 0
    """Served (or timed out in the queue) later than their model's max_wait_s for this class
    (:func:`vlmhub.policy.max_wait`, from the reload costs known at that moment)."""


@dataclass(frozen=True)
class SimResult:
    policy: str
    trace: str
    requests: int
    served: int
    loads: int
    wakes: int
    evictions: int
    """Victims put to sleep or stopped to make room (ttl expiries are ``expired``)."""
    sleeps: int
    expired: int
    loading_s: float
    """Simulated seconds during which a start or a wake was running (one at a time)."""
    makespan_s: float
    refused: dict[str, int]
    """Requests not served, by cause: ``queue_full``, ``refused`` (503), ``timeout`` (504)."""
    waits: dict[str, ClassStats]
    worst_wait_ratio: float
    """The largest wait / max_wait_s of any request served or timed out (above 1: a bound was
    overrun)."""
    gpus: int = 1
    sleeps2: int = 0
    """Of ``sleeps``, those at level 2 (nothing kept in host RAM)."""
    host_peak_gib: float = 0.0
    """The most host RAM level-1 sleepers held at once."""

    @property
    def loading_fraction(self) -> float:
        """The share of the GPUs' time (makespan x gpus) spent loading."""
        gpu_s = self.makespan_s * self.gpus
        return self.loading_s / gpu_s if gpu_s > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Served requests per simulated second, first arrival to last answer."""
        return self.served / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def over_max_wait(self) -> int:
        return sum(s.over_max_wait for s in self.waits.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "trace": self.trace, "gpus": self.gpus,
            "requests": self.requests,
            "served": self.served, "loads": self.loads, "wakes": self.wakes,
            "evictions": self.evictions, "sleeps": self.sleeps, "sleeps_level2": self.sleeps2,
            "host_peak_gib": round(self.host_peak_gib, 3), "expired": self.expired,
            "loading_s": round(self.loading_s, 3), "makespan_s": round(self.makespan_s, 3),
            "loading_fraction": round(self.loading_fraction, 4),
            "throughput_rps": round(self.throughput, 4), "refused": dict(self.refused),
            "over_max_wait": self.over_max_wait,
            "worst_wait_ratio": round(self.worst_wait_ratio, 3),
            "waits": {k: {f: round(v, 3) if isinstance(v, float) else v
                          for f, v in s.__dict__.items()} for k, s in self.waits.items()},
        }


@dataclass(eq=False)
class _Req:
    model: str
    arrived: float
    duration: float
    priority: Priority
    after: tuple[int, float] | None = None
    """A closed-loop request: (its group, the think time before the client's next)."""
    leased: float | None = None
    ended: float | None = None
    """When it stopped waiting: leased, or timed out in the queue."""
    outcome: str = "queued"
    bound: float = math.inf
    rep: str = ""
    """The replica that served it."""


@dataclass(eq=False)
class _Rep:
    m: SimModel
    state: State = "stopped"
    in_flight: int = 0
    waiters: deque[_Req] = field(default_factory=deque)
    last_used: float = 0.0
    last_load_s: float | None = None
    loaded_at: float = 0.0
    draining: bool = False
    priority: str = "interactive"
    wanted: bool = False
    node: str = ""
    failures: list[float] = field(default_factory=list)
    starts: int = 0
    wake: tuple[float, float] = (2.0, 6.0)
    """Its wake costs: from a level-1 and a level-2 sleep."""
    level: scheduler.SleepLevel = 1

    def entry(self, pooled: bool) -> step.Entry:
        """What the control-loop step knows of this replica (as the supervisor's ``_entry``;
        ``pooled``: the queue is its model's :class:`~vlmhub.scheduling.step.Pool`)."""
        return step.Entry(
            self.view(), self.node, () if pooled else tuple(
                Waiter(q.arrived, q.priority) for q in self.waiters),
            self.wanted and not pooled, tuple(self.failures), self.m.ttl,
        )

    def view(self) -> scheduler.ReplicaView:
        m = self.m
        return scheduler.ReplicaView(
            name=m.name, state=self.state, footprint_gib=m.footprint_gib,
            sleep_gib=m.sleep_gib, in_flight=self.in_flight, pinned=m.pinned,
            last_used=self.last_used,
            reload_cost_s=self.last_load_s or (m.reload_cost_s or m.start_s),
            can_sleep=m.can_sleep, external=m.external, draining=self.draining,
            loaded_at=self.loaded_at, priority=self.priority, wake_s=self.wake[0],
            wake2_s=self.wake[1], host_gib=m.host_gib, level=self.level, devices=m.devices,
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; 0 for none."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(math.ceil(q * len(s)) - 1, 0)]


@dataclass(eq=False)
class _Slot:
    """One GPU node's running engine operation."""

    op: Op
    target: str | None
    """The model it brings in (None: a ttl stop)."""
    token: int = 0
    """Its latest timer: an older one that fires is stale."""
    idle_wait: _Rep | None = None
    """The victim whose drain it waits for."""


class Simulation:
    """One run: a trace against a config under one policy. Call :meth:`run` once."""

    def __init__(self, config: SimConfig, trace: Trace) -> None:
        self.c, self.trace, self.now = config, trace, 0.0
        self.groups: dict[str, list[_Rep]] = {}
        """Model -> its replicas (control.group): one queue (a deque they share)."""
        for m in config.models:
            high, queue = m.replicas[1], deque[_Req]()
            names = [m.name] if high == 1 else [f"{m.name}#{i}" for i in range(1, high + 1)]
            wake = (config.wake_s, config.wake2_s)
            cold = m.reload_cost_s or m.start_s
            costs = (wake_price_s(1, cold, wake[0]), wake_price_s(2, cold, wake[1]))
            self.groups[m.name] = [_Rep(replace(m, name=n), waiters=queue, wake=costs)
                                   for n in names]
        self.reps = {r.m.name: r for g in self.groups.values() for r in g}
        for r in self.reps.values():
            if r.m.external:
                r.state = "ready"
            r.wanted = r.m.preload and not r.m.external
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = self._pending = 0
        self._ops: dict[str, _Slot] = {}
        self._op_token = 0
        self._next_tick = 0.0
        self.reqs: list[_Req] = []
        self._group_next = [0] * len(trace.clients)
        self._group_left = [len(g.draws) for g in trace.clients]
        self._rngs = [s.arrivals() for s in trace.streams]
        self.loads = self.wakes = self.evictions = self.sleeps = self.expired = 0
        self.sleeps2 = 0
        self.host_peak = 0.0
        self.loading_s = 0.0
        self.last_done = 0.0
        self.timeline: list[tuple[float, str]] = []
        """What the loop and its operations did, in order: (time, "start b, evicting a (stop)"),
        (time, "a stopped"), (time, "b ready"), ..."""

    # -- the event queue -------------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload: Any = None) -> None:
        self._seq += 1
        if kind in WORK:
            self._pending += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def run(self) -> SimResult:
        for r in self.trace.requests:
            q = _Req(r.model, r.t, r.duration, self._klass(r.model, r.priority))
            self._at(r.t, "arrive", q)
        for gi, g in enumerate(self.trace.clients):
            for _ in range(min(g.clients, len(g.draws))):
                self._at(g.start, "client", gi)
        for si, s in enumerate(self.trace.streams):
            self._at(s.start + draw(self._rngs[si], s.every), "stream", si)
        self._reconcile()
        while self._heap and (self._pending or self._busy()):
            t = self._heap[0][0]
            if t > HORIZON_S:
                raise SimulationStuck(f"{self.trace.name}: requests still waiting after "
                                      f"{HORIZON_S / 86400:.0f} simulated days")
            self.now = t
            acted = False
            while self._heap and self._heap[0][0] == t:
                _, _, kind, payload = heapq.heappop(self._heap)
                if kind == "tick":  # only the latest tick counts: a pass resets the timer
                    acted = acted or t == self._next_tick
                    continue
                if kind == "recheck":  # the policy asked for a pass now (Decision.recheck_at)
                    acted = True
                    continue
                self._pending -= kind in WORK
                acted = True
                self._handle(kind, payload)
            if not acted:
                continue
            self._reconcile()
            self._next_tick = self.now + self.c.tick_s
            self._at(self._next_tick, "tick")
        return self._result()

    def _busy(self) -> bool:
        return bool(self._ops) or any(r.waiters or r.wanted for r in self.reps.values())

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "arrive":
            self._acquire(payload)
        elif kind == "done":
            self._release(payload)
        elif kind == "client":
            self._client(payload)
        elif kind == "stream":
            self._stream(payload)
        elif kind == "qtimeout":
            self._queue_timeout(payload)
        elif kind in ("op", "drain"):
            node, token = payload
            s = self._ops.get(node)
            if s is None or s.token != token:
                return
            if kind == "op":
                self._advance(node, True)
            elif s.idle_wait is not None:
                s.idle_wait = None
                self._advance(node, False)

    # -- workload --------------------------------------------------------------------------------
    def _klass(self, model: str, priority: Priority | None) -> Priority:
        return priority or self.groups[model][0].m.priority

    def _client(self, gi: int) -> None:
        g: Clients = self.trace.clients[gi]
        k = self._group_next[gi]
        if k >= len(g.draws):
            return
        self._group_next[gi] += 1
        d: Draw = g.draws[k]
        self._acquire(_Req(d.model, self.now, d.duration, self._klass(d.model, g.priority),
                           after=(gi, d.think)))

    def _stream(self, si: int) -> None:
        s: Stream = self.trace.streams[si]
        done = all(left == 0 for left in self._group_left)
        if (s.until == "clients" and done) or (s.until != "clients" and self.now > s.until):
            return
        rng = self._rngs[si]
        model = rng.choice(s.models)
        self._acquire(_Req(model, self.now, draw(rng, s.duration), self._klass(model, s.priority)))
        self._at(self.now + draw(rng, s.every), "stream", si)

    def _finished(self, q: _Req, outcome: str) -> None:
        q.outcome = outcome
        if q.after is not None:
            gi, think = q.after
            self._group_left[gi] -= 1
            self._at(self.now + think + self.c.rtt_s, "client", gi)

    # -- the supervisor's side -------------------------------------------------------------------
    def _acquire(self, q: _Req) -> None:
        self.reqs.append(q)
        r, ready = self.groups[q.model][0], self._pick(q.model)
        if ready is not None and not r.waiters:
            self._lease(ready, q)
        elif len(r.waiters) >= r.m.max_queue:
            self._finished(q, "queue_full")
        else:
            r.waiters.append(q)
            self._at(self.now + self.c.queue_timeout_s, "qtimeout", q)

    def _pick(self, model: str) -> _Rep | None:
        """Group.pick: the ready replica with the fewest in flight, then least recently used."""
        ready = [r for r in self.groups[model] if r.state == "ready" and not r.draining]
        return min(ready, key=lambda r: (r.in_flight, r.last_used), default=None)

    def _queue_timeout(self, q: _Req) -> None:
        r = self.groups[q.model][0]
        if q.outcome == "queued" and q in r.waiters:
            r.waiters.remove(q)
            q.bound = policy.max_wait(r.view(), self._views(), q.priority, self.c.params)
            q.ended = self.now
            self._finished(q, "timeout")

    def _views(self) -> list[scheduler.ReplicaView]:
        return [x.view() for x in self.reps.values()]

    def _lease(self, r: _Rep, q: _Req) -> None:
        q.bound = policy.max_wait(r.view(), self._views(), q.priority, self.c.params)
        r.in_flight += 1
        r.priority = q.priority
        r.last_used = q.leased = q.ended = self.now
        q.outcome, q.rep = "leased", r.m.name
        self._at(self.now + q.duration, "done", q)

    def _release(self, q: _Req) -> None:
        r = self.reps[q.rep]
        r.in_flight -= 1
        r.last_used = self.last_done = self.now
        self._finished(q, "served")
        for node, s in list(self._ops.items()):
            if r.in_flight == 0 and s.idle_wait is r:
                s.idle_wait = None
                self._advance(node, True)  # the drain timeout is moot (a new token)

    def _fail_waiters(self, r: _Rep, outcome: str) -> None:
        """Fail ``r``'s queue, unless another replica of its model is up (it gets the queue)."""
        if any(x is not r and x.state in ("ready", "starting")
               for x in self.groups[r.m.name.split("#")[0]]):
            return
        while r.waiters:
            self._finished(r.waiters.popleft(), outcome)
        r.wanted = False

    def _reconcile(self) -> None:
        """Supervisor._reconcile: lease the ready queues, then carry out the shared step."""
        now = self.now
        pools = []
        for name, g in self.groups.items():
            while g[0].waiters and (r := self._pick(name)) is not None:
                self._lease(r, g[0].waiters.popleft())
            if self._pick(name) is not None:
                for r in g:
                    r.wanted = False
            low, high, target = g[0].m.replicas
            if len(g) > 1 or target is not None:
                pools.append(step.Pool(
                    tuple(r.m.name for r in g),
                    tuple(Waiter(q.arrived, q.priority) for q in g[0].waiters),
                    any(r.wanted for r in g), low, high, target))
        pooled = {n for p in pools for n in p.members}
        busy = {node: s.target for node, s in self._ops.items()}
        out = step.decide([r.entry(r.m.name in pooled) for r in self.reps.values()],
                          self.c.nodes, now, self.c.rules, busy, self.c.host_gib, pools)
        if out.recheck_at is not None and out.recheck_at > now:
            self._at(out.recheck_at, "recheck")
        for a in out.actions:
            self._act(a)

    def _act(self, a: step.Action) -> None:
        """Carry out one action of the step (as Supervisor._act, in simulated time)."""
        on = f" on {a.node}" if isinstance(a, (step.Run, step.Expire)) and a.node else ""
        if isinstance(a, (step.Refuse, step.CrashLoop)):
            self._fail_waiters(self.reps[a.name], "refused")
        elif isinstance(a, step.Run):
            p, r = a.plan, self.reps[a.plan.target]
            evicting = ", ".join(f"{e.name} ({e.mode})" for e in p.evict)
            self._log(f"{p.action} {p.target}{on}" + (f", evicting {evicting}" if evicting else ""))
            r.node = a.node
            self._begin(a.node, self._execute(r, p), p.target)
        elif isinstance(a, step.Expire):
            self.expired += 1
            self._log(f"ttl: stop {a.name}{on}")
            ev = scheduler.Evict(a.name, "stop")
            self._begin(a.node, self._evict(self.reps[a.name], ev, count=False), None)
        elif not isinstance(a, step.Defer):  # engines fail only while starting here
            raise AssertionError(f"not simulated: {a}")

    # -- the engine operations (engine_ops.py, in simulated time), one per GPU node ------------
    def _log(self, what: str) -> None:
        self.timeline.append((self.now, what))

    def _begin(self, node: str, op: Op, target: str | None) -> None:
        self._ops[node] = _Slot(op, target)
        self._advance(node, None)

    def _advance(self, node: str, value: bool | None) -> None:
        """Run ``node``'s operation to its next wait: ``value`` answers the wait it was in
        (True: the victim is idle or the delay passed; False: the drain timed out)."""
        s = self._ops[node]
        try:
            nxt = s.op.send(value)  # type: ignore[arg-type]  # None only to start it
        except StopIteration:
            del self._ops[node]
            return
        self._op_token += 1
        s.token = self._op_token
        if nxt[0] == "delay":
            self._at(self.now + nxt[1], "op", (node, s.token))
        elif nxt[1].in_flight == 0:
            self._advance(node, True)
        else:
            s.idle_wait = nxt[1]
            self._at(self.now + self.c.drain_timeout_s, "drain", (node, s.token))

    def _execute(self, r: _Rep, p: scheduler.Plan) -> Generator[Step, bool, None]:
        for ev in p.evict:
            ok = yield from self._evict(self.reps[ev.name], ev)
            if not ok:  # the victim stayed busy: the target's requests get 503
                self._log(f"{ev.name} still busy after drain_timeout_s: {r.m.name} refused")
                self._fail_waiters(r, "refused")
                return
        r.state = "starting"
        began = self.now
        if p.action == "wake":
            yield ("delay", r.wake[r.level - 1])
            self.wakes += 1
            r.level = 1
        else:
            yield ("delay", r.m.start_s)
            r.starts += 1
            if r.starts <= r.m.fails:  # engine_ops.start_failed: failed, waiters get the error
                self.loading_s += self.now - began
                r.state = "failed"
                r.failures.append(self.now)
                self._log(f"{r.m.name} failed")
                self._fail_waiters(r, "refused")
                return
            r.last_load_s = r.m.start_s
            self.loads += 1
        self.loading_s += self.now - began
        r.state, r.last_used, r.loaded_at = "ready", self.now, self.now
        self._log(f"{r.m.name} ready")

    def _evict(self, v: _Rep, ev: scheduler.Evict, count: bool = True) -> Generator[
        Step, bool, bool
    ]:
        v.draining = True
        try:
            if v.in_flight and not (yield ("idle", v)):
                return False
            if ev.mode == "sleep" and v.state == "ready":
                yield ("delay", self.c.sleep_s)
                v.state, v.level = "sleeping", ev.level
                self.sleeps += 1
                self.sleeps2 += ev.level == 2
                held = sum(x.view().host_held_gib for x in self.reps.values())
                self.host_peak = max(self.host_peak, held)
            else:
                v.state, v.level = "stopping", 1
                yield ("delay", self.c.stop_s)
                v.state = "stopped"
            level = f" (level {v.level})" if v.state == "sleeping" else ""
            self._log(f"{v.m.name} {v.state}{level}")
            self.evictions += count
            return True
        finally:
            v.draining = False

    # -- the report ------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        waits: dict[str, ClassStats] = {}
        for klass in PRIORITIES:
            mine = [q for q in self.reqs if q.priority == klass]
            if not mine:
                continue
            w = [q.leased - q.arrived for q in mine if q.leased is not None]
            over = sum(1 for q in mine
                       if q.ended is not None and q.ended - q.arrived > q.bound + 1e-9)
            waits[klass] = ClassStats(len(w), sum(w), percentile(w, 0.5), percentile(w, 0.95),
                                      max(w, default=0.0), over)
        worst = max(((q.ended - q.arrived) / q.bound for q in self.reqs if q.ended is not None),
                    default=0.0)
        refused = {k: sum(1 for q in self.reqs if q.outcome == k)
                   for k in ("queue_full", "refused", "timeout")}
        first = min((q.arrived for q in self.reqs), default=0.0)
        return SimResult(
            policy=self.c.params.name, trace=self.trace.name, requests=len(self.reqs),
            served=sum(1 for q in self.reqs if q.outcome == "served"), loads=self.loads,
            wakes=self.wakes, evictions=self.evictions, sleeps=self.sleeps,
            expired=self.expired, loading_s=self.loading_s,
            makespan_s=max(self.last_done - first, 0.0), refused=refused, waits=waits,
            worst_wait_ratio=worst, gpus=self.c.gpus, sleeps2=self.sleeps2,
            host_peak_gib=self.host_peak,
        )


def from_config(
    models: Sequence[ResolvedModel],
    config: Config,
    usable_gib: float,
    *,
    start_s: float | None = None,
    wake_s: float | None = None,
    sleep_s: float = 1.0,
    stop_s: float = 2.0,
    rtt_s: float = 0.02,
    gpus: int = 1,
    wake2_s: float | None = None,
    host_gib: float = math.inf,
) -> SimConfig:
    """The simulation of a resolved models.yaml: footprints from the budgets, a cold start's
    cost from the spec's ``reload_cost_s`` (or ``start_s`` for every model), sleep where the
    supervisor would use it (``sleep: true`` and a vLLM that has it), the router's queue
    settings, and the swap policy's parameters as the supervisor derives them."""
    out: list[SimModel] = []
    for m in models:
        prior = m.spec.reload_cost_s if m.spec is not None else 1.0
        out.append(SimModel(
            name=m.name,
            footprint_gib=m.budget.footprint_gib if m.budget else 0.0,
            start_s=prior if start_s is None else start_s,
            reload_cost_s=prior,
            sleep_gib=m.budget.sleep_residual_gib if m.budget else 0.0,
            can_sleep=sleep_ok(m),
            pinned=m.entry.pinned,
            external=m.external,
            ttl=m.entry.ttl,
            priority=m.entry.priority,
            max_queue=m.entry.max_queue if m.entry.max_queue is not None
            else config.router.max_queue,
            preload=m.entry.preload,
            host_gib=m.budget.weights_gib * ranks(m.spec) if m.budget and m.spec else 0.0,
            replicas=step.bounds(m.entry.replicas),
            devices=ranks(m.spec) if m.spec is not None else 1,
        ))
    rc = config.router
    return SimConfig(
        models=tuple(out), usable_gib=usable_gib, params=params_from(config, models),
        wake_s=wake_s, sleep_s=sleep_s, stop_s=stop_s, rtt_s=rtt_s, wake2_s=wake2_s,
        host_gib=host_gib,
        queue_timeout_s=rc.queue_timeout_s, drain_timeout_s=rc.drain_timeout_s, gpus=gpus,
        restart_backoff_s=rc.restart_backoff_s, crash_loop_max=rc.crash_loop_max,
        crash_loop_window_s=rc.crash_loop_window_s,
    )


def simulate(
    config: SimConfig, trace: Trace, policy_name: policy.PolicyName | None = None
) -> SimResult:
    """Run ``trace`` against ``config`` (under ``policy_name``, else config.params.name)."""
    if policy_name is not None:
        config = replace(config, params=replace(config.params, name=policy_name))
    return Simulation(config, trace).run()
