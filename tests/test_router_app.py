"""The router app end to end: real uvicorn, real stub engines, the real openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    make_config,
    running_router,
    wait_for,
)

from vlmhub.control.contract import AcquireError, LoadFailed, LoadTimeout, QueueFull, Refused
from vlmhub.engines.ports import free_port
from vlmhub.errors import PortInUse
from vlmhub.router.app import create_app, drain, in_flight
from vlmhub.router.server import RouterServer
from vlmhub.router.server import run as server_run

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(
        StubEngine("alpha"),
        StubEngine("bravo", "bravo-served"),  # the engine's name differs: the body is rewritten
        StubEngine("slow", "slow", "--stub-token-delay", "0.2"),
        StubEngine("keyed", "keyed", api_key="engine-secret"),
    ) as started:
        yield started


@pytest.fixture
def sup(stubs: dict[str, StubEngine]) -> TestSupervisor:
    return TestSupervisor(dict(stubs), aliases={"b": "bravo", "a-alias": "alpha"})


@pytest.fixture
def router(sup: TestSupervisor) -> Iterator[RunningRouter]:
    with running_router(sup) as r:
        yield r


def client(router: RunningRouter, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_chat_and_completions_reach_the_right_engine(router: RunningRouter,
                                                     sup: TestSupervisor) -> None:
    c = client(router)
    out = c.chat.completions.create(model="alpha", messages=CHAT)
    assert (out.choices[0].message.content or "").startswith("alpha:")
    text = c.completions.create(model="bravo", prompt="once upon").choices[0].text
    assert text.startswith("bravo-served:")
    pieces = [ch.choices[0].text for ch in
              c.completions.create(model="alpha", prompt="x", stream=True, max_tokens=4)]
    assert "".join(pieces).startswith("alpha:")
    deltas = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="bravo", messages=CHAT, stream=True) if ch.choices]
    assert "".join(deltas).startswith("bravo-served:")
    assert sup.settled() and sup.double_releases == 0 and sup.acquired == 4


def test_aliases_route_and_the_model_name_is_rewritten(router: RunningRouter) -> None:
    c = client(router)
    out = c.chat.completions.create(model="b", messages=CHAT)
    # The stub answers 404 for any name but its served one: "b" was rewritten to bravo-served.
    assert (out.choices[0].message.content or "").startswith("bravo-served:")
    out = c.chat.completions.create(model="a-alias", messages=CHAT)
    assert (out.choices[0].message.content or "").startswith("alpha:")


def test_embeddings_and_tokenize(router: RunningRouter) -> None:
    emb = client(router).embeddings.create(model="alpha", input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    for path in ("/tokenize", "/v1/tokenize"):
        r = httpx.post(router.url + path, json={"model": "alpha", "prompt": "a b c"})
        assert r.status_code == 200, r.text
        assert r.json()["count"] == 3


def test_unknown_model_is_404_listing_the_models(router: RunningRouter) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(router).chat.completions.create(model="nope", messages=CHAT)
    body = err.value.body
    assert isinstance(body, dict)
    assert "nope" in body["message"] and "alpha" in body["message"]
    assert "bravo" in body["message"] and body["code"] == "model_not_found"


def test_bad_requests(router: RunningRouter, sup: TestSupervisor) -> None:
    url = router.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "alpha", ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(url, json=["model"]).status_code == 400
    r = httpx.post(url, json={"messages": CHAT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert httpx.post(url, json={"model": 7, "messages": CHAT}).status_code == 400
    assert httpx.get(router.url + "/v1/nothing-here").status_code == 404
    assert sup.acquired == 0 and in_flight(router.app) == 0


def test_body_over_the_limit_is_413(sup: TestSupervisor) -> None:
    with running_router(sup, make_config(max_body_mb=0.01)) as router:  # ~10 KiB
        url = router.url + "/v1/chat/completions"
        big = {"model": "alpha", "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = httpx.post(url, json=big)
        assert r.status_code == 413 and "max_body_mb" in r.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"model": "alpha", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * 1000
            yield b'"}]}'

        r = httpx.post(url, content=chunks())
        assert r.status_code == 413
        ok = httpx.post(url, json={"model": "alpha", "messages": CHAT})
        assert ok.status_code == 200
        assert sup.acquired == 1


def test_api_keys_are_required_when_configured(sup: TestSupervisor,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMHUB_API_KEYS", "env-key")
    with running_router(sup, make_config(api_keys=["file-key"])) as router:
        with pytest.raises(openai.AuthenticationError):
            client(router, "wrong").chat.completions.create(
                model="alpha", messages=CHAT)
        with pytest.raises(openai.AuthenticationError):
            client(router, "wrong").models.list()
        r = httpx.post(router.url + "/tokenize", json={"model": "alpha", "prompt": "a"})
        assert r.status_code == 401
        for key in ("file-key", "env-key"):
            out = client(router, key).chat.completions.create(
                model="alpha", messages=CHAT)
            assert (out.choices[0].message.content or "").startswith("alpha:")
        assert httpx.get(router.url + "/health").status_code == 200
        assert sup.acquired == 2


def test_client_key_is_replaced_by_the_engine_key(sup: TestSupervisor) -> None:
    with running_router(sup, make_config(api_keys=["client-key"])) as router:
        # The "keyed" stub answers 401 unless it gets its own key, never the client's.
        out = client(router, "client-key").chat.completions.create(
            model="keyed", messages=CHAT)
        assert (out.choices[0].message.content or "").startswith("keyed:")


def test_models_list_health_and_metrics(router: RunningRouter) -> None:
    models = client(router).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["alpha", "bravo", "slow", "keyed"]
    raw = httpx.get(router.url + "/v1/models").json()["data"]
    alpha = next(m for m in raw if m["id"] == "alpha")
    assert alpha["state"] == "ready" and alpha["max_model_len"] == 8192
    assert alpha["aliases"] == ["a-alias"] and alpha["in_flight"] == 0 and alpha["queued"] == 0
    assert "phase" in alpha and alpha["object"] == "model"
    assert client(router).models.retrieve("b").id == "bravo"
    health = httpx.get(router.url + "/health").json()
    assert health == {"status": "ok", "models": {n: "ready" for n in ids}}
    client(router).completions.create(model="alpha", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client(router).completions.create(model="missing", prompt="x")
    text = httpx.get(router.url + "/metrics").text
    assert 'vlmhub_requests_total{model="alpha",status="200"} 1.0' in text
    assert 'vlmhub_requests_total{model="(unknown)",status="404"} 1.0' in text
    assert 'vlmhub_model_state{model="alpha",state="ready"} 1.0' in text
    assert 'vlmhub_model_state{model="alpha",state="stopped"} 0.0' in text
    assert 'vlmhub_request_seconds_count{model="alpha"} 1.0' in text
    router.metrics.observe_load("alpha", 12.5, ok=True)
    router.metrics.observe_eviction("bravo", "sleep")
    text = httpx.get(router.url + "/metrics").text
    assert 'vlmhub_loads_total{model="alpha",result="ok"} 1.0' in text
    assert 'vlmhub_evictions_total{mode="sleep",model="bravo"} 1.0' in text


@pytest.mark.parametrize(("error", "status"), [
    (QueueFull("alpha has 32 requests waiting", retry_after=2.5), 503),
    (LoadTimeout("alpha did not become ready within 600 s"), 504),
    (LoadFailed("alpha exited: No available memory for the cache blocks"), 503),
    (Refused("no room: bravo is pinned"), 503),
])
def test_refusals_map_to_status(router: RunningRouter, sup: TestSupervisor,
                                error: AcquireError, status: int) -> None:
    sup.fail["alpha"] = error
    with pytest.raises(openai.APIStatusError) as err:
        client(router).chat.completions.create(model="alpha", messages=CHAT)
    assert err.value.status_code == status
    assert str(error) in str(err.value)
    retry = err.value.response.headers.get("retry-after")  # every 503 has one (issue 14)
    assert retry == {QueueFull: "3", LoadTimeout: None}.get(type(error), "5")
    assert sup.acquired == 0 and in_flight(router.app) == 0


def test_admin_api_from_loopback_without_admin_key(router: RunningRouter,
                                                   sup: TestSupervisor) -> None:
    r = httpx.get(router.url + "/api/models")
    assert r.status_code == 200
    first = r.json()["models"][0]
    for key in ("state", "port", "budget_gib", "in_flight", "queued", "last_used", "last_load_s",
                "last_error", "pinned", "external", "draining", "restarts"):
        assert key in first
    r = httpx.post(router.url + "/api/models/b/unload")
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    r = httpx.post(router.url + "/api/models/bravo/load")
    assert r.status_code == 200 and r.json()["state"] == "ready"
    assert sup.actions == [("unload", "bravo"), ("load", "bravo")]
    nope = httpx.post(router.url + "/api/models/nope/load")
    assert nope.status_code == 404 and nope.json()["error"]["code"] == "model_not_found"
    assert "alpha" in nope.json()["error"]["message"]  # the models there are, as on /v1


async def test_admin_api_refuses_remote_clients_without_admin_key(sup: TestSupervisor) -> None:
    app = create_app(sup, make_config())
    remote = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=remote, base_url="http://router") as c:
        r = await c.get("/api/models")
        assert r.status_code == 403 and "admin_key" in r.json()["error"]["message"]
        assert (await c.post("/api/models/alpha/load")).status_code == 403
    local6 = httpx.ASGITransport(app=app, client=("::1", 40000))
    async with httpx.AsyncClient(transport=local6, base_url="http://router") as c:
        assert (await c.get("/api/models")).status_code == 200
    assert sup.actions == []


async def test_admin_key_is_required_when_set(sup: TestSupervisor) -> None:
    app = create_app(sup, make_config(admin_key="adm1n", api_keys=["user-key"]))
    for host in ("127.0.0.1", "192.0.2.7"):
        t = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=t, base_url="http://router") as c:
            assert (await c.get("/api/models")).status_code == 401
            bad = {"Authorization": "Bearer user-key"}
            assert (await c.get("/api/models", headers=bad)).status_code == 401
            good = {"Authorization": "Bearer adm1n"}
            assert (await c.get("/api/models", headers=good)).status_code == 200
            r = await c.post("/api/models/alpha/load", headers=good)
            assert r.status_code == 200
    assert sup.actions == [("load", "alpha"), ("load", "alpha")]


def test_drain_refuses_new_requests_and_waits_for_streams(router: RunningRouter) -> None:
    c = client(router)
    stream = c.chat.completions.create(model="slow", messages=CHAT, stream=True,
                                       max_tokens=6)
    first = next(iter(stream))  # the request is in flight now
    assert first.choices
    assert router.call(drain(router.app, 0.1)) is False  # a stream is still running
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="alpha", messages=CHAT)
    assert err.value.status_code == 503 and "shutting down" in str(err.value)
    assert httpx.get(router.url + "/health").status_code == 503
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text.startswith("slow:")  # the stream in flight finished normally
    assert router.call(drain(router.app, 5.0)) is True
    assert in_flight(router.app) == 0


def test_client_leaving_while_queued_cancels_the_acquire(router: RunningRouter,
                                                         sup: TestSupervisor) -> None:
    sup.acquire_delay["alpha"] = 30.0  # "loading"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/chat/completions", json={"model": "alpha", "messages": CHAT},
                   timeout=httpx.Timeout(5.0, read=0.5))
    assert wait_for(lambda: sup.cancelled_acquires == 1)
    assert wait_for(lambda: in_flight(router.app) == 0)
    assert sup.acquired == 0


def test_port_in_use_is_a_clear_error(sup: TestSupervisor) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as err:
            RouterServer(create_app(sup, make_config()), "127.0.0.1", port)
    assert str(port) in str(err.value) and "--port" in str(err.value)


async def test_concurrent_streams_all_complete(router: RunningRouter, sup: TestSupervisor) -> None:
    c = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)

    async def one(i: int) -> str:
        model = ("alpha", "b")[i % 2]
        stream = await c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"n{i}"}], stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    texts = await asyncio.gather(*(one(i) for i in range(24)))
    await c.close()
    assert all(t.startswith(("alpha:", "bravo-served:")[i % 2]) for i, t in enumerate(texts))
    assert sup.settled() and sup.acquired == 24 and sup.double_releases == 0


def test_a_ready_model_costs_one_watch_task_per_request(router: RunningRouter,
                                                        sup: TestSupervisor) -> None:
    """Issue 9: at most one task watches the client from the lease to the last byte (none when
    the answer comes within WATCH_AFTER_S, issue 21); a lease granted at once runs inline, and
    so does the exchange (no task racing either of them)."""
    created: list[str] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("vlmhub."):
            created.append(f"{frame.f_globals['__name__']}.{coro.cr_code.co_qualname}")
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def install(factory: Any) -> None:
        asyncio.get_running_loop().set_task_factory(factory)

    router.call(install(counting))
    try:
        with httpx.Client(base_url=router.url, timeout=20) as http:
            for stream in (False, True):
                r = http.post("/v1/chat/completions", json={
                    "model": "alpha", "messages": CHAT, "max_tokens": 3, "stream": stream})
                assert r.status_code == 200 and "alpha:" in r.text
    finally:
        router.call(install(None))
    assert set(created) <= {"vlmhub.router.watch._wait_disconnect"} and len(created) <= 2
    assert sup.settled() and sup.released == 2 and sup.double_releases == 0
    assert wait_for(lambda: in_flight(router.app) == 0)


def test_the_router_runs_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: ``vlmhub route`` runs on uvloop (a dependency on Linux and macOS), and on
    asyncio's own loop where uvloop cannot be imported."""
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert server_run(loop_module()).startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert server_run(loop_module()).startswith("asyncio")


# ----------------------------------------------------------------------------- vlmhub route
ROUTE_CONFIG = """
gpu: {{total_gib: 8, reserve_gib: 0.5, force_total: true}}
router: {{shutdown_timeout_s: 20}}
runtime:
  kind: process
  process_argv: ["{{python}}", "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay", "0.2",
                 "--stub-token-delay", "0.1"]
  port_range: [{lo}, {hi}]
models:
  demo:
    aliases: [d]
    spec:
      hf_repo: stub/demo
      image: vlmhub/stub-engine:dev
      options: {{max_model_len: 2048, enforce_eager: true}}
      vram: {{weights_gib: 1.0, kv_bytes_per_token: 28672, activation_gib: 0.5}}
"""


def test_route_cli_serves_drains_on_ctrl_c_and_stops_engines(tmp_path: Path) -> None:
    lo = free_port()
    cfg = tmp_path / "models.yaml"
    cfg.write_text(ROUTE_CONFIG.format(lo=lo, hi=lo + 50))
    port = free_port()
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmhub", "route", "--config", str(cfg),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _health(url), timeout_s=20), proc.stderr
        body = {"model": "d", "messages": CHAT, "stream": True, "max_tokens": 25}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            chunks = r.iter_text()
            first = next(chunks)
            assert "demo:" in first or first.startswith("data: ")
            engine_port = httpx.get(url + "/api/models").json()["models"][0]["port"]
            proc.send_signal(signal.SIGINT)  # Ctrl-C: drain first
            assert wait_for(lambda: httpx.get(url + "/health").status_code == 503, timeout_s=5)
            refused = httpx.post(url + "/v1/chat/completions",
                                 json={"model": "demo", "messages": CHAT})
            assert refused.status_code == 503
            rest = "".join(chunks)
        assert rest.rstrip().endswith("data: [DONE]")  # the stream in flight finished
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "router ready" in out and "demo" in out and "stopped" in err
        with pytest.raises(httpx.ConnectError):  # the engine was stopped with the router
            httpx.get(f"http://127.0.0.1:{engine_port}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_route_cli_port_in_use(tmp_path: Path) -> None:
    cfg = tmp_path / "models.yaml"
    cfg.write_text(ROUTE_CONFIG.format(lo=18100, hi=18110))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state")}
        done = subprocess.run([sys.executable, "-m", "vlmhub", "route", "--config", str(cfg),
                               "--port", str(port)], capture_output=True, text=True, env=env,
                              timeout=30)
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


def _health(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
