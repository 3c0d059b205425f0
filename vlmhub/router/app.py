"""The router's HTTP app: OpenAI-compatible routes in front of the supervisor, plus admin.

One Starlette app per router. Each request is handled in its own task on the event loop; the
handlers parse only what routing needs (the body's ``"model"`` and ``"stream"``), wait
(asynchronously) in :meth:`SupervisorLike.acquire` for a lease, and hand the request to
:func:`vlmhub.router.proxy.forward`. Nothing here blocks the loop. One
:class:`~vlmhub.router.watch.ClientWatch` task per request watches the client from the wait
for a lease to the last byte; a lease granted at once costs no other task. The app owns the pooled
aiohttp session of the data path: it is opened at lifespan start-up and closed at shutdown.

``app.state.draining`` (see :func:`drain`) makes new ``/v1`` requests answer 503 while the
ones in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlmhub.config.schema import Config
from vlmhub.control.contract import AcquireError, Lease, ReplicaInfo, SupervisorLike
from vlmhub.router.access import AccessMiddleware, request_info
from vlmhub.router.admin import admin_routes, replica_json
from vlmhub.router.batches import batch_routes
from vlmhub.router.body import parse_request, read_body, too_deep
from vlmhub.router.errors import (
    DEFAULT_RETRY_AFTER_S,
    acquire_error_response,
    error_response,
    unknown_model_response,
)
from vlmhub.router.guard import BrowserGuard
from vlmhub.router.keys import KeyRecord, identify, rate_limited
from vlmhub.router.loading import LoadingResponse, ReasoningChunks, progress_mode
from vlmhub.router.metrics import RouterMetrics
from vlmhub.router.multipart import with_field
from vlmhub.router.openapi import openapi_routes
from vlmhub.router.params import ruled
from vlmhub.router.proxy import create_session, forward
from vlmhub.router.settings import RouterSettings
from vlmhub.router.state import Reject, RouterState, router_state
from vlmhub.router.ui import ui_routes
from vlmhub.router.usage import UsageLedger
from vlmhub.router.watch import ClientWatch

log = logging.getLogger("vlmhub.router")
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before an answer

PROXIED: dict[str, str] = {  # client path -> engine path
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
    "/v1/responses": "/v1/responses",
    "/tokenize": "/tokenize",
    "/v1/tokenize": "/tokenize",
    "/detokenize": "/detokenize",
    "/v1/detokenize": "/detokenize",
    # vLLM's other model routes (docs/api.md): speech (multipart forms) and pooling models
    "/v1/audio/transcriptions": "/v1/audio/transcriptions",
    "/v1/audio/translations": "/v1/audio/translations",
    "/v1/rerank": "/v1/rerank",
    "/rerank": "/rerank",
    "/v2/rerank": "/v2/rerank",
    "/v1/score": "/v1/score",
    "/score": "/score",
    "/pooling": "/pooling",
    "/classify": "/classify",
}


def require_api_key(request: Request, settings: RouterSettings) -> KeyRecord:
    """The request's key (vlmhub.router.keys); raise :class:`Reject` (401, OpenAI shape)
    unless it carries a valid, unexpired key (any request passes when no key is set)."""
    key = identify(request, settings.keys, time.time())
    if isinstance(key, Response):
        raise Reject(key)
    return key


def v1_auth(request: Request) -> None:
    """The /v1 key check of the Batch and Files routes (:func:`require_api_key`)."""
    require_api_key(request, router_state(request).settings)


def unknown_model(model: str, supervisor: SupervisorLike, key: KeyRecord | None = None) -> Reject:
    return Reject(unknown_model_response(model, supervisor, key.visible if key else None))


async def proxy_endpoint(request: Request) -> Response:
    """POST a model route: auth, body, model, lease, forward. Blocks while the model loads."""
    st = router_state(request)
    settings = st.settings  # read once: a reload swaps the object, never changes it
    started = time.monotonic()
    model: str | None = None
    watch: ClientWatch | None = None
    handed_off = False
    status = 500
    st.in_flight += 1
    try:
        key = require_api_key(request, settings)
        if request.app.state.draining:
            raise Reject(error_response(503, "vlmhub is shutting down; retry shortly.",
                                        "service_unavailable", "shutting_down"))
        body = await read_body(request, settings.max_body, settings.body_timeout_s)
        payload, form = parse_request(body, request.headers)
        wanted = payload.get("model")
        if not isinstance(wanted, str) or not wanted:
            raise Reject(error_response(400, "the request needs a \"model\" (a string): one of "
                                        + (", ".join(st.supervisor.names()) or "none"),
                                        "invalid_request_error", "missing_model", param="model"))
        model = st.supervisor.resolve(wanted)
        info = request_info(request.scope)
        if info is not None:
            info.model, info.asked = model or wanted, wanted
        if model is None or not key.allows(model):  # the same 404 either way
            raise unknown_model(wanted, st.supervisor, key)
        if (limited := st.limiter.admit(key)) is not None:
            raise Reject(rate_limited(key, *limited, wanted))
        if form is None:  # the model's params rules (none: the same body, no cost)
            body, payload = ruled(st.config, model, body, payload)
        priority = request_priority(request)
        queued_at = time.monotonic()
        watch = ClientWatch(request.receive)
        stream = payload.get("stream") is True
        label, answered = model, [False]
        tap = st.meter(key, model)

        def headers_sent(code: int) -> None:
            if not answered[0]:
                answered[0] = True
                st.metrics.observe_request(label, code, time.monotonic() - started)

        def finished() -> None:
            st.in_flight -= 1
            if not answered[0]:  # the client left before the engine answered
                st.metrics.observe_request(label, CLIENT_CLOSED, None)

        async def proxy(lease: Lease, committed: bool = False) -> Response:
            """The response forwarding the request over ``lease`` (it owns the lease)."""
            headers: list[tuple[str, str]] = request.headers.items()
            if info is not None:
                info.queue_ms = (time.monotonic() - queued_at) * 1000
                info.replica = f"{lease.replica or label}@{lease.base_url.rsplit(':', 1)[-1]}"
                if info.generated:  # the engine sees the same id as the client
                    headers = [*headers, ("x-request-id", info.request_id)]
            sent, parsed = (body, payload) if form is None else (
                with_field(body, form, "model", lease.api_name), None)
            try:
                return await forward(
                    st.http(), st.supervisor, lease, method="POST",
                    path=PROXIED[request.scope["path"]],
                    query=request.scope["query_string"].decode("latin-1"), headers=headers,
                    body=sent, payload=parsed, stream=stream, on_headers=headers_sent,
                    on_finish=finished, watch=watch, committed=committed,
                    reacquire=lambda: _acquire(st.supervisor, model, priority), usage=tap)
            except BaseException as exc:
                st.supervisor.release(lease)  # never handed off: give it back here
                if isinstance(exc, RecursionError):  # re-encoding a deep body (model rewrite)
                    raise too_deep() from None
                raise

        progress = progress_mode(request.headers, st.config.router.loading_progress) if (
            stream) else "off"
        if progress != "off" and settings.loading_comments_s > 0 and (
                st.supervisor.would_wait(model)):
            # it has to wait for its model: stream loading comments (or reasoning) meanwhile
            acquiring = asyncio.ensure_future(_acquire(st.supervisor, model, priority))
            handed_off = True

            async def committed_proxy(lease: Lease) -> Response:
                return await proxy(lease, committed=True)

            def ended(code: int) -> None:
                st.in_flight -= 1
                st.metrics.observe_request(label, code, time.monotonic() - started)

            return LoadingResponse(st.supervisor, model, acquiring, watch,
                                   every_s=settings.loading_comments_s,
                                   make_proxy=committed_proxy, on_end=ended,
                                   reasoning=ReasoningChunks(wanted) if progress == "reasoning"
                                   and request.scope["path"] == "/v1/chat/completions" else None)
        watch.arm()  # a hang-up while queued cancels the acquire (it gives its slot back)
        try:
            lease = await _acquire(st.supervisor, model, priority)  # inline when ready: no task
        except asyncio.CancelledError:
            watch.disarm()
            if watch.caught() is None:
                raise
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        finally:
            watch.disarm()
        response = await proxy(lease)
        handed_off = True
        return response
    except Reject as reject:
        status = reject.response.status_code
        return reject.response
    except AcquireError as exc:
        status = exc.status
        return acquire_error_response(exc)
    except ClientDisconnect:
        status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not handed_off:
            if watch is not None:
                watch.close()
            st.in_flight -= 1
            st.metrics.observe_request(model, status, time.monotonic() - started)


async def _acquire(supervisor: SupervisorLike, model: str, priority: str | None) -> Lease:
    if priority is None:
        return await supervisor.acquire(model)
    return await supervisor.acquire(model, priority)


PRIORITY_HEADER = "x-vlmhub-priority"


def request_priority(request: Request) -> str | None:
    """The request's ``X-Vlmhub-Priority`` (``interactive`` or ``batch``), or None: the model's
    own. Anything else is a 400."""
    value = request.headers.get(PRIORITY_HEADER)
    if value is None:
        return None
    value = value.strip().lower()
    if value not in ("interactive", "batch"):
        raise Reject(error_response(
            400, f"{PRIORITY_HEADER} must be `interactive` or `batch`, not {value[:40]!r}",
            "invalid_request_error", "invalid_priority"))
    return value


def model_card(info: ReplicaInfo, created: int) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": info.name, "object": "model", "created": created, "owned_by": "vlmhub",
        "state": info.state, "phase": info.phase, "aliases": list(info.aliases),
        "in_flight": info.in_flight, "queued": info.queued,
    }
    if info.max_model_len is not None:
        card["max_model_len"] = info.max_model_len
    if info.node:  # the GPU node it runs on (the Ray runtime); absent with one GPU
        card["node"] = info.node
    return card


async def list_models(request: Request) -> Response:
    """GET /v1/models: every configured model with its live state (a snapshot)."""
    st = router_state(request)
    try:
        key = require_api_key(request, st.settings)
    except Reject as reject:
        return reject.response
    data = [model_card(i, st.created) for i in st.supervisor.snapshot() if key.allows(i.name)]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    """GET /v1/models/{model}: one model (aliases accepted)."""
    st = router_state(request)
    wanted = request.path_params["model"]
    try:
        key = require_api_key(request, st.settings)
        name = st.supervisor.resolve(wanted)
        info = next((i for i in st.supervisor.snapshot() if i.name == name), None)
        if info is None or not key.allows(info.name):
            raise unknown_model(wanted, st.supervisor, key)
    except Reject as reject:
        return reject.response
    return JSONResponse(model_card(info, st.created))


async def health(request: Request) -> Response:
    """GET /health (no key): the router is up; each model's state. 503 while draining."""
    st = router_state(request)
    models = {i.name: i.state for i in st.supervisor.snapshot()}
    if request.app.state.draining:
        return JSONResponse({"status": "draining", "models": models}, status_code=503,
                            headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)})
    return JSONResponse({"status": "ok", "models": models})


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text, gauges refreshed from a supervisor snapshot."""
    st = router_state(request)
    body = st.metrics.render(st.supervisor.snapshot())
    return Response(body, media_type=st.metrics.content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, kind, exc.status_code,
                          dict(exc.headers) if exc.headers else None)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """500 naming the request id, never the exception (its text may hold a secret or a path):
    the router's log has the traceback (masked) under the same id."""
    info = request_info(request.scope)
    rid = info.request_id if info is not None else uuid.uuid4().hex
    log.error("internal error on %s %s (request %s)", request.method, request.url.path, rid,
              exc_info=exc, extra={"request_id": rid})
    return error_response(500, f"internal error in vlmhub (request id {rid}); the router's log "
                          "has the details under that id.", "internal_error", 500,
                          {"x-request-id": rid})


def create_app(
    supervisor: SupervisorLike, config: Config, *, metrics: RouterMetrics | None = None
) -> Starlette:
    """The router app over ``supervisor``. Keys come from the config and ``VLMHUB_API_KEYS``;
    :func:`apply_settings` changes the router's settings of a running app (a reload)."""
    metrics = metrics or RouterMetrics()
    state = RouterState(supervisor=supervisor, config=config, metrics=metrics,
                        settings=RouterSettings.from_config(config), usage=UsageLedger(metrics))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.session = create_session()
        try:
            yield
        finally:
            await state.session.close()

    routes = [Route(path, proxy_endpoint, methods=["POST"]) for path in PROXIED]
    routes += [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *batch_routes(v1_auth),  # docs/api.md
        *admin_routes(),
        *ui_routes(),
        *openapi_routes(),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,
                    middleware=[Middleware(AccessMiddleware, state=state),
                                Middleware(BrowserGuard, state=state)])
    app.state.router = state
    app.state.draining = False
    return app


def apply_settings(app: Starlette, config: Config) -> list[str]:
    """Apply ``config``'s router settings to the running ``app`` from its next request on
    (:meth:`RouterState.apply`); the names of the changed ones that need a restart."""
    return cast(RouterState, app.state.router).apply(config)


def in_flight(app: Starlette) -> int:
    """Requests received and not yet fully answered."""
    return cast(RouterState, app.state.router).in_flight


async def drain(app: Starlette, timeout_s: float) -> bool:
    """Refuse new ``/v1`` requests (503) and wait until none is in flight or ``timeout_s``
    passes. Returns True when it drained. Blocks (asynchronously), polling every 50 ms."""
    app.state.draining = True
    deadline = time.monotonic() + timeout_s
    while in_flight(app) > 0:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(0.05, left))
    return True


__all__ = ["apply_settings", "create_app", "drain", "in_flight", "replica_json"]
