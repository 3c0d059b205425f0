"""Hostile and broken requests against a real router (uvicorn on 127.0.0.1, real clients):
deep JSON, bodies that stop arriving, oversized chunked uploads, failed loads and 503s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    make_config,
    running_router,
)
from supervisor_support import build, model, routed

from vlmhub.control.contract import AcquireError, LoadFailed, QueueFull, Refused
from vlmhub.router.app import drain, in_flight

CHAT = [{"role": "user", "content": "hello there"}]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(StubEngine("alpha"), StubEngine("bravo", "bravo-served")) as started:
        yield started


@pytest.fixture
def sup(stubs: dict[str, StubEngine]) -> TestSupervisor:
    return TestSupervisor(dict(stubs), aliases={"b": "bravo"})


@pytest.fixture
def router(sup: TestSupervisor) -> Iterator[RunningRouter]:
    with running_router(sup) as r:
        yield r


def is_openai_error(r: httpx.Response, status: int, code: str | int) -> bool:
    body = r.json()
    return (r.status_code == status and set(body["error"]) == {"message", "type", "param", "code"}
            and body["error"]["code"] == code)


# ------------------------------------------------------------------------------ deep JSON
def nested(depth: int, model: str = "alpha", kind: str = "list") -> bytes:
    if kind == "list":
        inner = b"[" * depth + b"]" * depth
    else:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"model": "' + model.encode() + b'", "messages": ' + inner + b"}"


@pytest.mark.parametrize("body", [
    nested(1_000), nested(5_000), nested(100_000), nested(3_000, kind="dict"),
    b"[" * 50_000, b'{"model": "alpha", "x": ' * 2_000 + b"1" + b"}" * 2_000,
], ids=["list-1k", "list-5k", "list-100k", "dict-3k", "top-level", "outer-objects"])
def test_deeply_nested_json_is_400_not_500(router: RunningRouter, sup: TestSupervisor,
                                           body: bytes) -> None:
    r = httpx.post(router.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert is_openai_error(r, 400, "json_too_deep"), r.text
    assert "nested too deeply" in r.json()["error"]["message"]
    assert sup.acquired == 0 and in_flight(router.app) == 0


def test_json_at_the_parsers_depth_limit_is_never_a_500(router: RunningRouter,
                                                        sup: TestSupervisor) -> None:
    """Around the depth where the recursive parser gives up: a body that still parses may be
    too deep to re-encode when the model name is rewritten (alias "b" -> "bravo-served")."""
    seen: set[int] = set()
    for depth in range(1_000, 700, -1):
        statuses = set()
        for name in ("b", "alpha"):
            r = httpx.post(router.url + "/v1/chat/completions", content=nested(depth, name),
                           timeout=30)
            assert r.status_code in (200, 400), (depth, name, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["code"] == "json_too_deep", r.text
            statuses.add(r.status_code)
        seen |= statuses
        if statuses == {200}:
            break
    assert seen == {200, 400}  # the scan crossed the limit
    assert sup.settled() and sup.double_releases == 0 and in_flight(router.app) == 0


# ------------------------------------------------------------------- bodies that stall
def raw_exchange(port: int, head: bytes, body: bytes, timeout_s: float = 20.0
                 ) -> tuple[bytes, bytes, bool]:
    """Send ``head`` + ``body`` on a fresh connection, then read until the server closes it.
    Returns (status line and headers, body, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head + body)
        data = b""
        closed = False
        while True:
            try:
                part = s.recv(65536)
            except TimeoutError:
                break
            if not part:
                closed = True
                break
            data += part
    headers, _, rest = data.partition(b"\r\n\r\n")
    return headers, rest, closed


def post_head(port: int, extra: str) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def test_a_body_shorter_than_its_content_length_gets_408(sup: TestSupervisor) -> None:
    with running_router(sup, make_config(body_timeout_s=0.5)) as router:
        sent = b'{"model": "alpha", "mess'
        head, body, closed = raw_exchange(router.port, post_head(router.port,
                                                                 "Content-Length: 1000\r\n"), sent)
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"connection: close" in head.lower() and closed
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "body_timeout_s" in err["message"]
        assert f"after {len(sent)} bytes" in err["message"]
        # a chunked upload that stops mid-way is the same
        head, body, closed = raw_exchange(router.port, post_head(
            router.port, "Transfer-Encoding: chunked\r\n"), b"5\r\n{\"mod\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and closed
        assert sup.acquired == 0 and in_flight(router.app) == 0
        ok = httpx.post(router.url + "/v1/chat/completions", json={"model": "alpha",
                                                                   "messages": CHAT})
        assert ok.status_code == 200


def test_a_slow_body_that_keeps_coming_is_not_cut(sup: TestSupervisor) -> None:
    """The timeout is between parts of the body, not for the whole of it."""
    with running_router(sup, make_config(body_timeout_s=2.0)) as router:
        parts = [b'{"model": "alpha", ', b'"messages": [{"role": "user", ',
                 b'"content": "slow"}], ', b'"max_tokens": 3', b"}"]

        def trickle() -> Iterator[bytes]:
            for i, part in enumerate(parts):
                if i:
                    time.sleep(0.6)  # 2.4 s in all: longer than body_timeout_s
                yield part

        r = httpx.post(router.url + "/v1/chat/completions", content=trickle(), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("alpha:")


# ---------------------------------------------------------------- oversized uploads
def sixty_mb() -> Iterator[bytes]:
    yield b'{"model": "alpha", "messages": [{"role": "user", "content": "'
    for _ in range(60):
        yield b"y" * MB
    yield b'"}]}'


def test_a_60_mb_chunked_upload_gets_a_readable_413(router: RunningRouter,
                                                    sup: TestSupervisor) -> None:
    url = router.url + "/v1/chat/completions"
    # urllib sends "Connection: close": uvicorn closes the connection right after the answer,
    # which reset the connection under a client still sending.
    req = urllib.request.Request(url, data=sixty_mb(), method="POST", headers={
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413
    assert json.loads(err.value.read())["error"]["code"] == "request_too_large"
    # the same with a declared Content-Length
    req = urllib.request.Request(url, data=b"x" * (60 * MB), method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413
    for headers in ({}, {"Connection": "close"}):
        r = httpx.post(url, content=sixty_mb(), headers=headers, timeout=60)
        assert is_openai_error(r, 413, "request_too_large"), r.text
        assert "max_body_mb" in r.json()["error"]["message"]
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as api_err:
        c.chat.completions.create(model="alpha", messages=[
            {"role": "user", "content": "z" * (60 * MB)}])
    assert api_err.value.status_code == 413
    assert sup.acquired == 0 and in_flight(router.app) == 0
    ok = httpx.post(url, json={"model": "alpha", "messages": CHAT})
    assert ok.status_code == 200


def test_expect_100_continue_with_a_large_body_is_refused_before_it_is_sent(
        router: RunningRouter) -> None:
    head, body, closed = raw_exchange(router.port, post_head(
        router.port, f"Content-Length: {60 * MB}\r\nExpect: 100-continue\r\n"), b"")
    assert head.startswith(b"HTTP/1.1 413 "), head  # no "100 Continue" first
    assert json.loads(body)["error"]["code"] == "request_too_large" and closed


# ---------------------------------------------------------------------- 503s and loads
@pytest.mark.parametrize(("error", "retry"), [
    (LoadFailed("alpha exited: No available memory for the cache blocks"), "5"),
    (Refused("no room: bravo is pinned"), "5"),
    (AcquireError("no free port in 8100-8199 on 127.0.0.1"), "5"),
    (LoadFailed("alpha is crash-looping", retry_after=41.2), "42"),
    (QueueFull("alpha has 32 requests waiting", retry_after=2.5), "3"),
])
def test_every_503_carries_retry_after(router: RunningRouter, sup: TestSupervisor,
                                       error: AcquireError, retry: str) -> None:
    sup.fail["alpha"] = error
    r = httpx.post(router.url + "/v1/chat/completions", json={"model": "alpha",
                                                              "messages": CHAT})
    assert r.status_code == 503 and str(error) in r.json()["error"]["message"]
    assert r.headers["retry-after"] == retry


def test_draining_503s_carry_retry_after(router: RunningRouter) -> None:
    assert router.call(drain(router.app, 0.1)) is True
    r = httpx.post(router.url + "/v1/chat/completions", json={"model": "alpha",
                                                              "messages": CHAT})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    health = httpx.get(router.url + "/health")
    assert health.status_code == 503 and health.headers["retry-after"] == "5"


async def test_a_failed_load_is_503_with_the_reason(tmp_path: Path) -> None:
    bad = model(1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "max-model-len"})
    sup, _, _ = build(tmp_path, {"bad": bad, "good": model(1.0)})
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/api/models/bad/load")
        assert is_openai_error(r, 503, "load_failed"), r.text
        message = r.json()["error"]["message"]
        assert "'bad' failed to load" in message and "10240" in message
        assert "vlmhub logs bad" in message
        assert int(r.headers["retry-after"]) >= 1
        ok = await c.post("/api/models/good/load")
        assert ok.status_code == 200 and ok.json()["state"] == "ready"


async def test_engine_start_failures_are_503_with_retry_after(tmp_path: Path) -> None:
    """Real supervisor: no free port for the engine; an external endpoint that is down."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    sup, _, _ = build(tmp_path, {"a": model(1.0), "ext": {"url": dead}})
    lo, hi = sup.config.runtime.port_range
    with contextlib.ExitStack() as taken:
        for port in range(lo, hi + 1):  # every engine port is in use
            s = taken.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port))
                s.listen()
        async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            for _ in range(200):  # the health loop finds the external endpoint down
                models = (await c.get("/api/models")).json()["models"]
                if next(m for m in models if m["name"] == "ext")["state"] == "failed":
                    break
                await asyncio.sleep(0.05)
            for name in ("a", "ext"):
                r = await c.post("/v1/chat/completions", json={"model": name, "messages": CHAT})
                assert r.status_code == 503, (name, r.text)
                assert int(r.headers["retry-after"]) >= 1, (name, r.headers)
            assert "port" in (await c.post("/v1/chat/completions", json={
                "model": "a", "messages": CHAT})).json()["error"]["message"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_one_loop_timer_times_out_only_the_bodies_that_stopped() -> None:
    """Issue 21 item 15: every body read on a loop shares one timer (router.body._Sweeper);
    a body that stops arriving is cut after its timeout while others that keep arriving (or
    ended) are left alone, and the timer re-arms for a read that starts later."""
    from vlmhub.router.body import IdleTimer

    async def read(parts: int, gap_s: float) -> str:
        idle = IdleTimer(0.3)
        try:
            for _ in range(parts):
                await asyncio.sleep(gap_s)
                idle.progress()
            return "done"
        except asyncio.CancelledError:
            if not idle.swallow():
                raise
            return "timed out"
        finally:
            idle.close()

    steady = asyncio.create_task(read(8, 0.1))  # 0.8 s in all, never 0.3 s without a part
    stalled = asyncio.create_task(read(1, 0.6))  # its first part would come after 0.6 s
    quick = asyncio.create_task(read(1, 0.0))
    assert await asyncio.gather(steady, stalled, quick) == ["done", "timed out", "done"]
    assert await read(1, 0.5) == "timed out"  # the shared timer re-arms for a later read
