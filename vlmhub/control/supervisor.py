"""The supervisor: one replica state machine per engine, driven by ONE asyncio control loop.

A model has one replica, or several (``replicas`` in models.yaml), grouped with the model's
queue in a :class:`~vlmhub.control.group.Group`. Requests call :meth:`Supervisor.acquire`. A
ready replica (the one with fewest requests in flight) hands out a lease at once; otherwise the
request waits in the model's bounded queue and the control loop is woken. Only the loop
decides to start, wake, sleep or stop an engine: it asks the pure :mod:`vlmhub.scheduling.placement`
(the per-GPU scheduling.scheduler and scheduling.policy) for a plan and runs at most ONE
engine operation at a time per GPU node (vLLM instances must not profile concurrently on one
GPU); with one GPU that is one operation at all. Every state transition happens synchronously
inside the loop or inside an operation task (which touches only replicas on its node), so
concurrent requests cannot race a start.

States: stopped -> starting -> ready -> (sleeping) -> stopping -> stopped, and failed.
Concurrency: all methods run on the event loop; ``acquire`` awaits; the rest never block.

Health checks only observe (:mod:`vlmhub.control.liveness`, which also watches a Ray cluster's
nodes). When one finds an engine dead or hung (or its node gone), it changes the replica
synchronously (``ready`` -> ``stopping``), revokes every lease out on that engine (its clients
get an error at once, and no new lease is granted), and leaves the stop to the control loop,
which runs it as that node's one operation like any other. The operations themselves live in
:mod:`vlmhub.control.engine_ops`; each stops only the engine handle it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx

from vlmhub.config.schema import Config, ResolvedModel
from vlmhub.control.adoption import adopt_engines, finish_loading
from vlmhub.control.contract import (
    AcquireError,
    Lease,
    LoadFailed,
    LoadTimeout,
    NullObserver,
    Observer,
    QueueFull,
    Refused,
    ReplicaInfo,
    UnknownModel,
)
from vlmhub.control.engine_ops import EngineOps, StartHook, UsedProbe, log_exception
from vlmhub.control.group import Group, grouped, new_members
from vlmhub.control.liveness import Liveness, watched
from vlmhub.control.reload import ModelDiff, apply_models
from vlmhub.control.replica import Queued, Replica
from vlmhub.engines.base import EngineHandle, Runtime
from vlmhub.logs import ROUTER
from vlmhub.scheduling import placement, policy, scheduler, step
from vlmhub.sizing.budgets import BudgetStore
from vlmhub.sizing.vram import Gpu

DECISIONS = logging.getLogger("vlmhub.scheduling.policy")
"""At debug level: every swap-policy decision with its inputs (vlmhub.policy.describe)."""


class Supervisor:
    """Owns every replica and the one loop that changes them. See the module docstring."""

    def __init__(
        self,
        models: Sequence[ResolvedModel],
        config: Config,
        gpu: Gpu,
        runtime: Runtime,
        *,
        observer: Observer | None = None,
        tick_s: float = 0.5,
        on_start: StartHook | None = None,
        budgets: BudgetStore | None = None,
        gpu_used: UsedProbe | None = None,
    ) -> None:
        self.config, self.gpu, self.runtime = config, gpu, runtime
        self.rc = config.router
        self.observer: Observer = observer or NullObserver()
        self.replicas: dict[str, Replica] = {r.name: r for m in models for r in new_members(m)}
        self.groups: dict[str, Group] = grouped(self.replicas)
        self._aliases = {a: m.name for m in models for a in (m.name, *m.aliases)}
        self._kick = asyncio.Event()
        self._ops: dict[str, asyncio.Task[Any]] = {}
        """The engine operation running on each GPU node (``""``: the only GPU)."""
        self._targets: dict[str, str] = {}
        """Node -> the model its running operation brings in (planned nowhere else meanwhile)."""
        self.nodes: dict[str, float] = {"": gpu.usable_gib}
        """Live GPU nodes -> usable GiB (a Ray cluster's, refreshed by liveness)."""
        self.liveness = Liveness(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._tick_s = tick_s
        self._recheck_at: float | None = None
        """The policy asked to decide again at this time (a short grace ends before a tick)."""
        self.http = httpx.AsyncClient(timeout=10.0, trust_env=False)  # engines: never a proxy
        self.budgets = budgets
        """Where engine starts record what they measured (vlmhub.sizing.budgets); None: nowhere."""
        self.ops = EngineOps(
            config, gpu, runtime, self.http, self.observer,
            fail_waiters=self._fail_waiters, on_start=on_start, budgets=budgets,
            gpu_used=gpu_used,
        )
        self._closing = False
        self.params = policy.params_from(config, models)
        self.host_gib = config.host.budget_gib()
        """The host RAM level-1 sleepers may fill (models.yaml ``host:``; read at start)."""
        self.foreign: list[EngineHandle] = []
        """Engines of models not in this config, found running at start: not managed."""

    # -- the router's side (SupervisorLike) ---------------------------------------------------
    def resolve(self, name: str) -> str | None:
        return self._aliases.get(name)

    def names(self) -> list[str]:
        return list(self.groups)

    async def acquire(self, name: str, priority: str | None = None) -> Lease:
        """Wait in the model's queue until it is ready; raise an AcquireError otherwise.

        ``priority`` (``interactive``/``batch``; None: the model's ``priority``) is what the
        swap policy weighs when several queues need a swap (vlmhub.scheduling.policy).
        """
        g = self._get(name)
        if self._closing:
            raise AcquireError("the router is shutting down", retry_after=5)
        m, r = g.model, g.members[0]
        klass = priority or m.entry.priority
        if g.leases_at_once and (ready := g.pick()) is not None:
            return self._lease(ready, klass)
        limit = m.entry.max_queue if m.entry.max_queue is not None else self.rc.max_queue
        if len(g.waiters) >= limit:
            raise QueueFull(
                f"{g.name} has {len(g.waiters)} requests queued (max_queue {limit}); retry "
                "later", retry_after=max(5.0, (r.last_load_s or 30.0) / 2),
            )
        if m.external and r.state == "failed":
            raise LoadFailed(f"{g.name} at {m.entry.url} is unreachable: {r.last_error}")
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        entry = Queued(fut, time.monotonic(), klass)
        g.waiters.append(entry)
        self.kick()
        try:
            done, _ = await asyncio.wait({fut}, timeout=self.rc.queue_timeout_s)
        except asyncio.CancelledError:  # the client left while queued: leak no lease
            self._abandon(g, entry)
            raise
        if fut in done:
            return fut.result()
        self._abandon(g, entry)
        i = g.info(self.runtime.kind)
        raise LoadTimeout(
            f"{g.name} was not ready after {self.rc.queue_timeout_s:.0f} s in the queue "
            f"(state {i.state}, phase {i.phase or '-'})"
            + (f"; last error: {i.last_error}" if i.last_error else "")
        )

    def would_wait(self, name: str) -> bool:
        g = self.groups.get(name)
        if g is None or g.model.external:  # an external endpoint never loads here
            return False
        return not g.leases_at_once

    def _abandon(self, g: Group, entry: Queued) -> None:
        """Take a waiter out of the queue; a lease it was handed meanwhile goes back."""
        fut = entry.fut
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(fut.result())
        fut.cancel()
        with contextlib.suppress(ValueError):
            g.waiters.remove(entry)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        r = self.replicas.get(lease.replica or lease.model)
        if r is None:  # a reload removed the model while this request ran
            return
        r.leases.pop(id(lease), None)
        r.in_flight = max(r.in_flight - 1, 0)
        r.last_used = time.monotonic()
        if r.in_flight == 0:
            r.idle.set()
        # A pass decides again only if this release can change a decision: a queue to grant, a
        # replica gone idle (evictable, drainable), not plainly ready, or one of a pool (its
        # work per replica steers autoscaling). A release among busy requests of a lone
        # replica with nobody queued changes nothing (ttl expiries have their own timer), and a
        # pass per request cost ~2 % of a proxied request (py-spy).
        g = self.groups.get(lease.model)
        if (r.in_flight == 0 or r.state != "ready" or r.retire or g is None or g.pooled
                or any(x.waiters for x in self.groups.values())):
            self.kick()

    def report_failure(self, lease: Lease, reason: str) -> None:
        r = self.replicas.get(lease.replica or lease.model)
        if r is None or r.model.external or r.state != "ready" or r.handle is None:
            return
        if r.handle.base_url != lease.base_url:
            return  # the lease was on an engine that is already gone
        self._spawn(self.liveness.check(r, hint=reason))

    def snapshot(self) -> list[ReplicaInfo]:
        return [g.info(self.runtime.kind) for g in self.groups.values()]

    async def load(self, name: str) -> ReplicaInfo:
        """Admin: start a model now and wait until it is ready or failed. Resets a crash loop.
        An external endpoint is checked now, for ``queue_timeout_s`` at most."""
        g = self._get(name)
        for r in g.members:
            r.failures.clear()
        if g.model.external:
            await self.liveness.check_external_now(g.members[0], self.rc.queue_timeout_s)
        elif g.pick() is None:
            fut = self._want(g)
            self.kick()
            with contextlib.suppress(AcquireError):
                await fut
        return g.info(self.runtime.kind)

    async def unload(self, name: str) -> ReplicaInfo:
        """Admin: drain then stop a model, each replica in turn (waits for any running
        operation on its node first)."""
        g = self._get(name)
        for r in g.members:
            await self._unload(r)
        self.kick()
        return g.info(self.runtime.kind)

    async def _unload(self, r: Replica) -> None:
        while ops := self._sharing(r.node):  # every operation on one of its cards
            await asyncio.wait(ops)
        if not r.model.external and r.state in ("ready", "sleeping"):
            why = "unloaded by the admin API"
            await asyncio.wait({self._launch(r.node, self._evict(
                r, scheduler.Evict(r.name, "stop"), why))})
        elif r.state == "failed" and r.handle is not None:
            await asyncio.wait({self._launch(r.node, self.ops.stop_failed(r))})

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt matching engines left running, stop stale ones, preload, start the loops."""
        multi = await self.liveness.refresh_nodes()
        await self._adopt()
        for g in self.groups.values():
            if g.model.entry.preload and g.pick() is None:
                self._want(g)
        self._tasks = [watched(self._loop(), "the control loop"),
                       watched(self.liveness.health_loop(), "the health loop")]
        if multi:
            self._tasks.append(watched(self.liveness.node_loop(), "the node watch"))
        self.kick()

    async def shutdown(self, stop_engines: bool = True, timeout_s: float = 30.0) -> None:
        """Refuse new work, let running requests finish (up to ``timeout_s``), stop engines."""
        self._closing = True
        for g in self.groups.values():
            g.fail(AcquireError("the router is shutting down", retry_after=5))
        deadline = time.monotonic() + timeout_s
        for r in self.replicas.values():
            left = max(deadline - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.idle.wait(), left)
        for t in self._tasks:
            t.cancel()
        for op in list(self._ops.values()):
            op.cancel()
            with contextlib.suppress(BaseException):
                await op
        if stop_engines:
            for r in self.replicas.values():
                if r.handle is not None and not r.model.external:
                    await self.ops.stop_engine(r, r.handle, grace_s=20.0)
                    r.state = "stopped"
        await self.http.aclose()
        await self.runtime.close()

    def kick(self) -> None:
        self._kick.set()

    # -- the control loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            wait = self._tick_s
            if self._recheck_at is not None:
                wait = min(max(self._recheck_at - time.monotonic(), 0.0), wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            self._kick.clear()
            try:
                self._reconcile(time.monotonic())
            except Exception as exc:  # a bug here must not kill the loop silently
                log_exception(ROUTER, "the control loop's pass failed", exc)
                for r in self.replicas.values():
                    r.last_error = f"internal error: {exc!r}"

    def _reconcile(self, now: float) -> None:
        """One pass of the loop: lease the ready queues, then carry out what the pure
        :func:`vlmhub.scheduling.step.decide` says (the same step ``vlmhub simulate`` runs).
        Synchronous: no other coroutine runs while it decides. At most one operation per GPU
        node: a node whose operation runs is left alone."""
        for g in self.groups.values():
            g.grant(self._lease)
        for r in list(self.replicas.values()):
            if r.retire and (r.handle is None or r.model.external) and not self._busy(r.node):
                self._retired(r)  # a reload removed or changed it; it runs no engine to stop
        busy = {n: self._targets.get(n) for n in {*self.nodes, *self._ops} if self._busy(n)}
        entries = [self._entry(r, now) for r in self.replicas.values()]
        pools = [g.pool() for g in self.groups.values() if g.pooled]
        out = step.decide(entries, self.nodes, now, step.Rules(self.params, self.rc.crash_loop_max,
                          self.rc.crash_loop_window_s, self.rc.restart_backoff_s), busy,
                          pools=pools, host_gib=self.host_gib)
        self._recheck_at = out.recheck_at
        if DECISIONS.isEnabledFor(logging.DEBUG):
            for node, nd in out.decisions:
                DECISIONS.debug("decision", extra={"decision": {
                    **policy.describe([e.view for e in entries], out.demand, now, nd),
                    **({"node": node} if node else {})}})
        for r in self.replicas.values():
            r.waiting_reason = None if out.placed else r.waiting_reason
        for a in out.actions:
            self._act(a)

    def _entry(self, r: Replica, now: float) -> step.Entry:
        """What the step knows of ``r``; a failed replica forgets failures out of the window."""
        if r.state == "failed":
            r.failures = [t for t in r.failures if now - t < self.rc.crash_loop_window_s]
        g = self.groups[r.model.name]
        alone = None if g.pooled else g.pool()  # a pool's queue is its own (step.Pool)
        return step.Entry(
            r.view(), r.node, alone.waiters if alone else (), bool(alone and alone.wanted),
            tuple(r.failures), r.model.entry.ttl,
            r.retire is not None and r.handle is not None and not r.model.external,
        )

    def _act(self, a: step.Action) -> None:
        """Carry out one action of the step; an operation runs as its node's one operation."""
        r = self.replicas[a.plan.target if isinstance(a, step.Run) else a.name]
        if isinstance(a, step.StopFailed):  # a health check failed it: nobody else stops it
            self._launch(a.node, self._run(self.ops.stop_failed(r)))
        elif isinstance(a, step.Retire):
            self._launch(a.node, self._run(self._retire(r)))
        elif isinstance(a, step.CrashLoop):
            self._fail_waiters(r, LoadFailed(
                f"{r.name} is in a crash loop ({a.failures} failures in "
                f"{self.rc.crash_loop_window_s:.0f} s); last error: {r.last_error}. "
                f"Fix the cause, then POST /api/models/{r.name}/load", retry_after=a.retry_after))
        elif isinstance(a, step.Defer):
            r.waiting_reason = a.reason
        elif isinstance(a, step.Refuse):
            self._fail_waiters(r, Refused(a.reason, retry_after=30))
        elif isinstance(a, step.Run):
            r.node, self._targets[a.node] = a.node, r.name
            self._launch(a.node, self._run(self._execute(r, a.plan)))
        else:
            self._launch(a.node, self._run(self._evict(
                r, scheduler.Evict(r.name, "stop"), "idle past its ttl")))

    def _busy(self, node: str) -> bool:
        """Whether an engine operation runs on ``node`` now."""
        op = self._ops.get(node)
        return op is not None and not op.done()

    def _sharing(self, node: str) -> set[asyncio.Task[Any]]:
        """The running operations on any card of ``node`` (a tensor-parallel engine's node
        ``gpu0+gpu1`` shares cards with ``gpu0`` and ``gpu1``)."""
        return {op for n, op in self._ops.items()
                if not op.done() and not placement.free(node, [n])}

    def _launch(self, node: str, op: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``op`` as ``node``'s one engine operation (the caller checked it is free)."""
        task = self._ops[node] = watched(op, f"an engine operation{f' on {node}' if node else ''}")
        return task

    # -- operations: each runs as its node's one operation (engine_ops.py) ------------------
    async def _run(self, op: Coroutine[Any, Any, Any]) -> None:
        try:
            await op
        finally:
            self.kick()

    async def _execute(self, r: Replica, p: scheduler.Plan) -> None:
        for ev in p.evict:
            if not await self._evict(v := self.replicas[ev.name], ev, f"room for {r.name}"):
                if v.state == "stopping":  # its stop failed: retried, then r's turn again
                    return
                self._fail_waiters(
                    r,
                    Refused(
                        f"{ev.name} still had requests running after "
                        f"{self.rc.drain_timeout_s:.0f} s; {r.name} could not be given room"
                    ),
                    retry_after=10,
                )
                return
        if p.action == "wake" and await self.ops.wake(r):
            return
        taken = [x.handle.port for x in self.replicas.values() if x.handle is not None]
        await self.ops.start(r, taken, node=r.node)

    # -- reload ---------------------------------------------------------------------------------
    def reload(self, models: Sequence[ResolvedModel], config: Config) -> ModelDiff:
        """Apply a new config (vlmhub.control.reload). Synchronous: added models appear and removed
        ones disappear from routing at once; the stops they need (removed, or changed and
        running) drain and run as operations. Unchanged models keep serving untouched."""
        starting = {t for n, t in self._targets.items() if self._busy(n)}
        applied = apply_models(self.replicas, models, starting)
        for name in applied.diff.removed:
            self.groups[name].fail(UnknownModel(f"model {name!r} was removed from the config"))
        self.replicas = applied.replicas
        self.groups = grouped(self.replicas, self.groups)
        for name in dict.fromkeys(r.model.name for r in applied.preload):
            self._want(self.groups[name])
        self._aliases = {a: m.name for m in models for a in (m.name, *m.aliases)}
        self.config, self.rc = config, config.router
        self.ops.config, self.ops.rc = config, config.router
        self.host_gib = config.host.budget_gib()
        self.params = policy.params_from(config, models)
        self.kick()
        return applied.diff

    async def _retire(self, r: Replica) -> None:
        if await self.ops.evict(r, scheduler.Evict(r.name, "stop"), f"config {r.retire}"):
            self._retired(r)

    def _retired(self, r: Replica) -> None:
        if r.retire == "removed" and not r.in_flight:
            self.replicas.pop(r.name, None)
            self.groups = grouped(self.replicas, self.groups)
        elif r.retire == "changed":
            r.retire = None
            if r.model.entry.preload and (g := self.groups[r.model.name]).pick() is None:
                self._want(g)
            if r.state == "failed":
                r.state, r.failures = "stopped", []

    async def _evict(self, v: Replica, ev: scheduler.Evict, reason: str) -> bool:
        try:
            return await self.ops.evict(v, ev, reason)
        finally:
            self.kick()

    # -- helpers --------------------------------------------------------------------------------
    async def _adopt(self) -> None:
        """Take over engines a previous vlmhub left running (control.adoption); one still
        loading is waited for as its node's operation (ready, or failed and stopped)."""
        found = await adopt_engines(self.replicas, self.runtime, self.http, self.nodes)
        self.foreign = found.foreign
        for node, loading in found.loading.items():
            self._launch(node, self._run(finish_loading(self.ops, loading)))
            self._targets[node] = loading[0].name

    def _lease(self, r: Replica, priority: str = "interactive") -> Lease:
        r.in_flight += 1
        r.priority = priority
        r.idle.clear()
        r.last_used = time.monotonic()
        revoked = asyncio.get_running_loop().create_future()
        if r.model.external:
            base = (r.model.entry.url or "").rstrip("/")
            lease = Lease(r.model.name, base, r.model.api_name, external=True, revoked=revoked,
                          replica=r.name)
        else:
            assert r.handle is not None
            lease = Lease(r.model.name, r.handle.base_url, r.model.api_name, revoked=revoked,
                          api_key=r.handle.api_key, replica=r.name)  # its own key (engines.keys)
        r.leases[id(lease)] = lease
        return lease

    def _fail_waiters(
        self, r: Replica, err: AcquireError, retry_after: float | None = None
    ) -> None:
        """``r`` failed (or was refused) with ``err``: its model's queue fails, unless another
        of its replicas is up or being brought in (then the queue waits for that one)."""
        if retry_after is not None:
            err.retry_after = retry_after
        g = self.groups.get(r.model.name)
        bringing = {t for n, t in self._targets.items() if self._busy(n)}
        if g is not None and not g.others_up(r, bringing):
            g.fail(err)

    def _want(self, g: Group) -> asyncio.Future[None]:
        """Ask the loop to make ``g`` ready without a request (preload, admin load)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        g.wanted.append(fut)
        return fut

    def _get(self, name: str) -> Group:
        real = self.resolve(name)
        if real is None:
            raise UnknownModel(
                f"model {name!r} does not exist; available: {', '.join(self.groups)}"
            )
        return self.groups[real]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = watched(coro, "a health check")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)


policy_params = policy.params_from
"""The swap policy's parameters from a config (kept here for callers of the old name)."""
