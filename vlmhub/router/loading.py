"""Loading progress for streaming clients: SSE comment lines while a model starts.

A streamed request (``"stream": true``) whose model is not ready would otherwise see nothing at
all until the engine is up, which for a real model takes minutes. When its lease is not granted
at once, :class:`LoadingResponse` answers ``200 text/event-stream`` straight away, sends one
SSE comment line at once and then every ``router.loading_comments_s`` seconds::

    : vlmhub loading dots-ocr: profiling (45 s)

SSE parsers (the OpenAI SDKs, browsers' EventSource) ignore comment lines, so the client's
stream is unchanged. When the lease comes, the engine's stream follows in the same response
(:class:`~vlmhub.router.proxy.ProxyResponse` with ``committed=True``). The status line has gone
out by then, so anything that fails afterwards (the start, the queue's timeout, an engine's
4xx) ends the stream with an SSE error event carrying the reason and the HTTP status it would
have had; the OpenAI SDKs raise ``APIError`` on it. ``x-vlmhub-queue-ms`` and
``x-vlmhub-replica`` are not known when the headers go out: the access log has them.

Runs in the request's own task; the one :class:`~vlmhub.router.watch.ClientWatch` of the
request cancels the wait when the client hangs up (the acquire gives its queue slot back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from vlmhub.control.contract import AcquireError, Lease, SupervisorLike
from vlmhub.router.errors import sse_error_event
from vlmhub.router.watch import ClientWatch

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
ProxyFactory = Callable[[Lease], Awaitable[Response]]
"""Makes the response that forwards the request over a granted lease (it owns the lease)."""


def loading_comment(supervisor: SupervisorLike, model: str, waited_s: float) -> bytes:
    """``: vlmhub loading MODEL: PHASE (N s)`` (with why it waits, when the policy defers it)."""
    info = next((i for i in supervisor.snapshot() if i.name == model), None)
    if info is None:
        what = "waiting"
    elif info.state == "ready":
        what = "queued" if info.draining else "ready"
    elif info.waiting_reason:
        what = f"queued: {info.waiting_reason}"
    else:
        what = info.phase or info.state
    text = f": vlmhub loading {model}: {what} ({waited_s:.0f} s)"
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\n\n"


class LoadingResponse(Response):
    """See the module docs. Owns ``acquire`` (a task waiting for the lease) and ``watch``."""

    def __init__(
        self,
        supervisor: SupervisorLike,
        model: str,
        acquire: asyncio.Future[Lease],
        watch: ClientWatch,
        *,
        every_s: float,
        make_proxy: ProxyFactory,
        on_end: Callable[[int], None],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.supervisor, self.model, self.acquire = supervisor, model, acquire
        self.watch, self.every_s = watch, every_s
        self.make_proxy, self.on_end = make_proxy, on_end
        self.began = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send comments until the lease comes, then hand over to the proxy. Blocks
        (asynchronously) for the whole exchange; never raises for a client or engine failure."""
        handed_over = False
        status = 499  # what the request comes to, for on_end (unless the proxy takes over)
        self.watch.arm()  # a hang-up cancels this task at its next await
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            lease = await self._wait(send)
            self.watch.disarm()
            proxy = await self.make_proxy(lease)  # owns the lease and the watch from now on
            handed_over = True
            await proxy(scope, receive, send)
        except AcquireError as exc:
            self.watch.disarm()
            status = exc.status
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "more_body": False,
                            "body": sse_error_event(str(exc), exc.error_type, exc.status)})
        except asyncio.CancelledError:
            self.watch.disarm()
            if self.watch.caught() is None:
                raise
        except OSError:  # the client's connection broke while a comment was written
            pass
        finally:
            self.watch.disarm()
            if not handed_over:
                self.acquire.cancel()  # gives the queue slot back; a lease granted meanwhile
                got = self.acquire  # is released
                if got.done() and not got.cancelled() and got.exception() is None:
                    self.supervisor.release(got.result())
                self.watch.close()
                self.on_end(status)

    async def _wait(self, send: Send) -> Lease:
        """Comment now and every ``every_s`` until the lease is granted (or the acquire
        fails: its AcquireError is raised)."""
        while True:
            comment = loading_comment(self.supervisor, self.model, time.monotonic() - self.began)
            await send({"type": "http.response.body", "body": comment, "more_body": True})
            done, _ = await asyncio.wait({self.acquire}, timeout=self.every_s)
            if done:
                return self.acquire.result()
