"""Engine operations: start, stop, sleep, wake and evict one replica's engine.

These are the supervisor's hands. Each coroutine here is run ONLY as the one engine operation
of a GPU node (:attr:`Supervisor._ops`), never two at a time on one GPU, so vLLM instances never
profile concurrently on a GPU; an operation touches only replicas on its node, so two
operations never change the same replica. They block (asynchronously) on
the runtime and on the engine's HTTP API; while they wait, the control loop keeps granting
leases on ready replicas and queueing the rest.

The one rule every operation keeps: **a stop only touches the engine it was given.** An
operation captures the :class:`EngineHandle` it acts on, and clears ``replica.handle`` only if
that same handle is still there when the runtime returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

import httpx

from vlmhub.config.schema import Config, RouterConfig
from vlmhub.control.contract import AcquireError, LoadFailed, LoadTimeout, Observer
from vlmhub.control.replica import Replica
from vlmhub.engine_log import LogParser
from vlmhub.engines.base import EngineHandle, Runtime, probe, wait_ready
from vlmhub.engines.launch import launch_request
from vlmhub.engines.ports import pick_port
from vlmhub.errors import EngineStartError, EngineStartTimeout, RuntimeUnavailable, VlmhubError
from vlmhub.logs import ENGINE
from vlmhub.scheduling import scheduler
from vlmhub.sizing.vram import Gpu

StartHook = Callable[[Replica, "LogParser | None", "VlmhubError | None"], None]
"""Called after every start attempt with the parsed log (or None) and the error (or None)."""


HUNG_STOP_GRACE_S = 3.0
"""SIGTERM grace for an engine that stopped answering (the runtime kills a frozen one at once)."""


class EngineOps:
    """The engine operations of one supervisor. Not thread-safe; one operation at a time per
    GPU node (operations on different nodes interleave on the event loop)."""

    def __init__(
        self,
        config: Config,
        gpu: Gpu,
        runtime: Runtime,
        http: httpx.AsyncClient,
        observer: Observer,
        *,
        fail_waiters: Callable[[Replica, AcquireError], None],
        on_start: StartHook | None = None,
    ) -> None:
        self.config, self.gpu, self.runtime, self.http = config, gpu, runtime, http
        self.rc: RouterConfig = config.router
        self.observer = observer
        self._fail_waiters = fail_waiters
        self.on_start = on_start
        self._ports: set[int] = set()
        """Ports picked by starts still running: starts on other nodes must not pick them."""

    # -- stop -----------------------------------------------------------------------------------
    async def stop_engine(self, r: Replica, handle: EngineHandle, *, grace_s: float) -> None:
        """Stop ``handle`` (and nothing else); forget it on ``r`` only if it is still r's."""
        with contextlib.suppress(Exception):
            await self.runtime.stop(handle, timeout_s=grace_s)
        if r.handle is handle:
            r.handle = None

    async def stop_failed(self, r: Replica) -> None:
        """A health check failed ``r``'s engine (state ``stopping``): kill it, then ``failed``.

        The engine did not answer, so it gets a short grace (:data:`HUNG_STOP_GRACE_S`).
        """
        handle = r.handle
        if handle is not None:
            await self.stop_engine(r, handle, grace_s=HUNG_STOP_GRACE_S)
        if r.state == "stopping":
            r.state, r.phase = "failed", "failed"

    # -- start ----------------------------------------------------------------------------------
    async def start(self, r: Replica, taken_ports: list[int], *, node: str = "") -> None:
        """Start ``r``'s engine (see :meth:`_start`); the port it picked stays reserved for
        concurrent starts on other nodes until it ends."""
        port: list[int] = []
        try:
            await self._start(r, taken_ports, node, port)
        finally:
            self._ports.difference_update(port)

    async def _start(self, r: Replica, taken_ports: list[int], node: str, picked: list[int]
                     ) -> None:
        """Start ``r``'s engine (on GPU ``node``: a Ray node's name, ``""`` with one GPU) and
        wait until it answers; on failure ``r`` becomes failed and every waiter gets the parsed
        reason."""
        assert r.model.spec is not None
        if r.handle is not None:  # a failed or sleeping engine: clear it away first
            await self.stop_engine(r, r.handle, grace_s=HUNG_STOP_GRACE_S)
        r.state, r.phase, r.last_error = "starting", "starting", None
        began = time.monotonic()
        handle: EngineHandle | None = None
        parser = LogParser()  # read even when the start fails: a memory error's figures
        try:
            port, _ = pick_port(None, self.config.runtime.port_range,
                                [*taken_ports, *self._ports])
            self._ports.add(port)
            picked.append(port)
            req = replace(launch_request(
                r.model, self.gpu, self.runtime, self.config.runtime, port, sleep_mode=r.sleep_ok
            ), node=node, vram_gib=r.footprint)
            handle = r.handle = await self.runtime.start(req)
            ENGINE.info("%s: starting (%s%s, port %d, budget %.2f GiB)", r.name,
                        self.runtime.kind, f" on node {node}" if node else "", port, r.footprint,
                        extra={"model": r.name, "event": "start", "port": port})

            def on_phase(phase: str, _line: str) -> None:
                if phase != r.phase:
                    ENGINE.info("%s: %s", r.name, phase,
                                extra={"model": r.name, "event": "phase", "phase": phase})
                r.phase = phase

            await wait_ready(
                self.runtime, handle, timeout_s=r.model.spec.startup_timeout_s,
                on_phase=on_phase, parser=parser,
            )
        except (VlmhubError, OSError) as exc:
            err = exc if isinstance(exc, VlmhubError) else None
            if self.on_start is not None:
                self.on_start(r, parser, err)
            timeout = isinstance(exc, EngineStartTimeout)
            ENGINE.warning("%s: start failed: %s%s", r.name, str(exc).splitlines()[0],
                           f" ({r.budget_note})" if r.budget_note else "",
                           extra={"model": r.name, "event": "fail"})
            await self.start_failed(r, handle, str(exc), timeout=timeout,
                                    crash=not isinstance(exc, RuntimeUnavailable))
            if isinstance(exc, EngineStartError) and exc.code == "sleep_unsupported":
                r.sleep_ok = False  # this engine cannot sleep: fall back to stop/start
            self.observer.observe_load(r.name, time.monotonic() - began, False)
            return
        r.last_load_s = time.monotonic() - began
        r.state, r.phase, r.last_used = "ready", "ready", time.monotonic()
        r.healthy_at = r.loaded_at = time.monotonic()
        r.restarts += 1 if r.failures else 0
        if self.on_start is not None:
            self.on_start(r, parser, None)
        ENGINE.info("%s: ready in %.1f s on port %d%s", r.name, r.last_load_s, handle.port,
                    f"; {r.budget_note}" if r.budget_note else "",
                    extra={"model": r.name, "event": "ready", "load_s": round(r.last_load_s, 3),
                           "port": handle.port, "budget_gib": round(r.footprint, 3)})
        self.observer.observe_load(r.name, r.last_load_s, True)

    async def start_failed(
        self, r: Replica, handle: EngineHandle | None, message: str, *, timeout: bool = False,
        crash: bool = True,
    ) -> None:
        """A start failed: ``r`` becomes failed, its waiters get the reason, the engine that
        this start launched (``handle``, if any) is stopped. ``crash=False`` (the runtime was
        unreachable: no engine ran) does not count toward the crash-loop guard."""
        r.state, r.phase, r.last_error = "failed", "failed", message
        if crash:
            r.failures.append(time.monotonic())
        if handle is not None:
            await self.stop_engine(r, handle, grace_s=HUNG_STOP_GRACE_S)
        err: AcquireError = (
            LoadTimeout(message) if timeout else LoadFailed(message, retry_after=self.retry_s(r))
        )
        self._fail_waiters(r, err)

    def retry_s(self, r: Replica) -> float:
        """A Retry-After for a failed model: the backoff before it may restart."""
        return max(
            scheduler.restart_delay(len(r.failures) + 1, self.rc.restart_backoff_s),
            self.rc.restart_backoff_s,
            1.0,
        )

    # -- evict ----------------------------------------------------------------------------------
    async def evict(self, v: Replica, ev: scheduler.Evict, reason: str = "") -> bool:
        """Drain ``v`` (new requests queue), then sleep or stop it. False if it stayed busy.
        ``reason`` (why it goes) is logged."""
        v.draining = True
        try:
            if v.in_flight:
                try:
                    await asyncio.wait_for(v.idle.wait(), self.rc.drain_timeout_s)
                except TimeoutError:
                    return False
            if ev.mode == "sleep" and v.state == "ready" and await self.sleep(v):
                ENGINE.info("%s: put to sleep (%s)", v.name, reason or "evicted",
                            extra={"model": v.name, "event": "sleep", "reason": reason})
                self.observer.observe_eviction(v.name, "sleep")
                return True
            v.state = "stopping"
            if v.handle is not None:
                await self.stop_engine(v, v.handle, grace_s=20.0)
            v.state, v.phase = "stopped", ""
            ENGINE.info("%s: stopped (%s)", v.name, reason or "evicted",
                        extra={"model": v.name, "event": "evict", "reason": reason})
            self.observer.observe_eviction(v.name, "stop")
            return True
        finally:
            v.draining = False

    async def sleep(self, v: Replica) -> bool:
        assert v.handle is not None
        try:
            resp = await self.http.post(v.handle.base_url + "/sleep", params={"level": "1"})
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            v.state, v.phase = "sleeping", "sleeping"
        return ok

    async def wake(self, r: Replica) -> bool:
        """Wake a sleeping engine (room was made first: vLLM does not check). False: restart."""
        if r.handle is None:
            return False
        r.state, r.phase = "starting", "waking"
        began = time.monotonic()
        try:
            resp = await self.http.post(r.handle.base_url + "/wake_up")
            ok = resp.status_code == 200 and await probe(r.handle, self.http)
        except httpx.HTTPError:
            ok = False
        if ok:
            r.state, r.phase, r.last_used = "ready", "ready", time.monotonic()
            r.healthy_at = r.loaded_at = time.monotonic()
            ENGINE.info("%s: woken in %.1f s", r.name, time.monotonic() - began,
                        extra={"model": r.name, "event": "wake"})
            self.observer.observe_load(r.name, time.monotonic() - began, True)
        return ok
