"""Liveness checks for engines and external endpoints. Async; each call blocks only on its own
HTTP requests and runtime calls, so checks of different engines may run concurrently. They only
observe: what to do about a failed engine is the supervisor's decision."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from vlmhub.engine_log import diagnose
from vlmhub.engines.base import EngineHandle, EngineStatus, Runtime, probe

RECHECK_S = 1.0
"""A running engine that misses one health probe is probed once more after this long."""


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
    if st.exit_code is None and st.detail:  # the runtime knows why (a Ray node is gone)
        return hint or f"engine exited: {st.detail}"
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
