"""Liveness checks for engines and external endpoints. Async; each call blocks only on its own
HTTP requests and runtime calls, so checks of different engines may run concurrently."""

from __future__ import annotations

import httpx

from vlmhub.engine_log import diagnose
from vlmhub.runtimes.base import EngineHandle, Runtime, probe


async def engine_failure(
    runtime: Runtime, handle: EngineHandle, http: httpx.AsyncClient, hint: str = ""
) -> str | None:
    """None while the engine runs and answers its health path; else why it failed, parsed
    from the end of its log when vLLM said why."""
    st = await runtime.status(handle)
    if st.state == "running" and await probe(handle, http):
        return None
    tail = await runtime.logs(handle, tail=40) if st.state != "missing" else []
    known = diagnose(tail)
    if known is not None:
        return known.summary
    return hint or f"engine {st.state} (exit code {st.exit_code})"


async def external_alive(url: str, http: httpx.AsyncClient) -> bool:
    """An external OpenAI-compatible server answers ``GET /v1/models`` below 500."""
    try:
        resp = await http.get(url.rstrip("/") + "/v1/models", timeout=3.0)
    except httpx.HTTPError:
        return False
    return resp.status_code < 500
