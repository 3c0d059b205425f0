"""``/v1/files``: upload, list, get, delete and download files (OpenAI's Files API, for
batches: ``purpose: batch`` input files and the ``batch_output`` files batches write).

Handlers run on the event loop; an upload is read into memory (up to
``router.batch.max_file_mib``, else 413) and written to the state dir in a worker thread.
With ``router.api_keys`` set every route needs a key, and a file is seen only by the key that
created it (404 for the others). :func:`api` and :func:`guarded` are shared with
:mod:`vlmhub.router.batches`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from vlmhub.router.batch_runner import BatchRunner
from vlmhub.router.batch_store import BatchStore, Record, key_identity, page, public
from vlmhub.router.body import read_body
from vlmhub.router.errors import error_response
from vlmhub.router.state import Reject, bearer, router_state

MIB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024
"""Bytes a multipart upload may carry beyond its file (boundaries, headers, ``purpose``)."""
Auth = Callable[[Request], None]
"""Raises :class:`Reject` (401) unless the request may use /v1 (the app's key check)."""
Handler = Callable[[Request, "BatchApi", "str | None"], Awaitable[Response]]


@dataclass
class BatchApi:
    """What the files and batches handlers share (``app.state.batches``)."""

    store: BatchStore
    runner: BatchRunner


def bad_request(message: str, code: str | None = None, param: str | None = None,
                status: int = 400) -> Reject:
    return Reject(error_response(status, message, "invalid_request_error", code, param=param))


def not_found(kind: str, object_id: str) -> Reject:
    return bad_request(f"No such {kind}: {object_id[:100]!r}", "not_found", status=404)


def guarded(handler: Handler, auth: Auth) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint: key check, then ``handler(request, api, owner)``; a Reject answers."""

    async def endpoint(request: Request) -> Response:
        try:
            auth(request)
            api = getattr(request.app.state, "batches", None)
            if not isinstance(api, BatchApi):
                raise bad_request("The Batch and Files API is served by `vlmhub route` (it "
                                  "keeps files in the router's state dir).", "not_served",
                                  status=404)
            owner = key_identity(bearer(request)) if router_state(request).api_keys else None
            return await handler(request, api, owner)
        except Reject as reject:
            return reject.response

    return endpoint


def visible(records: dict[str, Record], object_id: str, owner: str | None, kind: str) -> Record:
    """The record ``object_id`` if ``owner`` may see it, else a 404 Reject."""
    rec = records.get(object_id)
    if rec is None or rec.get("owner") != owner:
        raise not_found(kind, object_id)
    return rec


def limit_arg(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be a whole number from 1 to {most}", "invalid_limit",
                          "limit")
    return int(raw)


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` fields: name -> (filename or None, bytes)."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or found is None:
        raise bad_request("Upload the file as multipart/form-data with the fields `file` and "
                          "`purpose` (the OpenAI SDKs' files.create does).", "invalid_upload")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + found.group(1).encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition, re.MULTILINE | re.I)
        filename = re.search(r'filename="([^"]*)"', disposition, re.I)
        if name is not None:
            fields[name.group(1)] = (filename.group(1) if filename else None,
                                     content.removesuffix(b"\r\n"))
    return fields


async def create_file(request: Request, api: BatchApi, owner: str | None) -> Response:
    """POST /v1/files (multipart: ``file``, ``purpose``). Blocks while the upload arrives."""
    most = router_state(request).config.router.batch.max_file_mib  # a reload applies
    limit = int(most * MIB)
    too_large = bad_request(f"The file is larger than the router's limit of "
                            f"{most:g} MiB (router.batch.max_file_mib): "
                            "split the batch into several files.", "file_too_large",
                            status=413)
    try:
        body = await read_body(request, limit + MULTIPART_SLACK,
                               router_state(request).body_timeout_s)
    except Reject as reject:
        if reject.response.status_code == 413:
            raise too_large from None
        raise
    fields = parse_multipart(body, request.headers.get("content-type", ""))
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
    if purpose != "batch":
        raise bad_request(f"purpose must be `batch` (vlmhub keeps files for batches only), "
                          f"not {purpose[:40]!r}", "invalid_purpose", "purpose")
    if "file" not in fields:
        raise bad_request("the upload has no `file` field", "missing_file", "file")
    filename, data = fields["file"]
    if len(data) > limit:
        raise too_large
    if not data.strip():
        raise bad_request("the file is empty", "empty_file", "file")
    rec = await api.store.add_file(data, (filename or "upload.jsonl")[:255], purpose, owner)
    return JSONResponse(public(rec))


async def list_files(request: Request, api: BatchApi, owner: str | None) -> Response:
    """GET /v1/files (``purpose``, ``limit``, ``after``, ``order``)."""
    purpose = request.query_params.get("purpose")
    mine = [r for r in api.store.files.values() if r.get("owner") == owner
            and (purpose is None or r["purpose"] == purpose)]
    newest_first = request.query_params.get("order", "desc") != "asc"
    return JSONResponse(page(mine, limit=limit_arg(request, 10_000, 10_000),
                             after=request.query_params.get("after"),
                             newest_first=newest_first))


async def get_file(request: Request, api: BatchApi, owner: str | None) -> Response:
    """GET /v1/files/{file_id}."""
    rec = visible(api.store.files, request.path_params["file_id"], owner, "File")
    return JSONResponse(public(rec))


async def delete_file(request: Request, api: BatchApi, owner: str | None) -> Response:
    """DELETE /v1/files/{file_id}: refused (409) while an unfinished batch reads it."""
    rec = visible(api.store.files, request.path_params["file_id"], owner, "File")
    running = api.store.in_use(rec["id"])
    if running is not None:
        raise bad_request(f"File {rec['id']} is the input of batch {running}, which has not "
                          "finished: cancel the batch first.", "file_in_use", status=409)
    await api.store.delete_file(rec["id"])
    return JSONResponse({"id": rec["id"], "object": "file", "deleted": True})


async def file_content(request: Request, api: BatchApi, owner: str | None) -> Response:
    """GET /v1/files/{file_id}/content: the bytes (read by a worker thread as they go)."""
    rec = visible(api.store.files, request.path_params["file_id"], owner, "File")
    return FileResponse(api.store.content_path(rec["id"]), media_type="application/jsonl",
                        filename=rec["filename"])


FILE_HANDLERS: list[tuple[str, Handler, str]] = [
    ("/v1/files", create_file, "POST"),
    ("/v1/files", list_files, "GET"),
    ("/v1/files/{file_id}", get_file, "GET"),
    ("/v1/files/{file_id}", delete_file, "DELETE"),
    ("/v1/files/{file_id}/content", file_content, "GET"),
]
