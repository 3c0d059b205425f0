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

Failures are never silent: a start that raises anything fails its model with the reason (the
plan goes on with the other models); a stop that raises keeps the engine tracked (its handle
kept, the replica ``stopping``, so its memory still counts and nothing starts on top of it)
and the control loop retries it after a backoff (:meth:`EngineOps.stop_failed`). Both are
logged with the traceback (:func:`log_exception`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from vlmhub.config.schema import Config, RouterConfig
from vlmhub.control.contract import AcquireError, LoadFailed, LoadTimeout, Observer
from vlmhub.control.replica import Replica
from vlmhub.engine_log import LogParser
from vlmhub.engines.base import EngineHandle, Runtime, probe, wait_ready
from vlmhub.engines.keys import engine_key
from vlmhub.engines.launch import launch_request, runtime_state_dir
from vlmhub.engines.ports import pick_port
from vlmhub.errors import EngineStartError, EngineStartTimeout, RuntimeUnavailable, VlmhubError
from vlmhub.logs import ENGINE
from vlmhub.scheduling import scheduler
from vlmhub.sizing.budgets import BudgetStore, key_for, observe_start
from vlmhub.sizing.sleepfacts import facts_of, freed_gib, merged, remember
from vlmhub.sizing.vram import Gpu

StartHook = Callable[[Replica, "LogParser | None", "VlmhubError | None"], None]
"""Called after every start attempt with the parsed log (or None) and the error (or None)."""
UsedProbe = Callable[[str], "float | None"]
"""GPU node -> GiB in use now on its card(s), every program's (NVML; a pretend GPU's ledger in
tests), or None where it cannot be read. Blocking: EngineOps calls it in a worker thread."""

WAKE_SLACK_GIB = 0.25
"""How much more than planned a wake may add on its card before it counts as a leak."""


HUNG_STOP_GRACE_S = 3.0
"""SIGTERM grace for an engine that stopped answering (the runtime kills a frozen one at once)."""

STOP_RETRY_MAX_S = 30.0
"""The longest wait between two tries to stop an engine whose stop failed."""


def log_exception(logger: logging.Logger, what: str, exc: BaseException, **extra: Any) -> None:
    """Log ``what`` at error level with ``exc``'s traceback (masked with the message by
    :mod:`vlmhub.logs`, like every record)."""
    logger.error("%s: %s", what, str(exc) or type(exc).__name__, exc_info=exc, extra=extra)


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
        budgets: BudgetStore | None = None,
        gpu_used: UsedProbe | None = None,
    ) -> None:
        self.config, self.gpu, self.runtime, self.http = config, gpu, runtime, http
        self.rc: RouterConfig = config.router
        self.gpu_used = gpu_used
        """Reads a card's memory in use around a wake (None: a wake is trusted as planned)."""
        self.observer = observer
        self._fail_waiters = fail_waiters
        self.on_start = on_start
        self.budgets = budgets
        """Where engine starts record what they measured (vlmhub.sizing.budgets); None: nowhere."""
        self._ports: set[int] = set()
        """Ports picked by starts still running: starts on other nodes must not pick them."""
        self._stop_tries: dict[str, int] = {}
        """Model -> failed tries to stop its engine in a row (the retry's backoff)."""
        self._unreachable: dict[str, bool] = {}
        """Model -> whether its last failed stop found the runtime itself unreachable (Docker
        down): its waiters get that reason at once, and the stop is retried at the base delay."""

    # -- stop -----------------------------------------------------------------------------------
    async def stop_engine(self, r: Replica, handle: EngineHandle, *, grace_s: float) -> bool:
        """Stop ``handle`` (and nothing else); forget it on ``r`` only if it is still r's.

        False when the runtime's stop raised: the failure is logged, ``r`` keeps the handle and
        becomes ``stopping`` (its memory still counts; the loop retries, :meth:`stop_failed`)."""
        try:
            await self.runtime.stop(handle, timeout_s=grace_s)
        except Exception as exc:
            tries = self._stop_tries[r.name] = self._stop_tries.get(r.name, 0) + 1
            self._unreachable[r.name] = isinstance(exc, RuntimeUnavailable)
            log_exception(ENGINE, f"{r.name}: stopping its engine ({handle.ident}) failed "
                          f"(try {tries}; retried in {self.stop_retry_s(r):.1f} s)", exc,
                          model=r.name, event="stop_failed")
            if r.handle is handle or r.handle is None:
                r.handle = handle
                r.state, r.phase = "stopping", "stopping (stop failed)"
                r.last_error = f"stopping its engine failed: {str(exc) or type(exc).__name__}"
                if isinstance(exc, RuntimeUnavailable):  # e.g. dockerd down: no wait helps
                    self._fail_waiters(r, LoadFailed(str(exc), retry_after=self.stop_retry_s(r)))
            return False
        self._stop_tries.pop(r.name, None)
        self._unreachable.pop(r.name, None)
        if r.handle is handle:
            r.handle = None
        return True

    def stop_retry_s(self, r: Replica) -> float:
        """The backoff before the next try to stop ``r``'s engine after a failed stop."""
        tries = self._stop_tries.get(r.name, 0)
        base = max(self.rc.restart_backoff_s, 0.1)
        if self._unreachable.get(r.name):  # the runtime, not the engine: try again soon
            return min(base, STOP_RETRY_MAX_S)
        return min(base * 2.0 ** max(tries - 1, 0), STOP_RETRY_MAX_S)

    async def stop_failed(self, r: Replica) -> None:
        """``r`` is ``stopping`` (a health check failed its engine, or a stop failed): stop its
        engine, then ``failed``. Blocks for the stop; after a failed stop, for the backoff
        first (:meth:`stop_retry_s`: the node's one operation waits; if this try fails too, the
        loop runs this again).

        The engine did not answer, so it gets a short grace (:data:`HUNG_STOP_GRACE_S`).
        """
        if r.handle is not None and self._stop_tries.get(r.name):
            await asyncio.sleep(self.stop_retry_s(r))
        handle = r.handle
        if handle is not None and not await self.stop_engine(r, handle,
                                                             grace_s=HUNG_STOP_GRACE_S):
            return
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
        if r.handle is not None and not await self.stop_engine(  # a failed or sleeping engine
            r, r.handle, grace_s=HUNG_STOP_GRACE_S
        ):
            return  # it still runs: ``stopping`` until a retried stop succeeds
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
            if r.name != r.model.name:  # one of several replicas: an engine and key of its own
                req = replace(req, name=r.name, api_key=engine_key(
                    runtime_state_dir(self.runtime), r.name))
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
        except Exception as exc:  # any: the model fails with the reason, the plan goes on
            await self._start_error(r, handle, parser, exc)
            self.observer.observe_load(r.model.name, time.monotonic() - began, False)
            return
        r.last_load_s = time.monotonic() - began
        r.state, r.phase, r.last_used = "ready", "ready", time.monotonic()
        r.healthy_at = r.loaded_at = time.monotonic()
        r.restarts += 1 if r.failures else 0
        self.recorded(r, parser, None)
        ENGINE.info("%s: ready in %.1f s on port %d%s", r.name, r.last_load_s, handle.port,
                    f"; {r.budget_note}" if r.budget_note else "",
                    extra={"model": r.name, "event": "ready", "load_s": round(r.last_load_s, 3),
                           "port": handle.port, "budget_gib": round(r.footprint, 3)})
        self.observer.observe_load(r.model.name, r.last_load_s, True)

    async def _start_error(self, r: Replica, handle: EngineHandle | None, parser: LogParser,
                           exc: Exception) -> None:
        """A start raised ``exc``: record it (budgets), log it, fail ``r`` with the reason. A
        :class:`VlmhubError` or ``OSError`` is an engine's expected failure (one line); anything
        else is logged with its traceback."""
        expected = isinstance(exc, VlmhubError | OSError)
        err = exc if isinstance(exc, VlmhubError) else None
        note = self.recorded(r, parser, err)
        message = str(exc) if expected else f"internal error starting {r.name}: {exc!r}"
        if note:
            message += f"; {note}"
        if expected:
            ENGINE.warning("%s: start failed: %s%s", r.name, message.splitlines()[0],
                           f" ({r.budget_note})" if r.budget_note else "",
                           extra={"model": r.name, "event": "fail"})
        else:
            log_exception(ENGINE, f"{r.name}: start failed", exc, model=r.name, event="fail")
        await self.start_failed(r, handle, message, timeout=isinstance(exc, EngineStartTimeout),
                                crash=not isinstance(exc, RuntimeUnavailable))
        if isinstance(exc, EngineStartError) and exc.code == "sleep_unsupported":
            r.sleep_ok = False  # this engine cannot sleep: fall back to stop/start

    def recorded(self, r: Replica, parser: LogParser | None, err: VlmhubError | None
                 ) -> str | None:
        """After every start attempt (inside the operation): record the memory the engine
        reported, or raise the estimate of one that failed for memory, then call ``on_start``.
        The next start of ``r`` plans with the new budget. Blocks briefly on the budgets file.
        Never raises: a failure here is logged, and returned as a note for the reason."""
        try:
            if self.budgets is not None and not r.model.external:
                obs = observe_start(
                    self.budgets, r.model, self.gpu, parser.facts if parser else {},
                    err is None, err, vllm_version=self.config.runtime.vllm_version,
                    sleep_mode=r.sleep_ok,
                )
                if obs.kind != "none":
                    r.model = obs.model
                    r.budget_note = obs.message
                if r.model.spec is not None:  # what its sleeps taught, for the plan
                    r.sleep_facts = facts_of(self.budgets, key_for(
                        r.model.spec, self.gpu, self.config.runtime.vllm_version,
                        sleep_mode=True))
            if self.on_start is not None:
                self.on_start(r, parser, err)
        except Exception as exc:
            log_exception(ENGINE, f"{r.name}: recording its start failed", exc,
                          model=r.name, event="budget")
            return f"recording the start failed: {exc}"
        return None

    async def start_failed(
        self, r: Replica, handle: EngineHandle | None, message: str, *, timeout: bool = False,
        crash: bool = True,
    ) -> None:
        """A start failed: ``r`` becomes failed, its waiters get the reason, the engine that
        this start launched (``handle``, if any) is stopped (if that stop fails, ``r`` stays
        ``stopping`` until a retry succeeds). ``crash=False`` (the runtime was unreachable: no
        engine ran) does not count toward the crash-loop guard."""
        r.state, r.phase, r.last_error = "failed", "failed", message
        if crash:
            r.failures.append(time.monotonic())
        if handle is not None and not await self.stop_engine(r, handle,
                                                             grace_s=HUNG_STOP_GRACE_S):
            r.last_error = f"{message}; then {r.last_error}"
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
        """Drain ``v`` (new requests queue), then sleep or stop it. False if it stayed busy, or
        its stop failed (then ``v`` is ``stopping``). ``reason`` (why it goes) is logged."""
        v.draining = True
        try:
            if v.in_flight:
                try:
                    await asyncio.wait_for(v.idle.wait(), self.rc.drain_timeout_s)
                except TimeoutError:
                    return False
            if ev.mode == "sleep" and v.state == "ready" and await self.sleep(v, ev.level):
                ENGINE.info("%s: put to sleep at level %d (%s)", v.name, ev.level,
                            reason or "evicted", extra={"model": v.name, "event": "sleep",
                                                        "reason": reason, "level": ev.level})
                self.observer.observe_eviction(v.model.name, "sleep")
                return True
            v.state = "stopping"
            if v.handle is not None and not await self.stop_engine(v, v.handle, grace_s=20.0):
                return False  # still running: ``stopping``, the loop retries the stop
            v.state, v.phase = "stopped", ""
            ENGINE.info("%s: stopped (%s)", v.name, reason or "evicted",
                        extra={"model": v.name, "event": "evict", "reason": reason})
            self.observer.observe_eviction(v.model.name, "stop")
            return True
        finally:
            v.draining = False

    async def sleep(self, v: Replica, level: scheduler.SleepLevel = 1) -> bool:
        """``POST /sleep?level=N`` (with the engine's key): level 1 keeps the weights in host
        RAM, level 2 drops them. False (the caller stops it instead) when it fails."""
        assert v.handle is not None
        try:
            resp = await self.http.post(v.handle.base_url + "/sleep", params={"level": level},
                                        headers=dev_headers(v.handle))
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            v.state, v.phase, v.sleep_level = "sleeping", f"sleeping (level {level})", level
            await self._measure_residue(v, v.handle)
        return ok

    async def _measure_residue(self, v: Replica, handle: EngineHandle) -> None:
        """After a sleep: its residue is its footprint less what vLLM says the sleep freed
        (``Sleep mode freed X GiB``); learned for the plan. A log that cannot be read, or
        says nothing, leaves the planned figure."""
        try:
            freed = freed_gib(await self.runtime.logs(handle, tail=50))
        except Exception as exc:
            log_exception(ENGINE, f"{v.name}: reading its log after a sleep failed", exc,
                          model=v.name, event="sleep")
            return
        if freed is not None:
            residue = max(v.footprint - freed, 0.0)
            if residue > v.residue_gib + 0.1:
                ENGINE.warning("%s: asleep it keeps %.2f GiB, %.2f GiB were planned: the plan "
                               "uses the measured figure from now on", v.name, residue,
                               v.residue_gib, extra={"model": v.name, "event": "sleep"})
            self.learn_sleep(v, residue_gib=residue)

    def learn_sleep(self, r: Replica, *, residue_gib: float | None = None,
                    level: int | None = None, wake_s: float | None = None,
                    failed: bool = False) -> None:
        """One more sleep figure of ``r``: on ``r`` now, in the budgets file for later runs
        (vlmhub.sizing.sleepfacts). Blocks briefly on that file; never raises."""
        r.sleep_facts = merged(r.sleep_facts, residue_gib=residue_gib, level=level,
                               wake_s=wake_s, failed=failed)
        if r.model.spec is None or r.model.external:
            return
        try:
            remember(self.budgets, key_for(r.model.spec, self.gpu,
                                           self.config.runtime.vllm_version, sleep_mode=True),
                     residue_gib=residue_gib, level=level, wake_s=wake_s, failed=failed)
        except Exception as exc:
            log_exception(ENGINE, f"{r.name}: recording a sleep figure failed", exc,
                          model=r.name, event="sleep")

    async def wake(self, r: Replica) -> bool:
        """Wake a sleeping engine (room was made first: vLLM does not check); after a level-2
        sleep, reload its weights and reset its prefix cache. False: restart it. With a
        :data:`UsedProbe`, a wake that took more of its card than planned (its footprint less
        its residue, vLLM #13941/#34600 leak on wake) is a failed wake too: the restart frees
        what it holds."""
        if r.handle is None:
            return False
        r.state, r.phase = "starting", "waking"
        began, headers = time.monotonic(), dev_headers(r.handle)
        before = await self._used(r)
        why = ""
        try:
            ok = (await self.http.post(r.handle.base_url + "/wake_up", headers=headers)
                  ).status_code == 200
            if ok and r.sleep_level == 2:  # the weights were discarded: load them again
                for path, body in (("/collective_rpc", {"method": "reload_weights"}),
                                   ("/reset_prefix_cache", None)):
                    resp = await self.http.post(r.handle.base_url + path, json=body,
                                                headers=headers)
                    ok = ok and resp.status_code == 200
            ok = ok and await probe(r.handle, self.http)
        except httpx.HTTPError:
            ok = False
        if ok and before is not None and (after := await self._used(r)) is not None:
            cards = len(r.node.split("+")) if r.node else 1
            planned = max(r.footprint - r.residue_gib, 0.0) * cards
            if after - before > planned + WAKE_SLACK_GIB:
                ok, why = False, (f": waking took {after - before:.2f} GiB of its card where "
                                  f"{planned:.2f} GiB were planned (a leak)")
        if ok:
            took = time.monotonic() - began
            self.learn_sleep(r, level=r.sleep_level, wake_s=took)  # its next wake's price
            r.state, r.phase, r.last_used = "ready", "ready", time.monotonic()
            r.healthy_at = r.loaded_at = time.monotonic()
            ENGINE.info("%s: woken from level %d in %.1f s", r.name, r.sleep_level, took,
                        extra={"model": r.name, "event": "wake", "level": r.sleep_level})
            self.observer.observe_load(r.model.name, took, True)
        else:  # stop/start instead, and never this level again for this model (until reset)
            ENGINE.warning("%s: its wake from level %d failed%s: restarted instead; that level "
                           "is not used for it again until `vlmhub budgets forget`", r.name,
                           r.sleep_level, why, extra={"model": r.name, "event": "wake_failed"})
            self.learn_sleep(r, level=r.sleep_level, failed=True)
        return ok

    async def _used(self, r: Replica) -> float | None:
        """The probe's reading of ``r``'s card(s), in a worker thread; None on any error."""
        if self.gpu_used is None:
            return None
        try:
            return await asyncio.to_thread(self.gpu_used, r.node)
        except Exception as exc:
            log_exception(ENGINE, f"{r.name}: reading its card's memory failed", exc,
                          model=r.name, event="wake")
            return None


def dev_headers(handle: EngineHandle) -> dict[str, str]:
    """The engine's key on its dev routes (/sleep, /wake_up, ...): newer vLLM guards them with
    --api-key / VLLM_API_KEY like /v1."""
    return {"Authorization": f"Bearer {handle.api_key}"} if handle.api_key else {}
