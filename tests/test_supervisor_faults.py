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
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from supervisor_support import build, model, routed

from vlmhub.control.contract import LoadFailed
from vlmhub.engines.base import EngineHandle, EngineStatus
from vlmhub.engines.process import ProcessRuntime
from vlmhub.sizing.budgets import BudgetStore
from vlmhub.sizing.vram import DoesNotFit

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


# ------------------------------------------- issue 21: starts, stops and health never go silent
class Records(logging.Handler):
    """A real handler keeping vlmhub's log records (attached to the ``vlmhub`` logger, which
    may not propagate to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self, text: str) -> list[logging.LogRecord]:
        """The error records whose message contains ``text`` and that carry a traceback."""
        return [r for r in self.records if r.levelno >= logging.ERROR and r.exc_info
                and text in r.getMessage()]


@pytest.fixture
def logged() -> Iterator[Records]:
    handler, logger = Records(), logging.getLogger("vlmhub")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


SIZED: dict[str, Any] = {
    "hf_repo": "stub/m", "image": "vlmhub/stub-engine:dev", "startup_timeout_s": 30,
    "reload_cost_s": 1, "options": {"max_model_len": 4096, "max_num_seqs": 4,
                                    "enforce_eager": True},
    "vram": {"weights_gib": 2.0, "activation_gib": 0.5, "non_torch_gib": 0.2,
             "kv_bytes_per_token": 131072, "cuda_context_gib": 0.5},
}  # fmt: skip


async def test_fault_a_start_that_raises_anything_fails_its_model_and_the_plan_goes_on(
    tmp_path: Path, logged: Records,
) -> None:
    """Item 5 of issue 21: model ``a`` (a fixed ``budget_gib``) fails at start-up for memory;
    raising its estimate then raises ``DoesNotFit`` (a ValueError, not a VlmhubError) inside
    the failure's handling. ``a`` still fails at once with the reason, the error is logged
    with its traceback, and ``b`` is started and served afterwards."""
    store = BudgetStore(tmp_path / "budgets.json")
    a = {"spec": SIZED, "budget_gib": 3.7,
         "env": {"VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"}}
    sup, _, _ = build(tmp_path, {"a": a, "b": model(1.0)}, budgets=store,
                      router={"queue_timeout_s": 20})
    await sup.start()
    try:
        with pytest.raises(LoadFailed) as err:
            await sup.acquire("a")
        assert "No available memory for the cache blocks" in str(err.value)
        assert "recording the start failed" in str(err.value)  # and why the budget is stuck
        info = {i.name: i for i in sup.snapshot()}["a"]
        assert info.state == "failed" and info.port is None
        assert logged.tracebacks("a: recording its start failed")
        assert any(isinstance(r.exc_info[1], DoesNotFit)  # type: ignore[index]
                   for r in logged.tracebacks("a: recording its start failed"))
        sup.release(await sup.acquire("b"))  # the plan went on: b starts and serves
        assert {i.name: i.state for i in sup.snapshot()}["b"] == "ready"
    finally:
        await sup.shutdown()


class StopFailsAtFirst(ProcessRuntime):
    """The real process runtime whose ``stop`` raises (before touching the engine) the first
    ``fails`` times: a runtime that cannot stop an engine for a while (Docker restarting)."""

    fails = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tried = 0

    async def stop(self, handle: EngineHandle, timeout_s: float = 20.0) -> None:
        self.tried += 1
        if self.tried <= self.fails:
            raise RuntimeError(f"the runtime cannot stop {handle.name} now (try {self.tried})")
        await super().stop(handle, timeout_s)


async def test_fault_a_failed_stop_keeps_the_engine_tracked_and_is_retried(
    tmp_path: Path, logged: Records,
) -> None:
    """Item 6 of issue 21: evicting ``a`` for ``b`` (both do not fit on the 4 GiB GPU) fails
    twice. ``a`` stays tracked (``stopping``, handle and memory kept), the stop is retried
    with backoff, ``b`` starts only once ``a``'s process is gone (the simulated GPU would fail
    it otherwise), and ``a`` can start again afterwards."""
    sup, _, _ = build(tmp_path, {"a": model(2.0), "b": model(2.0)}, total_gib=4.0,
                      runtime_type=StopFailsAtFirst)
    runtime = sup.runtime
    assert isinstance(runtime, StopFailsAtFirst)
    await sup.start()
    seen: list[tuple[str, str, bool]] = []  # (a's state, b's state, a's engine alive)

    async def watch(pid: int) -> None:
        while True:
            r = sup.replicas
            seen.append((r["a"].state, r["b"].state, alive(pid)))
            await asyncio.sleep(0.02)

    try:
        sup.release(await sup.acquire("a"))
        old = sup.replicas["a"].handle
        assert old is not None
        watcher = asyncio.create_task(watch(int(old.ident)))
        try:
            sup.release(await sup.acquire("b"))
        finally:
            watcher.cancel()
        assert runtime.tried == 3  # two failed stops, then the retry that worked
        assert ("stopping", "stopped", True) in seen  # tracked while it could not be stopped
        assert not [s for s in seen if s[1] in ("starting", "ready") and s[2]], \
            "b was started while a's engine still ran"
        assert not alive(int(old.ident))
        failed = logged.tracebacks("a: stopping its engine")
        assert len(failed) == 2 and "cannot stop a now" in failed[0].getMessage()
        sup.release(await sup.acquire("a"))  # a starts again (b makes room, stops fine now)
        assert {i.name: i.state for i in sup.snapshot()} == {"a": "ready", "b": "stopped"}
    finally:
        await sup.shutdown()


class StatusBreaksOnce(ProcessRuntime):
    """The real process runtime whose ``status`` returns garbage once when ``broken`` is set
    (a bug in a runtime): the health check that asks it raises."""

    broken = False

    async def status(self, handle: EngineHandle) -> EngineStatus:
        if self.broken:
            self.broken = False
            return None  # type: ignore[return-value]
        return await super().status(handle)


async def test_fault_a_health_check_that_raises_is_logged_and_checking_goes_on(
    tmp_path: Path, logged: Records,
) -> None:
    """Item 9 of issue 21: one health check raises (the runtime answered garbage). It is
    logged with its traceback, and health checking goes on: a later crash is still found
    without any request noticing it."""
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, router={"health_interval_s": 0.2},
                      runtime_type=StatusBreaksOnce)
    runtime = sup.runtime
    assert isinstance(runtime, StatusBreaksOnce)
    await sup.start()
    try:
        sup.release(await sup.acquire("a"))
        handle = sup.replicas["a"].handle
        assert handle is not None
        runtime.broken = True
        await wait_for(lambda: not runtime.broken, 10)  # a health check got the garbage
        assert sup.replicas["a"].state == "ready"
        os.killpg(int(handle.ident), signal.SIGKILL)
        await wait_for(lambda: (sup.replicas["a"].last_error or "").startswith("a crashed"), 10)
        (record,) = logged.tracebacks("a: its health check failed")
        assert isinstance(record.exc_info[1], AttributeError)  # type: ignore[index]
    finally:
        await sup.shutdown()
