"""``/v1/batches``: create, list, get and cancel batches (OpenAI's Batch API), and the wiring
of the Batch and Files API into the router app.

:func:`batch_routes` is what :func:`vlmhub.router.app.create_app` registers (files and
batches); :func:`attach_batches` gives a router its store (``<state_dir>/batches``) and runs
the :class:`~vlmhub.router.batch_runner.BatchRunner` for the app's lifespan, wrapped around the
app's own (the runner starts after the data-path session opens and is cancelled before it
closes). Without it the routes answer 404. Handlers run on the event loop and never wait for
a batch's lines. A batch belongs to the key that created it (its fingerprint is kept, never
the key); other keys get 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlmhub.router.batch_lines import ENDPOINTS
from vlmhub.router.batch_runner import BatchRunner
from vlmhub.router.batch_store import WINDOWS, BatchStore, page, public
from vlmhub.router.body import parse_payload, read_body
from vlmhub.router.files import (
    FILE_HANDLERS,
    Auth,
    BatchApi,
    Handler,
    bad_request,
    guarded,
    limit_arg,
    visible,
)
from vlmhub.router.state import RouterState

log = logging.getLogger("vlmhub.router.batches")
CREATE_BODY_LIMIT = 64 * 1024


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in value.items())):
        raise bad_request("metadata must be an object of at most 16 string keys (64 "
                          "characters) and string values (512 characters)", "invalid_metadata",
                          "metadata")
    return cast(dict[str, str], value)


async def create_batch(request: Request, api: BatchApi, owner: str | None) -> Response:
    """POST /v1/batches: ``validating`` at once; the runner validates and runs it."""
    payload = parse_payload(await read_body(request, CREATE_BODY_LIMIT, 30.0))
    file_id = payload.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise bad_request("input_file_id is required (the id files.create returned)",
                          "missing_required_parameter", "input_file_id")
    source = api.store.files.get(file_id)
    if source is None or source.get("owner") != owner:
        raise bad_request(f"No such File object: {file_id[:100]!r}", "invalid_file",
                          "input_file_id")
    if source["purpose"] != "batch":
        raise bad_request(f"File {file_id} has purpose {source['purpose']!r}; a batch's input "
                          "needs purpose `batch`", "invalid_file", "input_file_id")
    endpoint = payload.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, not "
                          f"{str(endpoint)[:100]!r}", "invalid_endpoint", "endpoint")
    window = payload.get("completion_window")
    if window not in WINDOWS:
        raise bad_request(f"completion_window must be one of {', '.join(WINDOWS)}, not "
                          f"{str(window)[:40]!r}", "invalid_completion_window",
                          "completion_window")
    rec = api.store.new_batch(file_id, cast(str, endpoint), cast(str, window),
                              _metadata(payload.get("metadata")), owner)
    api.runner.wake()
    return JSONResponse(public(rec))


async def list_batches(request: Request, api: BatchApi, owner: str | None) -> Response:
    """GET /v1/batches (``limit``: 1-100, default 20; ``after``), newest first."""
    mine = [r for r in api.store.batches.values() if r.get("owner") == owner]
    return JSONResponse(page(mine, limit=limit_arg(request, 20, 100),
                             after=request.query_params.get("after")))


async def get_batch(request: Request, api: BatchApi, owner: str | None) -> Response:
    """GET /v1/batches/{batch_id}."""
    return JSONResponse(public(visible(api.store.batches, request.path_params["batch_id"],
                                       owner, "Batch")))


async def cancel_batch(request: Request, api: BatchApi, owner: str | None) -> Response:
    """POST /v1/batches/{batch_id}/cancel: ``cancelling`` now, ``cancelled`` once the lines in
    flight have finished; 409 for a batch that has already ended."""
    rec = visible(api.store.batches, request.path_params["batch_id"], owner, "Batch")
    if not api.runner.cancel(rec):
        raise bad_request(f"Cannot cancel a batch with status {rec['status']}.",
                          "batch_not_cancellable", status=409)
    return JSONResponse(public(rec))


BATCH_HANDLERS: list[tuple[str, Handler, str]] = [
    ("/v1/batches", create_batch, "POST"),
    ("/v1/batches", list_batches, "GET"),
    ("/v1/batches/{batch_id}", get_batch, "GET"),
    ("/v1/batches/{batch_id}/cancel", cancel_batch, "POST"),
]


def batch_routes(auth: Auth) -> list[Route]:
    """The files and batches routes; ``auth`` is the app's /v1 key check."""
    by_path: dict[str, dict[str, Handler]] = {}
    for path, handler, method in [*FILE_HANDLERS, *BATCH_HANDLERS]:
        by_path.setdefault(path, {})[method] = handler
    routes = []
    for path, methods in by_path.items():
        endpoints = {m: guarded(h, auth) for m, h in methods.items()}

        async def dispatch(request: Request, endpoints: Any = endpoints) -> Response:
            return cast(Response, await endpoints[request.method](request))

        routes.append(Route(path, dispatch, methods=list(methods)))
    return routes


def attach_batches(app: Starlette, state_dir: Path,
                   clock: Callable[[], float] = time.time) -> BatchApi:
    """Serve files and batches from ``<state_dir>/batches`` and run them for the app's
    lifespan (see the module docs). Loads the store now (blocks on the disk: start-up)."""
    state = cast(RouterState, app.state.router)
    store = BatchStore(state_dir, clock)
    store.open()
    runner = BatchRunner(store, lambda: cast(RouterState, app.state.router),
                         state.config.router.batch)
    api = BatchApi(store, runner)
    app.state.batches = api
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Starlette) -> AsyncIterator[Any]:
        async with inner(a) as inner_state:
            task = asyncio.create_task(runner.run())
            task.add_done_callback(_log_end)
            try:
                yield inner_state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
    return api


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batch runner stopped", exc_info=task.exception())


def openapi_paths(error: dict[str, Any]) -> dict[str, Any]:
    """The files and batches routes for /openapi.json (``error``: the error object's schema)."""
    obj = {"application/json": {"schema": {"type": "object"}}}
    why = {400: "Bad request (a missing or wrong field)", 401: "Missing or wrong key",
           404: "No such file or batch (or no state dir)", 409: "Not in a state that allows it",
           413: "The file is over router.batch.max_file_mib"}

    def op(summary: str, *codes: int, body: dict[str, Any] | None = None,
           content: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "summary": summary, "security": [{"apiKey": []}, {}],
            "responses": {"200": {"description": summary, "content": content or obj},
                          **{str(c): {"description": why[c], "content": {
                              "application/json": {"schema": error}}} for c in codes}}}
        if body is not None:
            out["requestBody"] = {"required": True, "content": body}
        return out

    def ident(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    upload = {"multipart/form-data": {"schema": {"type": "object", "required": [
        "file", "purpose"], "properties": {"file": {"type": "string", "format": "binary"},
                                           "purpose": {"type": "string", "enum": ["batch"]}}}}}
    create = {"application/json": {"schema": {"type": "object", "required": [
        "input_file_id", "endpoint", "completion_window"], "properties": {
        "input_file_id": {"type": "string"}, "endpoint": {"type": "string", "enum": [*ENDPOINTS]},
        "completion_window": {"type": "string", "enum": [*WINDOWS]},
        "metadata": {"type": "object"}}}}}
    return {
        "/v1/files": {"post": op("Upload a batch input file", 400, 401, 404, 413, body=upload),
                      "get": op("The files", 400, 401, 404)},
        "/v1/files/{file_id}": {
            "get": {**op("One file", 401, 404), "parameters": ident("file_id")},
            "delete": {**op("Delete a file", 401, 404, 409), "parameters": ident("file_id")}},
        "/v1/files/{file_id}/content": {"get": {
            **op("A file's bytes (JSONL)", 401, 404, content={
                "application/jsonl": {"schema": {"type": "string"}}}),
            "parameters": ident("file_id")}},
        "/v1/batches": {"post": op("Create a batch", 400, 401, 404, body=create),
                        "get": op("The batches, newest first", 400, 401, 404)},
        "/v1/batches/{batch_id}": {"get": {**op("One batch", 401, 404),
                                           "parameters": ident("batch_id")}},
        "/v1/batches/{batch_id}/cancel": {"post": {**op("Cancel a batch", 401, 404, 409),
                                                   "parameters": ident("batch_id")}},
    }
