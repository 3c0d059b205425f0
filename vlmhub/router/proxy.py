"""The data path: forward one request to an engine and pass its answer back as it arrives.

All requests share one pooled :class:`aiohttp.ClientSession` (:func:`create_session`); httpx's
async pool was measured 6x slower under concurrency (docs: proxy-measurements). Bytes pass
through untouched (no decompression, no re-encoding) unless the model name must be rewritten.

:func:`forward` does no I/O: it returns a :class:`ProxyResponse`, an ASGI response that performs
the upstream exchange while it is being sent. Sending it blocks (asynchronously) for the whole
exchange, which runs in the sending task itself; the request's :class:`ClientWatch` (one task)
watches the client meanwhile, so a client that hangs up cancels the exchange and closes the
upstream connection, which makes vLLM abort the request. A revoked lease (the supervisor failed
the engine) cancels it the same way. The lease is released exactly once, when the response has
been sent, the client left, or the exchange failed. Many responses run concurrently on one
event loop; one response is never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from vlmhub.config.vision import advise_context_error
from vlmhub.control.contract import AcquireError, Lease, SupervisorLike
from vlmhub.router.endpoints import not_served
from vlmhub.router.errors import error_body, sse_error_event
from vlmhub.router.usage import UsageTap
from vlmhub.router.watch import CLIENT_LEFT, ClientWatch

log = logging.getLogger("vlmhub.router.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})  # fmt: skip
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
"""What a broken engine connection raises (refused, reset, cut mid-body, timed out)."""

HeadersCallback = Callable[[int], None]
FinishCallback = Callable[[], None]
Exchange = tuple[str, CIMultiDict[str], bytes]
"""(URL, headers, body) of the upstream request over one lease."""
Reacquire = Callable[[], Awaitable[Lease]]
"""Wait for a new lease on the request's model (raises AcquireError like the first acquire)."""
UNDELIVERED: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
"""A connection that failed before any byte of the request was sent (refused, reset while
connecting): the engine never saw the request, so sending it again is safe."""
RESTART_NOTICE_S = 15.0
"""How long an undelivered request waits for the supervisor to confirm that the engine failed
(it revokes the lease) before it gives up with a 502."""
REVOKED = "engine failed"
"""The :class:`ClientWatch` reason when the lease was revoked mid-exchange."""


def create_session(
    *, connect_timeout_s: float = 10.0, limit: int = 1024, keepalive_timeout_s: float = 4.0
) -> aiohttp.ClientSession:
    """The pooled client of the data path. Call inside the running event loop.

    No total timeout (generations and streams take as long as they take), a connect timeout,
    no decompression, no cookies. The keep-alive timeout stays under uvicorn's 5 s so a pooled
    connection is never reused just as vLLM closes it.
    """
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0,
                                     keepalive_timeout=keepalive_timeout_s)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                    sock_connect=connect_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


def upstream_headers(
    client_headers: Iterable[tuple[str, str]], api_key: str | None = None
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, Host, Content-Length and Authorization.

    The engine's own key (``api_key``) is sent instead when it has one. Without an
    Accept-Encoding from the client, ``identity`` is asked for, so no compressed bytes reach
    a client that did not ask for them.
    """
    pairs = list(client_headers)
    named = {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in pairs:
        low = key.lower()
        if low in DROP_REQUEST or low in named:
            continue
        out.add(key, value)
    if "accept-encoding" not in out:
        out["Accept-Encoding"] = "identity"
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def downstream_headers(
    headers: CIMultiDictProxy[str] | Mapping[str, str], *, streamed: bool
) -> list[tuple[bytes, bytes]]:
    """The engine's response headers to pass on, as raw ASGI headers."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
           if k.lower() not in DROP_RESPONSE
           and not (streamed and k.lower() in ("cache-control", "x-accel-buffering"))]
    if streamed:
        raw += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    return raw


def rewrite_model(body: bytes, payload: Mapping[str, Any] | None, api_name: str) -> bytes:
    """The body with ``"model"`` set to the engine's name; the original bytes when it matches."""
    if payload is None or payload.get("model") == api_name:
        return body
    return json.dumps({**payload, "model": api_name}, ensure_ascii=False,
                      separators=(",", ":")).encode()


async def forward(
    session: aiohttp.ClientSession,
    supervisor: SupervisorLike,
    lease: Lease,
    *,
    method: str,
    path: str,
    query: str = "",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    payload: Mapping[str, Any] | None = None,
    stream: bool = False,
    on_headers: HeadersCallback | None = None,
    on_finish: FinishCallback | None = None,
    watch: ClientWatch | None = None,
    committed: bool = False,
    reacquire: Reacquire | None = None,
    usage: UsageTap | None = None,
) -> ProxyResponse:
    """The response that forwards this request to ``lease.base_url`` when it is sent.

    ``payload`` is the parsed JSON body, if any: its ``"model"`` is rewritten to
    ``lease.api_name`` only when they differ. ``stream`` is the request's ``"stream": true``.
    ``on_headers(status)`` is called just before the response headers go out; ``on_finish()``
    once at the end, after the lease is released. ``watch`` is the request's hang-up watch,
    if the caller has one already (the response then owns and closes it; without one it makes
    its own). ``committed``: a ``200 text/event-stream`` status line has already been sent
    (:mod:`vlmhub.router.loading`); the engine's stream continues it, and any failure or
    non-stream answer becomes a final SSE error event. ``reacquire`` waits for a new lease on
    the same model (as the request's first acquire did): with it, a request the engine never
    received (its connection refused) waits for the engine's restart and is sent once more
    instead of failing. ``usage`` reads the answer's token usage (a stream asks the engine
    for it, see :class:`~vlmhub.router.usage.UsageTap`). The caller must send the response
    (it owns the lease from now on). Does no I/O itself.
    """
    client_headers = list(headers)
    target = path + (f"?{query}" if query else "")
    if usage is not None:
        body, payload = usage.prepare(body, payload, stream, path)

    def exchange_for(lease: Lease) -> Exchange:
        url = lease.base_url.rstrip("/") + target
        data = rewrite_model(body, payload, lease.api_name)
        return (url, upstream_headers(client_headers, lease.api_key),
                usage.request_body(data) if usage is not None else data)

    return ProxyResponse(
        session, supervisor, lease, method=method, exchange_for=exchange_for, stream=stream,
        on_headers=on_headers, on_finish=on_finish, watch=watch, committed=committed,
        reacquire=reacquire, usage=usage,
    )


class ProxyResponse(Response):
    """An ASGI response that runs one upstream exchange as it is sent (see module docs)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        supervisor: SupervisorLike,
        lease: Lease,
        *,
        method: str,
        exchange_for: Callable[[Lease], Exchange],
        stream: bool,
        on_headers: HeadersCallback | None = None,
        on_finish: FinishCallback | None = None,
        watch: ClientWatch | None = None,
        committed: bool = False,
        reacquire: Reacquire | None = None,
        usage: UsageTap | None = None,
    ) -> None:
        self.status_code = 0  # known once the engine answers
        self.usage = usage
        self.background = None
        self.session, self.supervisor, self.lease = session, supervisor, lease
        self.method, self.exchange_for, self.reacquire = method, exchange_for, reacquire
        self.url, self.upstream_headers, self.body = exchange_for(lease)
        self._held = True  # self.lease is ours to release (False between two leases)
        self.stream_requested = stream
        self.on_headers, self.on_finish = on_headers, on_finish
        self.watch = watch
        self.client_gone = False
        self.streaming = False
        self.upstream_failure: str | None = None
        self._finished = False
        self.committed = committed  # the status line went out already (SSE 200)
        if committed:
            self.status_code, self.streaming = 200, True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the exchange in this task while the client is watched; release the lease at the
        end. Blocks (asynchronously) until the last byte is sent, the client has gone, or the
        engine failed. Never raises for an engine or client failure.
        """
        watch = self.watch if self.watch is not None else ClientWatch(receive)
        self.watch = watch
        revoked = self.lease.revoked
        self._follow(self.lease)
        watch.arm()  # no await from here to the try: a cancellation lands inside it
        try:
            if watch.gone:
                self.client_gone = True
            elif revoked is None or not revoked.done():
                await self._exchange(send)
            else:
                watch.disarm()
                await self._revoked(send, revoked.result())
        except asyncio.CancelledError:
            watch.disarm()
            reason = watch.caught()
            if reason is None:
                raise
            if reason == CLIENT_LEFT:
                self.client_gone = True  # _exchange's finally closed the upstream connection
            elif self.lease.revoked is not None and self.lease.revoked.done():
                await self._revoked(send, self.lease.revoked.result())
        finally:
            watch.disarm()
            self._unfollow(self.lease)
            watch.close()
            self._finish()

    def _engine_failed(self, fut: asyncio.Future[str]) -> None:
        if not fut.cancelled() and self.watch is not None:
            self.watch.interrupt(REVOKED)

    def _follow(self, lease: Lease) -> None:
        """A revocation of ``lease`` (its engine failed) interrupts the exchange."""
        if lease.revoked is not None:
            lease.revoked.add_done_callback(self._engine_failed)

    def _unfollow(self, lease: Lease) -> None:
        if lease.revoked is not None:
            lease.revoked.remove_done_callback(self._engine_failed)

    async def _revoked(self, send: Send, reason: str) -> None:
        """The supervisor failed the engine under this exchange: tell the client now."""
        self.upstream_failure = reason
        then = ("vlmhub checks the endpoint again before routing to it" if self.lease.external
                else "vlmhub restarts the engine on the next request")
        message = f"Model {self.lease.model!r}: {reason}. The answer is incomplete; {then}."
        with contextlib.suppress(OSError, RuntimeError):
            if self.status_code == 0:
                await self._send_error(send, 503, message)
            elif self.streaming:
                await self._send_body(send, sse_error_event(message), more=True)
                await self._send_body(send, b"", more=False)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            if self.usage is not None:
                self.usage.finish()
            if self._held:
                self.supervisor.release(self.lease)
        finally:
            if self.on_finish is not None:
                self.on_finish()

    def _fail(self, reason: str) -> None:
        self.upstream_failure = reason
        log.warning("model %s: %s", self.lease.model, reason)
        self.supervisor.report_failure(self.lease, reason)

    async def _start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.on_headers is not None:
            self.on_headers(status)
        if self.committed:
            return
        self.status_code = status
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_body(self, send: Send, body: bytes, more: bool) -> None:
        if not more and self.watch is not None:
            self.watch.disarm()  # the answer is complete: nothing may cut it short now
        message: Message = {"type": "http.response.body", "body": body, "more_body": more}
        await send(message)

    async def _send_error(self, send: Send, status: int, message: str) -> None:
        if self.committed:  # the client has a 200 stream: the error is its last event
            if self.on_headers is not None:
                self.on_headers(status)
            kind = "invalid_request_error" if 400 <= status < 500 else "upstream_error"
            await self._send_body(send, sse_error_event(message, kind, status), more=True)
            await self._send_body(send, b"", more=False)
            return
        body = json.dumps(error_body(message, "upstream_error", status)).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if status in (502, 503, 504):
            headers.append((b"retry-after", b"5"))
        await self._start(send, status, headers)
        await self._send_body(send, body, more=False)

    async def _request(self) -> aiohttp.ClientResponse:
        return await self.session.request(
            self.method, URL(self.url, encoded=True), headers=self.upstream_headers,
            data=self.body or None, allow_redirects=False)

    async def _exchange(self, send: Send) -> None:
        try:
            try:
                resp = await self._request()
            except UNDELIVERED as exc:
                if not await self._wait_for_restart(send, f"engine could not be reached: "
                                                          f"{_describe(exc)}"):
                    raise
                resp = await self._request()  # once: a second failure is the client's 502
        except AcquireError:
            return  # answered by _wait_for_restart
        except UPSTREAM_ERRORS as exc:
            timeout = isinstance(exc, TimeoutError)
            what = "did not accept the connection in time" if timeout else "could not be reached"
            self._fail(f"engine {what}: {_describe(exc)}")
            await self._send_error(
                send, 504 if timeout else 502,
                f"The engine of model {self.lease.model!r} {what} ({_describe(exc)}). vlmhub is "
                "checking it; retry in a few seconds.")
            return
        completed = False
        try:
            sse = resp.content_type == "text/event-stream"
            if self.committed and (resp.status != 200 or not sse):
                completed = await self._relay_as_event(resp, send)
            elif sse or (self.stream_requested and resp.status != 400):  # a 400 is JSON
                completed = await self._relay_stream(resp, send, sse)
            else:
                completed = await self._relay_buffered(resp, send)
        finally:
            if completed:
                resp.release()  # back to the pool
            else:
                resp.close()  # drop the connection: vLLM sees the client leave and aborts

    async def _wait_for_restart(self, send: Send, reason: str) -> bool:
        """The request never reached the engine: report the failure, wait (up to
        :data:`RESTART_NOTICE_S`) until the supervisor has failed the engine, then swap the lease
        for one on the restarted engine (the queue's own timeout applies, like a cold model)
        and aim the request at it. False when it cannot be retried (no ``reacquire``, an
        external endpoint, or the supervisor still calls the engine healthy): the caller
        answers 502. An AcquireError (no new lease) is answered here and raised. The client's
        hang-up cancels the wait (the request's watch stays armed)."""
        old = self.lease
        if self.reacquire is None or old.external:
            return False
        log.warning("model %s: %s; the request was not delivered: it waits for the restart",
                    old.model, reason)
        self._unfollow(old)  # the revocation this report causes must not end the request
        self.supervisor.report_failure(old, reason)
        if old.revoked is not None:
            done, _ = await asyncio.wait({old.revoked}, timeout=RESTART_NOTICE_S)
            if not done:  # the engine answers its health check: not a restart to wait for
                self._follow(old)
                return False
        self._held = False
        self.supervisor.release(old)
        try:
            self.lease = await self.reacquire()
        except AcquireError as exc:
            self.upstream_failure = str(exc)
            await self._send_error(send, exc.status, str(exc))
            raise
        self._held = True
        self._follow(self.lease)
        self.url, self.upstream_headers, self.body = self.exchange_for(self.lease)
        return True

    async def _relay_buffered(self, resp: aiohttp.ClientResponse, send: Send) -> bool:
        try:
            body = await resp.read()
        except UPSTREAM_ERRORS as exc:
            self._fail(f"engine connection lost before the answer was complete: "
                       f"{_describe(exc)}")
            await self._send_error(
                send, 502, f"Model {self.lease.model!r}: engine connection lost before the "
                "answer was complete. vlmhub is checking the engine; retry in a few seconds.")
            return False
        if resp.status == 400:  # an image too large for the context: say how to fix it
            body = advise_context_error(body, self.lease.model)
        elif resp.status == 404:  # a route this model's engine does not serve: say so
            body = not_served(body, self.lease.model, self.url)
        elif resp.status == 200 and self.usage is not None:
            self.usage.body(body)
        headers = downstream_headers(resp.headers, streamed=False)
        headers.append((b"content-length", str(len(body)).encode()))
        await self._start(send, resp.status, headers)
        await self._send_body(send, body, more=False)
        return True

    async def _relay_as_event(self, resp: aiohttp.ClientResponse, send: Send) -> bool:
        """Committed to a 200 stream, the engine answered something else (an error, a JSON
        body): pass its message on as the stream's final error event, with its status."""
        try:
            body = await resp.read()
        except UPSTREAM_ERRORS as exc:
            self._fail(f"engine connection lost before the answer was complete: "
                       f"{_describe(exc)}")
            await self._send_error(send, 502, f"Model {self.lease.model!r}: engine connection "
                                   "lost before the answer was complete.")
            return False
        if resp.status == 400:
            body = advise_context_error(body, self.lease.model)
        await self._send_error(send, resp.status if resp.status >= 400 else 502,
                               _error_message(body, resp.status))
        return True

    async def _relay_stream(self, resp: aiohttp.ClientResponse, send: Send, sse: bool) -> bool:
        """Pass chunks on as they arrive (no buffering). Returns True if the engine finished."""
        self.streaming = True
        await self._start(send, resp.status, downstream_headers(resp.headers, streamed=True))
        tap = self.usage if sse and resp.status == 200 else None  # whole events, usage read
        while True:
            try:
                chunk = await resp.content.readany()
            except UPSTREAM_ERRORS as exc:
                self._fail(f"engine connection lost mid-stream: {_describe(exc)}")
                if tap is not None and (rest := tap.flush()):
                    await self._send_body(send, rest, more=True)
                if sse:
                    msg = (f"Model {self.lease.model!r}: engine connection lost mid-stream; "
                           "the answer is incomplete. vlmhub is checking the engine.")
                    await self._send_body(send, sse_error_event(msg), more=True)
                await self._send_body(send, b"", more=False)
                return False
            if not chunk:
                if tap is not None and (rest := tap.flush()):
                    await self._send_body(send, rest, more=True)
                await self._send_body(send, b"", more=False)
                return True
            if tap is not None:
                chunk = tap.feed(chunk)
                if not chunk:
                    continue
            await self._send_body(send, chunk, more=True)


def _error_message(body: bytes, status: int) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the body's start."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        msg = json.loads(body)["error"]["message"]
        if isinstance(msg, str):
            return msg
    text = body[:500].decode("utf-8", "replace").strip()
    return f"the engine answered HTTP {status}" + (f": {text}" if text else "")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

