"""Fault injection through the real router (issue 10, item 1): real supervisors, stand-in
engines as processes or containers, the real `openai` client. Each test asserts what the client
sees and that the router recovers. Faults covered elsewhere: a frozen engine
(test_supervisor_faults.py), a crash at the N-th request (test_swap.py), a crash loop at the
supervisor (test_supervisor.py), hostile requests (test_router_hostile.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fault_support import (
    PrivateDockerd,
    alive,
    engine_pids,
    running,
    stub_models,
    write_config,
)
from supervisor_support import build, model, routed, routed_app

from vlmhub.engines.ports import free_port
from vlmhub.router.app import in_flight
from vlmhub.scheduling.scheduler import restart_delay

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
MSG = [{"role": "user", "content": "hi"}]


async def until(cond: Any, seconds: float, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met within {seconds} s")


def client(url: str, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=timeout, max_retries=0)


async def drain_stream(stream: Any) -> str:
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


async def models_view(c: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in (await c.get("/api/models")).json()["models"]}


# --------------------------------------------------------------- an engine killed mid-stream
async def killed_mid_stream(url: str, sup: Any, kill: Any) -> None:
    """Kill the engine under a running stream; the client gets an error event, the model is
    ``failed`` with the reason, and the next request restarts it."""
    oa = client(url)
    stream = await oa.chat.completions.create(model="a", messages=MSG, stream=True,  # type: ignore[arg-type]
                                              max_tokens=60)
    first = await anext(aiter(stream))
    assert first.choices
    old = sup.replicas["a"].handle
    kill(old)
    with pytest.raises(openai.APIError) as err:
        await drain_stream(stream)
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "upstream_error", body
    assert "incomplete" in body["message"], body  # the client is told the answer is cut
    await until(lambda: sup.snapshot()[0].state == "failed", 30, "model failed")
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        info = (await models_view(c))["a"]
        assert info["state"] == "failed" and info["in_flight"] == 0
        assert "crashed" in info["last_error"] or "gone" in info["last_error"], info
        listed = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        assert listed["a"]["state"] == "failed"
    again = await oa.chat.completions.create(model="a", messages=MSG, stream=True)  # type: ignore[arg-type]
    assert (await drain_stream(again)).startswith("a:")
    assert sup.replicas["a"].handle is not old and sup.snapshot()[0].restarts == 1
    await oa.close()


async def test_fault_engine_sigkilled_mid_stream(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.05"})

    def kill(handle: Any) -> None:
        os.killpg(int(handle.ident), signal.SIGKILL)

    async with routed(sup) as url:
        await killed_mid_stream(url, sup, kill)


@pytest.mark.docker
async def test_fault_container_docker_killed_mid_stream(
    tmp_path: Path, stub_image: str, docker_client: Any
) -> None:
    prefix = f"vlmhub-f{uuid.uuid4().hex[:6]}"
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, docker_prefix=prefix,
                      stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.05"})

    def kill(handle: Any) -> None:
        docker_client.containers.get(handle.ident).kill()  # `docker kill`: SIGKILL

    try:
        async with routed(sup) as url:
            await killed_mid_stream(url, sup, kill)
    finally:
        for c in docker_client.containers.list(all=True, filters={"name": prefix}):
            c.remove(force=True)
    assert docker_client.containers.list(all=True, filters={"name": prefix}) == []


# --------------------------------------------------------------------------- crash loop
async def test_fault_crash_loop_backs_off_then_answers_503_with_the_reason(
    tmp_path: Path,
) -> None:
    bad = model(1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"})
    sup, rec, _ = build(tmp_path, {"bad": bad},
                        router={"crash_loop_max": 3, "restart_backoff_s": 0.3})
    body = {"model": "bad", "messages": MSG}
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        answers = [await c.post("/v1/chat/completions", json=body) for _ in range(6)]
        for r in answers:
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        messages = [r.json()["error"]["message"] for r in answers]
        assert all("No available memory for the cache blocks" in m for m in messages[:3])
        assert all("crash loop" in m and "POST /api/models/bad/load" in m for m in messages[3:])
        assert all("No available memory for the cache blocks" in m for m in messages[3:])
        await asyncio.sleep(1.5)  # time for any further restart it might try by itself
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 503
        assert rec.loads == [("bad", False)] * 3, "it stops restarting after crash_loop_max"
        failures = sup.replicas["bad"].failures
        gaps = [b - a for a, b in itertools.pairwise(failures)]
        assert all(gap >= restart_delay(n + 2, 0.3) for n, gap in enumerate(gaps)), gaps


# ----------------------------------------------------------------- load timeout and OOM
async def test_fault_load_timeout_is_504_with_the_last_phase(tmp_path: Path) -> None:
    slow = model(1.0, spec={"startup_timeout_s": 2.0})
    sup, _, _ = build(tmp_path, {"slow": slow}, delay=20)
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/v1/chat/completions", json={"model": "slow", "messages": MSG})
        assert r.status_code == 504, r.text
        error = r.json()["error"]
        assert error["type"] == "timeout" and error["code"] == "load_timeout"
        assert "did not become ready within 2 s" in error["message"]
        assert "last phase: " in error["message"]  # where vLLM's log had got to
        assert "startup_timeout_s" in error["message"]  # and the fix
        info = (await models_view(c))["slow"]
        assert info["state"] == "failed" and "within 2 s" in info["last_error"]


async def test_fault_oom_at_startup_is_503_with_vllms_reason_and_recovers(
    tmp_path: Path,
) -> None:
    """Another program holds most of the (simulated) GPU: the stand-in's start-up check
    prints vLLM's real free-memory error; once the memory is free again the model starts."""
    sup, _, ledger = build(tmp_path, {"a": model(3.0)}, router={"restart_backoff_s": 0.1})
    hog = ledger / f"foreign-{os.getpid()}.json"  # live while this process lives
    hog.write_text(json.dumps({"pid": os.getpid(), "port": 1, "model": "other program",
                               "claim_gib": 6.0}))
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        message = r.json()["error"]["message"]
        assert "Not enough free GPU memory at start-up: 2/8 GiB free" in message, message
        assert "Fix:" in message and "Free memory on device" in message
        info = (await models_view(c))["a"]
        assert info["state"] == "failed" and "Not enough free GPU memory" in info["last_error"]
        hog.unlink()  # the other program exits
        ok = await c.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"].startswith("a:")


# ------------------------------------------------------------------ the engine's port taken
async def test_fault_engine_port_taken_by_another_process(tmp_path: Path) -> None:
    """A port of the range held before the start is skipped; a port taken between vlmhub's
    choice and the engine's bind fails that start with the engine's own log line, and the
    next request starts the engine on another port."""
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, delay=1.0, router={"restart_backoff_s": 0.1})
    lo, _ = sup.config.runtime.port_range
    with contextlib.ExitStack() as held:
        squatter = held.enter_context(socket.socket())
        squatter.bind(("127.0.0.1", lo))
        squatter.listen()
        async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            first = sup.replicas["a"].handle
            assert first is not None and first.port != lo
            await c.post("/api/models/a/unload")

            record = tmp_path / "state" / "process" / "a.json"
            racer = held.enter_context(socket.socket())
            racer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do

            async def take_the_port_before_the_engine_binds() -> int:
                for _ in range(400):
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        port = int(json.loads(record.read_text())["port"])
                        racer.bind(("127.0.0.1", port))
                        racer.listen()
                        return port
                    await asyncio.sleep(0.01)
                raise AssertionError("the engine's record never appeared")

            grab = asyncio.create_task(take_the_port_before_the_engine_binds())
            r = await c.post("/v1/chat/completions", json=CHAT)
            taken = await grab
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            message = r.json()["error"]["message"]
            assert "Address already in use" in message and "exited before it was ready" in message
            again = await c.post("/v1/chat/completions", json=CHAT)
            assert again.status_code == 200, again.text
            now = sup.replicas["a"].handle
            assert now is not None and now.port not in (lo, taken)


# -------------------------------------------------------- clients leaving in the middle
async def test_fault_clients_disconnecting_mid_stream_leak_nothing(tmp_path: Path) -> None:
    """Eight clients hang up mid-stream: the engine sees eight aborted requests, every
    in-flight count (engine, supervisor, router, /metrics) is back to zero, no task is left,
    and the model can be evicted at once (a leaked lease would block the swap)."""
    sup, rec, _ = build(tmp_path, {"a": model(5.0), "b": model(5.0)},
                        stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.1"},
                        router={"drain_timeout_s": 2, "policy": "fifo"})
    async with routed_app(sup) as (url, app), httpx.AsyncClient(base_url=url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        handle = sup.replicas["a"].handle
        assert handle is not None
        engine = httpx.AsyncClient(base_url=handle.base_url, timeout=10)
        before = (await engine.get("/stub/stats")).json()
        baseline_tasks = len(asyncio.all_tasks())

        async def leave_after_two_chunks() -> None:
            body = {**CHAT, "stream": True, "max_tokens": 60}  # ~6 s if read to the end
            async with httpx.AsyncClient(base_url=url, timeout=30) as own, \
                    own.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = r.aiter_raw()
                assert (await anext(chunks)).startswith(b"data: ")
                await anext(chunks)

        await asyncio.gather(*(leave_after_two_chunks() for _ in range(8)))
        stats: dict[str, Any] = {}

        async def engine_settled() -> bool:
            stats.update((await engine.get("/stub/stats")).json())
            return bool(stats["disconnects"] == before["disconnects"] + 8
                        and stats["running"] == 0)

        for _ in range(100):
            if await engine_settled():
                break
            await asyncio.sleep(0.05)
        assert stats["disconnects"] == before["disconnects"] + 8 and stats["running"] == 0
        await until(lambda: in_flight(app) == 0 and sup.snapshot()[0].in_flight == 0, 5,
                    "in-flight counts back to zero")
        metrics = (await c.get("/metrics")).text
        assert 'vlmhub_in_flight{model="a"} 0.0' in metrics
        # a task ending a moment later on a loaded machine is not a leak; one left is
        await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, 5,
                    "no task outlives its request")
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "b"})
        assert r.status_code == 200, r.text  # a (5.25 GiB) gave way at once: 5.25 + 5.25 > 8
        assert rec.evictions == [("a", "stop")]
        await engine.aclose()


# ------------------------------------------------------------------- a hung engine
async def test_fault_hung_engine_times_out_with_a_clear_error(tmp_path: Path) -> None:
    """The engine accepts connections but never answers (not a SIGSTOP: it still takes
    SIGTERM): the request ends with a 503 naming the hang, the model is marked failed, and the
    next request is served by a new engine."""
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, stub_env={"VLMHUB_STUB_HANG_AFTER": "1"},
                      router={"health_interval_s": 0.5})
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        hung = sup.replicas["a"].handle
        assert hung is not None
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        message = r.json()["error"]["message"]
        assert "is hung" in message and "not answering /health" in message, message
        info = (await models_view(c))["a"]
        assert "hung" in info["last_error"]
        ok = await c.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200 and sup.replicas["a"].handle is not hung
        await until(lambda: not alive(int(hung.ident)), 10, "the hung engine is gone")


class SilentServer:
    """Accepts TCP connections on a loopback port and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


async def test_fault_hung_external_endpoint_times_out_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """An external endpoint that accepts and never answers: the request ends with an error
    naming it once the health check finds it down, never a silent hang."""
    silent = SilentServer()
    try:
        sup, _, _ = build(tmp_path, {"ext": {"url": f"http://127.0.0.1:{silent.port}"}},
                          router={"health_interval_s": 0.5})
        async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"model": "ext", "messages": MSG})
            assert r.status_code in (502, 503, 504), r.text
            assert "ext" in r.json()["error"]["message"]
            info = (await models_view(c))["ext"]
            assert info["state"] == "failed" and info["in_flight"] == 0
    finally:
        silent.close()


async def test_fault_admin_load_of_a_down_external_endpoint_answers_503_with_the_reason(
    tmp_path: Path,
) -> None:
    """Issue 21, item 11: POST /api/models/NAME/load of an external endpoint that is down (no
    listener) or hung (accepts, never answers) answers 503 with the reason, within
    ``queue_timeout_s``; it used to wait forever."""
    silent = SilentServer()
    gone = free_port()  # nothing listens there
    try:
        sup, _, _ = build(tmp_path, {"gone": {"url": f"http://127.0.0.1:{gone}"},
                                     "hung": {"url": f"http://127.0.0.1:{silent.port}"}},
                          router={"queue_timeout_s": 2, "health_interval_s": 0.2})
        async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
            await until(lambda: {r.state for r in sup.snapshot()} == {"failed"}, 20,
                        "the health checks found both down")
            down = await c.post("/api/models/gone/load")
            assert down.status_code == 503, down.text
            message = down.json()["error"]["message"]
            assert f"127.0.0.1:{gone} does not answer GET /v1/models" in message
            hung = await c.post("/api/models/hung/load")
            assert hung.status_code == 503, hung.text
            assert f"127.0.0.1:{silent.port} did not answer within 2 s" in (
                hung.json()["error"]["message"])
            view = await models_view(c)
            assert view["gone"]["state"] == view["hung"]["state"] == "failed"
    finally:
        silent.close()


# ------------------------------------------------- the router SIGKILLed, then restarted
def test_fault_router_sigkilled_then_restarted_adopts_its_engines(tmp_path: Path) -> None:
    """`vlmhub route` is SIGKILLed while two engines run and clients keep asking. A new router
    on the same state dir adopts both engines (same pids, not restarted) and serves on; every
    request got either its right answer or a refused connection while no router ran."""
    config = write_config(tmp_path, stub_models(("a", "b"), 1.0))
    state = tmp_path / "state"
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    wrong: list[str] = []
    port_box: list[int] = []

    def load(name: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"http://127.0.0.1:{port_box[0]}/v1/chat/completions",
                                  json={"model": name, "messages": MSG, "max_tokens": 4})
                except httpx.TransportError:
                    outcomes["refused"] += 1  # no router listening (or it died mid-request)
                    time.sleep(0.02)
                    continue
                if r.status_code == 200 and r.json()["choices"][0]["message"][
                        "content"].startswith(f"{name}:"):
                    outcomes["ok"] += 1
                else:
                    wrong.append(f"{r.status_code} {r.text[:200]}")

    with running(config, state) as first:
        port_box.append(first.port)
        workers = [threading.Thread(target=load, args=(n,)) for n in ("a", "b", "a", "b")]
        for w in workers:
            w.start()
        for _ in range(200):
            if outcomes["ok"] >= 20:
                break
            time.sleep(0.05)
        engines = engine_pids(state)
        assert set(engines) == {"a", "b"}, engines
        first.kill()
        assert all(alive(pid) for pid in engines.values()), "the engines outlive the router"
        time.sleep(0.5)
        with running(config, state, port=first.port) as second:
            served_before = outcomes["ok"]
            for _ in range(200):
                if outcomes["ok"] >= served_before + 20:
                    break
                time.sleep(0.05)
            stop.set()
            for w in workers:
                w.join(30)
            assert outcomes["ok"] >= served_before + 20, outcomes
            assert engine_pids(state) == engines, "adopted, not restarted"
            view = {m["name"]: m for m in httpx.get(second.url + "/api/models").json()["models"]}
            assert all(view[n]["phase"] == "ready (adopted)" for n in ("a", "b")), view
            assert not (state / "logs" / "a.log.1").exists(), "no second start of a"
            assert "Traceback" not in second.output()
        assert second.proc.returncode == 0, second.output()
    print(f"router SIGKILL: {dict(outcomes)}, wrong {len(wrong)}")
    assert wrong == [], wrong[:5]
    assert not any(alive(pid) for pid in engines.values()), "stopped by the second router"
    assert list((state / "process").glob("*.json")) == []


# ------------------------------------------- the Docker engine stopped, then started again
@pytest.fixture
def private_dockerd(stub_image: str) -> Iterator[PrivateDockerd]:
    root = Path(tempfile.mkdtemp(prefix="vlmd-", dir="/tmp"))  # short: unix socket paths
    daemon = PrivateDockerd(root, os.environ.get("DOCKER_HOST"))
    try:
        yield daemon.setup(stub_image)
    finally:
        daemon.close()


@pytest.mark.docker
async def test_fault_docker_engine_stopped_then_started_again(
    tmp_path: Path, private_dockerd: PrivateDockerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dockerd goes away under a running router (taking its containers with it) and comes
    back: meanwhile requests get a clear 502/503 and the router stays up; afterwards the next
    request starts the engine again, and health checks still run."""
    import docker

    monkeypatch.setenv("DOCKER_HOST", private_dockerd.host)
    prefix = f"vlmhub-d{uuid.uuid4().hex[:6]}"
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, docker_prefix=prefix)
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await asyncio.to_thread(private_dockerd.stop)
        down = [await c.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
        for r in down:
            assert r.status_code in (502, 503), r.text
        message = down[-1].json()["error"]["message"]
        assert down[-1].status_code == 503 and "cannot reach the Docker engine" in message
        assert private_dockerd.host in message and "Fix: start Docker" in message
        assert (await c.get("/health")).status_code == 200  # the router itself stays up
        await asyncio.sleep(1.5)  # health checks run against an unreachable Docker
        await asyncio.to_thread(private_dockerd.start)
        ok = None
        for _ in range(40):
            ok = await c.post("/v1/chat/completions", json=CHAT)
            if ok.status_code == 200:
                break
            await asyncio.sleep(0.25)
        assert ok is not None and ok.status_code == 200, ok.text if ok else None
        handle = sup.replicas["a"].handle
        assert handle is not None
        docker.DockerClient(base_url=private_dockerd.host).containers.get(handle.ident).kill()
        await until(lambda: sup.snapshot()[0].state in ("stopping", "failed"), 15,
                    "the health loop still notices a dead engine")
