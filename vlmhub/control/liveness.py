"""The supervisor's eyes: health checks of engines and external endpoints, the watch on the GPU
nodes of a runtime that spans several (Ray), and the guard on its background tasks.

Everything here only observes, concurrently with the engine operations; the change it makes is
synchronous (a failed engine goes ``ready -> stopping``, its leases are revoked) and the stop
it needs runs later as an engine operation on that engine's node (see
:mod:`vlmhub.control.supervisor`). Runs on the supervisor's event loop; each check blocks only
on its own HTTP requests and runtime calls (the runtime's blocking calls, Ray and Docker, run in
worker threads inside the runtime), so checks of different engines may run concurrently.
:class:`Liveness` sees the supervisor only through :class:`Host`.

The loops here never end on an exception: each is logged with its traceback and the loop goes
on (:func:`watched` logs a background task that ends with one anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import httpx

from vlmhub.config.schema import RouterConfig
from vlmhub.control.engine_ops import log_exception
from vlmhub.control.replica import Replica
from vlmhub.engine_log import diagnose
from vlmhub.engines.base import EngineHandle, EngineStatus, Runtime, probe
from vlmhub.errors import VlmhubError
from vlmhub.logs import ENGINE, ROUTER
from vlmhub.scheduling.placement import live
from vlmhub.sizing.vram import Gpu

NODE_REFRESH_S = 1.0
"""How often the live GPU nodes are listed (a Ray call: cheap, in a worker thread)."""

RECHECK_S = 1.0
"""A running engine that misses one health probe is probed once more after this long."""


class Host(Protocol):
    """What liveness may see and change of its supervisor: the replicas (their state, on a
    failure), the live GPU nodes (replaced by :meth:`Liveness.refresh_nodes`), and a kick of the
    control loop."""

    replicas: dict[str, Replica]
    nodes: dict[str, float]
    rc: RouterConfig
    gpu: Gpu
    runtime: Runtime
    http: httpx.AsyncClient

    def kick(self) -> None: ...


def watched(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """``coro`` as a task whose exception (not a cancellation) is logged with its traceback."""
    task = asyncio.create_task(coro)

    def done(t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and (exc := t.exception()) is not None:
            log_exception(ROUTER, f"{what} ended with an error", exc)

    task.add_done_callback(done)
    return task


class Liveness:
    """Health checks and the node watch of one supervisor (its :class:`Host`)."""

    def __init__(self, host: Host) -> None:
        self.sup = host

    async def health_loop(self) -> None:
        """Every ``router.health_interval_s``: check each ready engine and every external. A
        check that raises is logged and the loop goes on."""
        while True:
            await asyncio.sleep(self.sup.rc.health_interval_s)
            for r in list(self.sup.replicas.values()):
                if r.model.external or (r.state == "ready" and r.handle is not None):
                    try:
                        await self.check(r)
                    except Exception as exc:
                        log_exception(ROUTER, f"{r.name}: its health check failed", exc,
                                      model=r.name)

    async def check(self, r: Replica, hint: str = "") -> None:
        """Liveness: the engine still runs and answers /health; else its engine is failed."""
        sup = self.sup
        if r.model.external:
            url = r.model.entry.url or ""
            ok = await external_alive(url, sup.http)
            if not ok and r.state == "ready":  # one more look before failing its requests
                await asyncio.sleep(RECHECK_S)
                ok = await external_alive(url, sup.http)
            r.state, r.last_error = ("ready", None) if ok else ("failed", hint or "unreachable")
            for lease in [] if ok else list(r.leases.values()):  # no silent hang on it
                lease.revoke(f"{r.name} at {url} is not answering (unreachable or hung)")
            return
        handle = r.handle
        if handle is None or r.state != "ready":
            return
        reason = await engine_failure(
            sup.runtime, handle, sup.http, hint, healthy_at=r.healthy_at
        )
        if r.handle is not handle or r.state != "ready":  # an operation moved it meanwhile
            return
        if reason is None:
            r.healthy_at = time.monotonic()
            return
        self.engine_failed(r, reason)
        if "" not in sup.nodes:  # several nodes: the runtime may know its node died
            with contextlib.suppress(Exception):
                await self.refresh_nodes()

    async def check_external_now(self, r: Replica, timeout_s: float) -> None:
        """Check external endpoint ``r`` now (admin load), for ``timeout_s`` at most: ``ready``,
        or ``failed`` with why."""
        url = r.model.entry.url or ""
        try:
            await asyncio.wait_for(self.check(r, f"{url} does not answer GET /v1/models"),
                                   timeout_s)
        except TimeoutError:
            r.state, r.last_error = "failed", f"{url} did not answer within {timeout_s:g} s"

    def engine_failed(self, r: Replica, reason: str) -> None:
        """A ready engine is dead or hung: no new lease, revoke the running ones, queue its
        stop (the loop runs it as its node's operation). Synchronous."""
        r.state, r.phase = "stopping", "stopping (failed)"
        what = (
            "is hung" if "not answering" in reason
            else "was stopped" if "exited cleanly" in reason
            else "crashed"
        )
        r.last_error = f"{r.name} {what}: {reason}"
        r.failures.append(time.monotonic())
        ENGINE.warning("%s", r.last_error, extra={"model": r.name, "event": "fail"})
        for lease in list(r.leases.values()):
            lease.revoke(r.last_error)
        self.sup.kick()

    async def refresh_nodes(self) -> bool:
        """List the runtime's GPU nodes into ``sup.nodes`` (usable GiB per node, after
        ``gpu.reserve_gib`` and ``gpu.budget_gib``); engines on a node that is gone fail at
        once. False for a one-GPU runtime (``sup.nodes`` stays ``{"": usable}``)."""
        sup = self.sup
        try:
            found = await sup.runtime.nodes()
        except VlmhubError as exc:  # keep the last list: a hiccup must not fail every engine
            ENGINE.warning("listing the GPU nodes failed: %s", exc, extra={"event": "nodes"})
            if "" in sup.nodes:  # never listed yet: no node to plan on (refused, with why)
                sup.nodes = {}
            return True
        if found is None:
            return False
        g = sup.gpu
        sup.nodes = {
            n: Gpu(total, g.reserve_gib, g.budget_gib, name=n, source="ray").usable_gib
            for n, total in found.items()
        }
        for r in sup.replicas.values():
            if r.model.external or live(r.node, sup.nodes) or not r.node:
                continue
            if r.state in ("ready", "sleeping"):
                self.engine_failed(r, f"its node {r.node} is gone")
        sup.kick()
        return True

    async def node_loop(self) -> None:
        """Every :data:`NODE_REFRESH_S`: :meth:`refresh_nodes` (an error is logged; the loop
        goes on)."""
        while True:
            await asyncio.sleep(NODE_REFRESH_S)
            try:
                await self.refresh_nodes()
            except Exception as exc:
                log_exception(ROUTER, "listing the GPU nodes failed", exc)


# -- the checks themselves (they only observe: what to do about a failure is the supervisor's)
async def engine_failure(
    runtime: Runtime,
    handle: EngineHandle,
    http: httpx.AsyncClient,
    hint: str = "",
    *,
    healthy_at: float | None = None,
) -> str | None:
    """None while the engine runs and answers its health path; else why it failed.

    A running engine must miss two probes in a row (``RECHECK_S`` apart) to count as hung; the
    reason then says for how long it has not answered (since ``healthy_at``, monotonic). An
    engine that exited is explained from the end of its log when vLLM said why. When the
    runtime itself cannot be reached, the health path alone decides. Never raises.
    """
    st = await _status(runtime, handle)
    if isinstance(st, str):  # the runtime cannot be asked (Docker down): /health decides
        return None if await probe(handle, http) else st
    if st.state == "running":
        if await probe(handle, http):
            return None
        await asyncio.sleep(RECHECK_S)
        st = await _status(runtime, handle)
        if isinstance(st, str):
            return None if await probe(handle, http) else st
        if st.state == "running":
            if await probe(handle, http):
                return None
            since = time.monotonic() - healthy_at if healthy_at else None
            span = f" for {since:.0f} s" if since is not None else ""
            return f"engine not answering {handle.health_path}{span} (hung or frozen)"
    tail: list[str] = []
    if st.state != "missing":
        with contextlib.suppress(Exception):  # the log is a nicety; the exit is the fact
            tail = await runtime.logs(handle, tail=40)
    known = diagnose(tail)
    if known is not None:
        return known.summary
    if st.state == "missing":
        return "engine gone (its process or container no longer exists)"
    if st.stopped or st.exit_code == 0:
        return (
            "engine exited cleanly (exit code 0): it was stopped outside this router "
            "(`vlmhub stop`, docker stop, or another router)"
        )
    if st.exit_code is None and st.detail:  # the runtime knows why (a Ray node is gone): that
        return f"engine exited: {st.detail}" + (f" ({hint})" if hint else "")  # before the hint
    return hint or f"engine exited (exit code {st.exit_code})"


async def _status(runtime: Runtime, handle: EngineHandle) -> EngineStatus | str:
    """The engine's status, or why the runtime could not tell (its engine is unreachable:
    ``dockerd`` stopped or restarting). Never raises."""
    try:
        return await runtime.status(handle)
    except Exception as exc:
        return (f"engine not answering {handle.health_path}, and the {runtime.kind} runtime "
                f"cannot be asked about it ({str(exc).strip() or type(exc).__name__})")


async def external_alive(url: str, http: httpx.AsyncClient) -> bool:
    """An external OpenAI-compatible server answers ``GET /v1/models`` below 500."""
    try:
        resp = await http.get(url.rstrip("/") + "/v1/models", timeout=3.0)
    except httpx.HTTPError:
        return False
    return resp.status_code < 500
