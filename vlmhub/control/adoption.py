"""A starting router takes over the engines an earlier one left running (issue 21 item 7).

:func:`adopt_engines` asks :func:`vlmhub.engines.adopt.reconcile_engines` for the engines whose
owner is gone and whose spec is still the configured one (it replaces those whose spec changed
and leaves the models not configured here alone), then sets each one's replica:

- an engine that answers its health path is ``ready`` at once;
- one that does not answer yet is **still loading** (the earlier router went away during its
  start): its replica is ``starting`` with the engine's handle, so its memory counts from the
  first moment and nothing starts on top of it. :func:`finish_loading`, run as the node's one
  engine operation, follows its log (the replica shows its phase) and waits for it within what
  is left of its ``startup_timeout_s`` (counted from the engine's own start). It becomes
  ``ready``, or, if it exits or does not become ready in time, ``failed`` with the parsed
  reason and stopped. No adopted engine is ever left running untracked.

Both run on the event loop; they block (asynchronously) on the runtime and the engines' HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from vlmhub.control.engine_ops import EngineOps
from vlmhub.control.replica import Replica
from vlmhub.engine_log import LogParser
from vlmhub.engines.adopt import reconcile_engines
from vlmhub.engines.base import EngineHandle, Runtime, probe, wait_ready
from vlmhub.engines.launch import engine_hash
from vlmhub.errors import EngineStartTimeout, VlmhubError
from vlmhub.logs import ENGINE
from vlmhub.scheduling.placement import live

MIN_WAIT_S = 1.0
"""The least an adopted engine still loading is given, even past its ``startup_timeout_s``."""


@dataclass
class Adopted:
    """What :func:`adopt_engines` found: ``foreign`` engines (models not configured here, left
    alone) and, by GPU node, the replicas whose engine is still loading (``starting``)."""

    foreign: list[EngineHandle] = field(default_factory=list)
    loading: dict[str, list[Replica]] = field(default_factory=dict)


async def adopt_engines(
    replicas: Mapping[str, Replica], runtime: Runtime, http: httpx.AsyncClient,
    nodes: Mapping[str, float],
) -> Adopted:
    """Adopt the runtime's ownerless engines of the configured models (see the module docs).
    A runtime that cannot be reached adopts nothing."""
    wanted = {
        r.name: engine_hash(r.model, r.sleep_ok)
        for r in replicas.values()
        if r.model.spec is not None
    }
    try:
        found = await reconcile_engines(runtime, wanted)
    except VlmhubError:
        return Adopted()
    adopted = Adopted(foreign=found.unknown)
    for h in found.kept:
        r = replicas[h.name]
        r.handle, r.node = h, h.node if live(h.node, nodes) else r.node
        if await probe(h, http):
            r.state, r.phase = "ready", "ready (adopted)"
            r.last_used = r.healthy_at = time.monotonic()
        else:
            r.state, r.phase = "starting", "starting (adopted while loading)"
            adopted.loading.setdefault(r.node, []).append(r)
            ENGINE.info("%s: adopted while it loads (port %d); waiting for it", r.name, h.port,
                        extra={"model": r.name, "event": "adopt", "port": h.port})
    return adopted


async def finish_loading(ops: EngineOps, replicas: Sequence[Replica]) -> None:
    """Wait for adopted engines still loading (one node's; normally one): each becomes
    ``ready``, or ``failed`` and stopped. Run as the node's one engine operation."""
    await asyncio.gather(*(_finish(ops, r) for r in replicas))


async def _finish(ops: EngineOps, r: Replica) -> None:
    handle, spec = r.handle, r.model.spec
    if handle is None or spec is None or r.state != "starting":
        return
    left = spec.startup_timeout_s - (time.time() - handle.started_at)
    parser = LogParser()

    def on_phase(phase: str, _line: str) -> None:
        r.phase = phase

    try:
        await wait_ready(ops.runtime, handle, timeout_s=max(left, MIN_WAIT_S),
                         on_phase=on_phase, parser=parser)
    except Exception as exc:  # any: the engine is failed and stopped, never left untracked
        note = ops.recorded(r, parser, exc if isinstance(exc, VlmhubError) else None)
        ENGINE.warning("%s: the adopted engine did not become ready: %s", r.name,
                       str(exc).splitlines()[0], extra={"model": r.name, "event": "fail"})
        await ops.start_failed(r, handle, str(exc) + (f"; {note}" if note else ""),
                               timeout=isinstance(exc, EngineStartTimeout))
        return
    now = time.monotonic()
    r.state, r.phase = "ready", "ready"
    r.last_used = r.healthy_at = r.loaded_at = now
    r.last_load_s = max(time.time() - handle.started_at, 0.0)
    ops.recorded(r, parser, None)
    ENGINE.info("%s: the adopted engine is ready (port %d)", r.name, handle.port,
                extra={"model": r.name, "event": "ready", "port": handle.port})
