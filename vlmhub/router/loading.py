"""Loading progress for streaming clients: SSE comment lines while a model starts.

A streamed request (``"stream": true``) whose model is not ready would otherwise see nothing at
all until the engine is up, which for a real model takes minutes. When its lease is not granted
at once, :class:`LoadingResponse` answers ``200 text/event-stream`` straight away, sends one
SSE comment line at once and then every ``router.loading_comments_s`` seconds::

    : vlmhub loading dots-ocr: profiling (45 s)

SSE parsers (the OpenAI SDKs, browsers' EventSource) ignore comment lines, so the client's
stream is unchanged. Chat windows (Open WebUI, ...) drop them too: with
``router.loading_progress: reasoning`` (or the request's ``X-Vlmhub-Loading-Progress:
reasoning``) a streamed chat completion gets each line as a ``chat.completion.chunk`` whose
``delta.reasoning_content`` is ``Loading MODEL: PHASE (N s)`` (one id, the request's model,
``role: assistant`` in the first), which they show as a collapsible "thinking" block, the way
llama-swap's ``sendLoadingState`` does. ``off`` sends neither: the request just waits.

When the lease comes, the engine's stream follows in the same response
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
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from vlmhub.control.contract import AcquireError, Lease, SupervisorLike
from vlmhub.router.errors import error_response, sse_error_event
from vlmhub.router.state import Reject
from vlmhub.router.watch import ClientWatch

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
ProxyFactory = Callable[[Lease], Awaitable[Response]]
"""Makes the response that forwards the request over a granted lease (it owns the lease)."""


PROGRESS_HEADER = "x-vlmhub-loading-progress"
PROGRESS_MODES = ("comments", "reasoning", "off")


def progress_mode(headers: Mapping[str, str], configured: str) -> str:
    """The request's ``X-Vlmhub-Loading-Progress`` (``comments``, ``reasoning`` or ``off``),
    else ``configured`` (``router.loading_progress``). Anything else is a 400."""
    value = headers.get(PROGRESS_HEADER)
    if value is None:
        return configured
    value = value.strip().lower()
    if value not in PROGRESS_MODES:
        raise Reject(error_response(
            400, f"{PROGRESS_HEADER} must be comments, reasoning or off, not {value[:40]!r}",
            "invalid_request_error", "invalid_loading_progress"))
    return value


def loading_status(supervisor: SupervisorLike, model: str, waited_s: float) -> str:
    """``MODEL: PHASE (N s)`` (with why it waits, when the policy defers it), one line."""
    info = next((i for i in supervisor.snapshot() if i.name == model), None)
    if info is None:
        what = "waiting"
    elif info.state == "ready":
        what = "queued" if info.draining else "ready"
    elif info.waiting_reason:
        what = f"queued: {info.waiting_reason}"
    else:  # "stopped": this request's start has not begun yet
        what = info.phase or ("starting" if info.state == "stopped" else info.state)
    text = f"{model}: {what} ({waited_s:.0f} s)"
    return text.replace("\r", " ").replace("\n", " ")


def loading_comment(supervisor: SupervisorLike, model: str, waited_s: float) -> bytes:
    """``: vlmhub loading MODEL: PHASE (N s)``: an SSE comment line."""
    text = ": vlmhub loading " + loading_status(supervisor, model, waited_s)
    return text.encode("utf-8", "replace") + b"\n\n"


class ReasoningChunks:
    """``delta.reasoning_content`` chunks of one chat completion: one id, the request's
    model, ``role: assistant`` in the first only."""

    def __init__(self, model: str) -> None:
        self.model, self.first = model, True
        self.id = f"chatcmpl-vlmhub-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def event(self, text: str) -> bytes:
        delta: dict[str, str] = {"role": "assistant"} if self.first else {}
        self.first = False
        delta["reasoning_content"] = text
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [
                     {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


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
        reasoning: ReasoningChunks | None = None,
    ) -> None:
        self.status_code = 200
        self.reasoning = reasoning  # None: SSE comments
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
        """Comment (or a reasoning chunk) now and every ``every_s`` until the lease is granted
        (or the acquire fails: its AcquireError is raised)."""
        while True:
            waited = time.monotonic() - self.began
            if self.reasoning is None:
                line = loading_comment(self.supervisor, self.model, waited)
            else:
                status = loading_status(self.supervisor, self.model, waited)
                line = self.reasoning.event(f"Loading {status}\n")
            await send({"type": "http.response.body", "body": line, "more_body": True})
            done, _ = await asyncio.wait({self.acquire}, timeout=self.every_s)
            if done:
                return self.acquire.result()
