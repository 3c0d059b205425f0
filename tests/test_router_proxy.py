"""The data path: header filtering, model rewrite, byte pass-through, unbuffered streaming,
client hang-ups and engine deaths. Real uvicorn, real stub engines, a real aiohttp echo server."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from openai.types.chat import ChatCompletionMessageParam
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    running_router,
    serve_app,
    wait_for,
)

from vlmhub.engines.ports import free_port
from vlmhub.router.app import in_flight
from vlmhub.router.proxy import downstream_headers, rewrite_model, upstream_headers

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


# ----------------------------------------------------------------------------- units
def test_upstream_headers_drop_hop_by_hop_host_length_and_client_key() -> None:
    got = upstream_headers([
        ("Host", "router:8080"), ("Content-Length", "12"), ("Authorization", "Bearer client"),
        ("Connection", "keep-alive, X-Private"), ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"), ("X-Private", "secret"), ("TE", "trailers"),
        ("Content-Type", "application/json"), ("X-Request-Id", "r1"), ("User-Agent", "sdk/1"),
    ])
    assert dict(got) == {"Content-Type": "application/json", "X-Request-Id": "r1",
                         "User-Agent": "sdk/1", "Accept-Encoding": "identity"}
    keyed = upstream_headers([("authorization", "Bearer client"), ("accept-encoding", "gzip")],
                             api_key="engine-key")
    assert keyed.getall("Authorization") == ["Bearer engine-key"]
    assert keyed["Accept-Encoding"] == "gzip"


def test_downstream_headers_mark_streams_unbuffered() -> None:
    upstream = CIMultiDict([("Content-Type", "text/event-stream"), ("Content-Length", "9"),
                            ("Server", "uvicorn"), ("Date", "today"), ("X-Request-Id", "r1"),
                            ("Cache-Control", "max-age=60"), ("Transfer-Encoding", "chunked")])
    got = downstream_headers(upstream, streamed=True)
    assert got == [(b"content-type", b"text/event-stream"), (b"x-request-id", b"r1"),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    plain = downstream_headers(upstream, streamed=False)
    assert (b"cache-control", b"max-age=60") in plain and (b"content-length", b"9") not in plain


def test_rewrite_model_only_when_the_names_differ() -> None:
    raw = b'{"model":  "m", "temperature": 0.1, "messages": [{"content": "\\u00e9t\\u00e9"}]}'
    payload = json.loads(raw)
    assert rewrite_model(raw, payload, "m") is raw  # untouched bytes
    out = json.loads(rewrite_model(raw, payload, "served"))
    assert out == {**payload, "model": "served"}
    assert rewrite_model(b"", None, "served") == b""


# ----------------------------------------------------------------------------- echo upstream
class EchoUpstream:
    """A real aiohttp server on loopback that answers with what it received."""

    def __init__(self, name: str, served: str, api_key: str | None = None) -> None:
        self.name, self.served, self.api_key = name, served, api_key
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = {"path": request.path_qs, "headers": {k.lower(): v for k, v in
                                                       request.headers.items()},
                  "body": body.decode()}
        if request.path == "/v1/completions":  # compressed: must pass through untouched
            return web.Response(body=gzip.compress(json.dumps(answer).encode()),
                                headers={"Content-Encoding": "gzip",
                                         "Content-Type": "application/json"})
        return web.json_response(answer, status=201)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.echo)
        app.router.add_post("/v1/completions", self.echo)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> EchoUpstream:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(StubEngine("alpha"),
                 StubEngine("slow", "slow", "--stub-token-delay", "0.2")) as started:
        yield started


def test_bytes_pass_through_and_headers_are_filtered() -> None:
    with EchoUpstream("echo", "echo") as plain, EchoUpstream("keyed", "keyed-served",
                                                             api_key="engine-key") as keyed:
        sup = TestSupervisor({"echo": plain, "keyed": keyed}, aliases={"k": "keyed"})
        with running_router(sup) as router:
            raw = b'{"model":"echo",   "messages": [], "x": 1.50}'
            r = httpx.post(router.url + "/v1/chat/completions?trace=1", content=raw, headers={
                "Authorization": "Bearer client-key", "X-Custom": "kept",
                "Content-Type": "application/json", "Connection": "keep-alive, X-Private",
                "X-Private": "dropped"})
            assert r.status_code == 201  # the engine's status is kept
            seen = r.json()
            assert seen["body"].encode() == raw  # same name: the exact bytes
            assert seen["path"] == "/v1/chat/completions?trace=1"
            assert seen["headers"]["x-custom"] == "kept"
            assert "authorization" not in seen["headers"]  # the client's key never leaves
            assert "x-private" not in seen["headers"]
            assert seen["headers"]["host"] == f"127.0.0.1:{plain.port}"

            r = httpx.post(router.url + "/v1/chat/completions",
                           json={"model": "k", "messages": [], "n": 2},
                           headers={"Authorization": "Bearer client-key"})
            seen = r.json()
            assert json.loads(seen["body"]) == {"model": "keyed-served", "messages": [], "n": 2}
            assert seen["headers"]["authorization"] == "Bearer engine-key"

            with httpx.stream("POST", router.url + "/v1/completions",
                              json={"model": "echo", "prompt": "p"},
                              headers={"Accept-Encoding": "gzip"}) as r:
                packed = b"".join(r.iter_raw())  # not decompressed on the way
            assert r.headers["content-encoding"] == "gzip"
            assert r.headers["content-length"] == str(len(packed))
            assert json.loads(gzip.decompress(packed))["headers"]["accept-encoding"] == "gzip"

            # "stream": true with a JSON answer is relayed as a stream, unbuffered.
            r = httpx.post(router.url + "/v1/chat/completions",
                           json={"model": "echo", "messages": [], "stream": True})
            assert r.status_code == 201 and r.headers["x-accel-buffering"] == "no"
            assert r.headers["cache-control"] == "no-cache"
            assert json.loads(r.json()["body"])["stream"] is True
        assert sup.settled() and sup.acquired == 4 and sup.double_releases == 0


# ----------------------------------------------------------------------------- stub engines
@pytest.fixture
def sup(stubs: dict[str, StubEngine]) -> TestSupervisor:
    return TestSupervisor(dict(stubs))


@pytest.fixture
def router(sup: TestSupervisor) -> Iterator[RunningRouter]:
    with running_router(sup) as r:
        yield r


def client(router: RunningRouter) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=20)


def test_streaming_is_not_buffered(router: RunningRouter) -> None:
    start = time.monotonic()
    arrivals: list[float] = []
    text = ""
    for chunk in client(router).chat.completions.create(
            model="slow", messages=CHAT, stream=True, max_tokens=5):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
            text += chunk.choices[0].delta.content
    total = time.monotonic() - start
    assert text.startswith("slow:") and len(arrivals) == 5
    assert arrivals[0] < total / 2, (arrivals, total)
    assert arrivals == sorted(arrivals) and arrivals[-1] - arrivals[0] > total / 2


def test_client_disconnect_mid_stream_aborts_the_engine_request(
        router: RunningRouter, sup: TestSupervisor, stubs: dict[str, StubEngine]) -> None:
    slow = stubs["slow"]
    before = slow.stats()["disconnects"]
    body = {"model": "slow", "messages": CHAT, "stream": True, "max_tokens": 40}  # ~8 s
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body) as r:
        chunks = r.iter_raw()
        assert next(chunks).startswith(b"data: ")
        next(chunks)
    # Leaving the block closed the connection: the router must drop the engine's connection.
    assert wait_for(lambda: slow.stats()["disconnects"] == before + 1, timeout_s=3)
    assert wait_for(lambda: slow.stats()["running"] == 0)
    assert sup.settled() and sup.released == 1 and sup.double_releases == 0
    assert sup.failures == [] and in_flight(router.app) == 0


def test_client_disconnect_before_a_buffered_answer_aborts_too(
        router: RunningRouter, sup: TestSupervisor, stubs: dict[str, StubEngine]) -> None:
    slow = stubs["slow"]
    before = slow.stats()["disconnects"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/chat/completions",
                   json={"model": "slow", "messages": CHAT, "max_tokens": 40},
                   timeout=httpx.Timeout(5.0, read=0.5))
    assert wait_for(lambda: slow.stats()["disconnects"] == before + 1, timeout_s=3)
    assert sup.settled() and sup.double_releases == 0 and in_flight(router.app) == 0


def test_engine_dying_mid_stream_ends_with_an_error_event() -> None:
    with engines(StubEngine("crashy", "crashy", "--stub-crash-after", "1",
                            "--stub-token-delay", "0.05")) as es:
        sup = TestSupervisor(dict(es))
        with running_router(sup) as router:
            got = ""
            stream = client(router).chat.completions.create(
                model="crashy", messages=CHAT, stream=True)
            with pytest.raises(openai.APIError) as err:
                for chunk in stream:
                    if chunk.choices:
                        got += chunk.choices[0].delta.content or ""
            assert got.startswith("crashy:")  # what came before the crash was relayed
            assert "engine connection lost" in str(err.value)
            assert isinstance(err.value.body, dict)
            assert err.value.body["type"] == "upstream_error"
            assert err.value.body["code"] == 502
            assert sup.settled() and sup.double_releases == 0
            assert len(sup.failures) == 1 and sup.failures[0][0] == "crashy"
            assert "mid-stream" in sup.failures[0][1]
            assert wait_for(lambda: not es["crashy"].alive(), timeout_s=5)


def test_engine_dying_before_a_buffered_answer_is_502() -> None:
    with engines(StubEngine("crashy", "crashy", "--stub-crash-after", "1")) as es:
        sup = TestSupervisor(dict(es))
        with running_router(sup) as router:
            with pytest.raises(openai.InternalServerError) as err:
                client(router).chat.completions.create(
                    model="crashy", messages=CHAT)
            assert err.value.status_code == 502
            assert len(sup.failures) == 1
            # The engine is gone now: the next request is refused before any byte. It is
            # reported, and sent once more over a new lease (a real supervisor restarts the
            # engine meanwhile; this one hands out the same dead engine): then 502.
            with pytest.raises(openai.InternalServerError) as err:
                client(router).completions.create(model="crashy", prompt="x", stream=True)
            assert err.value.status_code == 502 and "could not be reached" in str(err.value)
            assert len(sup.failures) == 3
            assert all("could not be reached" in why for _, why in sup.failures[1:])
            assert sup.settled() and sup.acquired == 3 and sup.double_releases == 0
            assert in_flight(router.app) == 0


class _Releases:
    """Just what a ProxyResponse calls on its supervisor."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, lease: object) -> None:
        self.released.append(getattr(lease, "model", "?"))

    def report_failure(self, lease: object, reason: str) -> None:
        pass


@pytest.mark.parametrize("external", [False, True])
async def test_a_revoked_exchange_says_what_happens_next(external: bool) -> None:
    """The supervisor fails the engine under a request: the client gets 503 at once, with what
    vlmhub does next: restart a managed engine, or check an external endpoint again (it
    cannot restart that one)."""
    from vlmhub.control.contract import Lease
    from vlmhub.router.proxy import create_session, forward

    done = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await done.wait()  # no answer until the test is over
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hang)
    revoked: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    sup, sent = _Releases(), []
    async with serve_app(app) as url:
        lease = Lease("m", url, "m", external=external, revoked=revoked)
        session = create_session()
        try:
            resp = await forward(session, sup, lease, method="POST",  # type: ignore[arg-type]
                                 path="/v1/chat/completions", body=b"{}")
            never = asyncio.Event()

            async def receive() -> dict[str, object]:
                await never.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, object]) -> None:
                sent.append(message)

            asyncio.get_running_loop().call_later(0.2, revoked.set_result, "engine not answering")
            await asyncio.wait_for(resp({"type": "http"}, receive, send), 10)  # type: ignore[arg-type]
        finally:
            done.set()
            await session.close()
    assert sent[0]["status"] == 503 and sup.released == ["m"]
    message = json.loads(sent[1]["body"])["error"]["message"]  # type: ignore[arg-type]
    assert "engine not answering" in message and "incomplete" in message
    if external:
        assert "checks the endpoint again" in message and "restarts" not in message
    else:
        assert "restarts the engine" in message
