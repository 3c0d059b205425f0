"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Pure helpers; nothing here blocks. The OpenAI SDKs read ``error.message`` into their exception
text, so messages are complete sentences that name the fix. Every 503 carries ``Retry-After``
(the refusal's own value, else :data:`DEFAULT_RETRY_AFTER_S`), so clients back off instead of
hammering a model that is starting, failing or being swapped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import JSONResponse

from vlmhub.control.contract import AcquireError, SupervisorLike

ErrorCode = str | int | None
DEFAULT_RETRY_AFTER_S = 5
"""``Retry-After`` of a 503 whose cause gives no better estimate (start failure, no port...)."""


def error_body(
    message: str, type: str, code: ErrorCode = None, param: str | None = None
) -> dict[str, Any]:
    """The error object, OpenAI's shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    code: ErrorCode = None,
    headers: Mapping[str, str] | None = None,
    *,
    param: str | None = None,
) -> JSONResponse:
    """A JSON error response with ``status`` and OpenAI's error shape. A 503 without a
    ``Retry-After`` in ``headers`` gets :data:`DEFAULT_RETRY_AFTER_S`."""
    out = dict(headers) if headers else {}
    if status == 503 and not any(k.lower() == "retry-after" for k in out):
        out["Retry-After"] = str(DEFAULT_RETRY_AFTER_S)
    return JSONResponse(error_body(message, type, code, param), status_code=status,
                        headers=out or None)


def sse_error_event(message: str, type: str = "upstream_error", code: ErrorCode = 502) -> bytes:
    """One server-sent event carrying an error; the OpenAI SDKs raise ``APIError`` on it."""
    return b"data: " + json.dumps(error_body(message, type, code)).encode() + b"\n\n"


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``{"Retry-After": N}`` (whole seconds, at least 1) or nothing."""
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def acquire_error_response(exc: AcquireError) -> JSONResponse:
    """Map a refusal from the supervisor to its status, type, code and Retry-After."""
    code = _snake(type(exc).__name__)
    return error_response(exc.status, str(exc), exc.error_type, code,
                          retry_after_header(exc.retry_after))


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out or "error"


def unknown_model_response(name: str, supervisor: SupervisorLike,
                           visible: Callable[[list[str]], list[str]] | None = None
                           ) -> JSONResponse:
    """404 in OpenAI's shape for a name that is neither a configured model nor an alias, with
    the models there are (the /v1 routes and the admin API alike). ``visible`` narrows that
    list to what the caller's key may use (a model it may not use gets this same answer)."""
    names = supervisor.names()
    known = ", ".join(visible(names) if visible else names) or "none configured"
    return error_response(404, f"The model `{name}` does not exist. Available models: {known}.",
                          "invalid_request_error", "model_not_found", param="model")
