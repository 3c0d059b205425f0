"""Engine faults through the real router and supervisor over stand-in engines (process runtime).

A frozen engine (SIGSTOP) is the hard case: it accepts connections but never answers, and it
ignores SIGTERM. These tests pin the supervisor's rules for it (issue 14, items 1, 2 and 5):
the health check only observes, the stop runs as the one engine operation, a stop touches only
the engine it was given, the clients on a failed engine get an error at once, and a client that
leaves the queue gives its slot back while the model is still starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from supervisor_support import build, model, routed

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_for(cond: object, seconds: float) -> None:
    assert callable(cond)
    for _ in range(int(seconds / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {seconds} s")


async def test_fault_frozen_engine_is_replaced_without_orphans(tmp_path: Path) -> None:
    """Item 1: the frozen engine's stop and its replacement never overlap; the replacement
    keeps its handle and state file, and nothing survives the router."""
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, router={"health_interval_s": 0.5})
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=15) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        old = sup.replicas["a"].handle
        assert old is not None
        old_pid = int(old.ident)
        os.killpg(old_pid, signal.SIGSTOP)
        try:
            first = await c.post("/v1/chat/completions", json=CHAT)
            # the request leased to the frozen engine ends with the reason, well before the
            # 20 s SIGTERM grace that a frozen process would otherwise cost
            assert first.status_code == 503, first.text
            assert "not answering /health" in first.json()["error"]["message"]
            second = await c.post("/v1/chat/completions", json=CHAT)
            assert second.status_code == 200, second.text
            info = {m["name"]: m for m in (await c.get("/api/models")).json()["models"]}["a"]
            new = sup.replicas["a"].handle
            assert info["state"] == "ready" and info["port"] is not None
            assert new is not None and new is not old and new.port == info["port"]
            await wait_for(lambda: not alive(old_pid), 10)
            state_files = list((tmp_path / "state" / "process").glob("*.json"))
            assert len(state_files) == 1 and str(new.ident) in state_files[0].read_text()
            for _ in range(3):  # the replacement keeps serving: no stale stop clears it later
                assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old_pid, signal.SIGCONT)
    assert not alive(int(new.ident)), "the replacement engine outlived the router"


async def test_fault_frozen_engine_fails_requests_in_flight_at_once(tmp_path: Path) -> None:
    """Item 2: streams get an SSE error event and plain requests a 503 with the reason, as
    soon as the health check fails the engine; a new request is served by a new engine."""
    sup, _, _ = build(
        tmp_path, {"a": model(1.0)}, router={"health_interval_s": 0.5},
        stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.1"},
    )
    async with routed(sup) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=15, max_retries=0)
        stream = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=500
        )
        first = await anext(aiter(stream))
        assert first.choices
        frozen = sup.replicas["a"].handle
        assert frozen is not None
        async with httpx.AsyncClient(base_url=url, timeout=15) as c:
            plain = asyncio.create_task(
                c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500})
            )
            await asyncio.sleep(0.3)
            os.killpg(int(frozen.ident), signal.SIGSTOP)
            try:
                with pytest.raises(openai.APIError, match="not answering /health"):
                    async for _ in stream:
                        pass
                resp = await plain
                assert resp.status_code == 503 and resp.headers.get("retry-after")
                assert "not answering /health" in resp.json()["error"]["message"]
                info = sup.snapshot()[0]
                assert info.in_flight == 0
                assert info.last_error and "hung" in info.last_error
                after = await c.post("/v1/chat/completions", json=CHAT)
                assert after.status_code == 200
                assert sup.replicas["a"].handle is not frozen
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(frozen.ident), signal.SIGCONT)


async def test_fault_client_leaving_the_queue_frees_its_slot_during_the_start(
    tmp_path: Path,
) -> None:
    """Item 5: a departed client stops counting against the queue while the model starts."""
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, delay=8.0, router={"max_queue": 1})
    async with routed(sup) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as c:
            with pytest.raises(httpx.TimeoutException):
                await c.post("/v1/chat/completions", json=CHAT)
        await wait_for(lambda: sup.snapshot()[0].queued == 0, 5)
        assert sup.snapshot()[0].state == "starting"
        async with httpx.AsyncClient(base_url=url, timeout=15) as c:
            # max_queue is 1: this request would get 503 if the departed one still counted
            resp = await c.post("/v1/chat/completions", json=CHAT)
            assert resp.status_code == 200, resp.text
