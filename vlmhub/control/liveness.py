"""The supervisor's eyes: health checks of engines and external endpoints, and the watch on
the GPU nodes of a runtime that spans several (Ray).

Everything here only observes, concurrently with the engine operations; the change it makes is
synchronous (a failed engine goes ``ready -> stopping``, its leases are revoked) and the stop
it needs runs later as an engine operation on that engine's node (see
:mod:`vlmhub.control.supervisor`). Runs on the supervisor's event loop; the runtime's blocking calls
(Ray, Docker) run in worker threads inside the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from vlmhub.control.health import RECHECK_S, engine_failure, external_alive
from vlmhub.control.replica import Replica
from vlmhub.errors import VlmhubError
from vlmhub.logs import ENGINE
from vlmhub.sizing.vram import Gpu

if TYPE_CHECKING:
    from vlmhub.control.supervisor import Supervisor

NODE_REFRESH_S = 1.0
"""How often the live GPU nodes are listed (a Ray call: cheap, in a worker thread)."""


class Liveness:
    """Health checks and the node watch of one supervisor."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    async def health_loop(self) -> None:
        """Every ``router.health_interval_s``: check each ready engine and every external."""
        while True:
            await asyncio.sleep(self.sup.rc.health_interval_s)
            for r in list(self.sup.replicas.values()):
                if r.model.external or (r.state == "ready" and r.handle is not None):
                    await self.check(r)

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
            if r.model.external or r.node in sup.nodes or not r.node:
                continue
            if r.state in ("ready", "sleeping"):
                self.engine_failed(r, f"its node {r.node} is gone")
        sup.kick()
        return True

    async def node_loop(self) -> None:
        """Every :data:`NODE_REFRESH_S`: :meth:`refresh_nodes`."""
        while True:
            await asyncio.sleep(NODE_REFRESH_S)
            with contextlib.suppress(Exception):
                await self.refresh_nodes()
