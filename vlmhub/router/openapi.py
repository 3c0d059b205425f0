"""The router's OpenAPI 3 document, served at ``GET /openapi.json``.

A static description of every route the router answers itself: the OpenAI-compatible routes it
forwards to the engines (their bodies are described by what the router reads, ``model`` and
``stream``, plus the common OpenAI fields; anything else passes through to vLLM untouched), the
model list, health and metrics, the admin API and the dashboard. It is what API fuzzers
(tests/test_fuzz_api.py, schemathesis) and client generators read. Built once at import; the
handler returns the same bytes every time and never blocks.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vlmhub.router.batches import openapi_paths as batch_paths

try:
    VERSION = version("vlmhub")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0"

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}
MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["text", "image_url"]},
                "text": {"type": "string"},
                "image_url": {"type": "object", "properties": {"url": {"type": "string"}}},
            }}},
        ]},
    },
}
TEXTS: dict[str, Any] = {"oneOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
COMMON: dict[str, Any] = {  # fields every forwarded body may carry
    "model": {"type": "string", "description": "A configured model name or alias."},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
BODIES: dict[str, dict[str, Any]] = {  # path -> the body's own fields (besides COMMON)
    "/v1/chat/completions": {"messages": {"type": "array", "items": MESSAGE, "minItems": 1}},
    "/v1/completions": {"prompt": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
    "/v1/embeddings": {"input": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
    "/v1/responses": {"input": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": MESSAGE}]}},
    "/tokenize": {"prompt": {"type": "string"}},
    "/v1/tokenize": {"prompt": {"type": "string"}},
    "/detokenize": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    "/v1/detokenize": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    **{path: {"query": {"type": "string"}, "documents": TEXTS, "top_n": {"type": "integer"}}
       for path in ("/v1/rerank", "/rerank", "/v2/rerank")},
    **{path: {"text_1": TEXTS, "text_2": TEXTS} for path in ("/v1/score", "/score")},
    "/pooling": {"input": TEXTS},
    "/classify": {"input": TEXTS},
}
FORMS: dict[str, dict[str, Any]] = {  # multipart/form-data routes: path -> the form's fields
    path: {"file": {"type": "string", "format": "binary"}, "language": {"type": "string"},
           "prompt": {"type": "string"}, "temperature": {"type": "number"},
           "response_format": {"type": "string"}}
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations")
}
REQUIRED: dict[str, list[str]] = {
    **{path: ["model", "query", "documents"] for path in ("/v1/rerank", "/rerank", "/v2/rerank")},
    **{path: ["model", "text_1", "text_2"] for path in ("/v1/score", "/score")},
    "/pooling": ["model", "input"], "/classify": ["model", "input"],
    **{path: ["model", "file"] for path in FORMS},
    "/v1/chat/completions": ["model", "messages"], "/v1/completions": ["model", "prompt"],
    "/v1/embeddings": ["model", "input"], "/v1/responses": ["model", "input"],
}
MODEL_CARD: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "state"],
    "properties": {
        "id": {"type": "string"}, "object": {"type": "string"},
        "created": {"type": "integer"}, "owned_by": {"type": "string"},
        "state": {"type": "string", "enum": ["stopped", "starting", "ready", "sleeping",
                                             "stopping", "failed"]},
        "phase": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}},
        "in_flight": {"type": "integer"}, "queued": {"type": "integer"},
        "max_model_len": {"type": "integer"},
        "node": {"type": "string", "description": "the GPU node it runs on (Ray runtime)"},
    },
}
REPLICA: dict[str, Any] = {"type": "object", "required": ["name", "state"], "properties": {
    "name": {"type": "string"}, "state": {"type": "string"}, "phase": {"type": "string"},
    "port": {"type": ["integer", "null"]}, "in_flight": {"type": "integer"},
    "queued": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
    "node": {"type": "string"},
}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    what = {400: "Bad request (malformed JSON, no model, bad header)",
            401: "Missing or wrong key", 403: "Not a local client (admin API without a key)",
            404: "Unknown model or path", 408: "The body stopped arriving",
            413: "The body is over router.max_body_mb",
            502: "The engine failed during the exchange",
            503: "Model failed, queue full, no room, or the router is draining "
                 "(with Retry-After)",
            504: "The model was not ready within queue_timeout_s (or its start timed out)"}
    return {str(c): {"description": what[c], "content": _json(ERROR)} for c in codes}


PRIORITY = {"name": "X-Vlmhub-Priority", "in": "header", "required": False,
            "schema": {"type": "string", "enum": ["interactive", "batch"]},
            "description": "The request's class for the swap policy (docs/scheduling.md)."}
PROGRESS = {"name": "X-Vlmhub-Loading-Progress", "in": "header", "required": False,
            "schema": {"type": "string", "enum": ["comments", "reasoning", "off"]},
            "description": "How a streamed request shows its model's start (router."
            "loading_progress): SSE comments, reasoning_content chunks, or nothing."}
REQUEST_ID = {"name": "X-Request-Id", "in": "header", "required": False,
              "schema": {"type": "string", "maxLength": 128},
              "description": "Echoed on the answer and sent to the engine."}


def _forwarded(path: str) -> dict[str, Any]:
    fields = {**COMMON, **BODIES[path]} if path in BODIES else {
        "model": COMMON["model"], "stream": COMMON["stream"], **FORMS[path]}
    body = {"type": "object", "properties": fields,
            "required": REQUIRED.get(path, ["model"]), "additionalProperties": True}
    content = {"multipart/form-data": {"schema": body}} if path in FORMS else _json(body)
    answer = {"description": "The engine's answer (a JSON object, or server-sent events when "
              "\"stream\": true)",
              "content": {"application/json": {"schema": {"type": "object"}},
                          "text/event-stream": {"schema": {"type": "string"}}}}
    return {"post": {
        "summary": f"Forwarded to the model's engine ({path})",
        "security": [{"apiKey": []}, {}],
        "parameters": [PRIORITY, REQUEST_ID, PROGRESS],
        "requestBody": {"required": True, "content": content},
        "responses": {"200": answer, **_errors(400, 401, 404, 408, 413, 502, 503, 504)},
    }}


def _admin_action(action: str) -> dict[str, Any]:
    return {"post": {
        "summary": f"{action.capitalize()} a model now (admin)",
        "security": [{"adminKey": []}, {}],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The model's state", "content": _json(REPLICA)},
                      **_errors(401, 403, 404, 503)},
    }}


def _get(summary: str, content: dict[str, Any], *errors: int, **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, **extra,
                    "responses": {"200": {"description": summary, "content": content},
                                  **_errors(*errors)}}}


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (a fresh dict)."""
    paths: dict[str, Any] = {path: _forwarded(path) for path in [*BODIES, *FORMS]}
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    paths |= {
        "/v1/models": _get("Every configured model with its live state",
                           _json({"type": "object", "properties": {
                               "object": {"type": "string"},
                               "data": {"type": "array", "items": MODEL_CARD}}}),
                           401, security=[{"apiKey": []}, {}]),
        "/v1/models/{model}": _get("One model (aliases accepted)", _json(MODEL_CARD), 401, 404,
                                   security=[{"apiKey": []}, {}], parameters=[
                                       {"name": "model", "in": "path", "required": True,
                                        "schema": {"type": "string"}}]),
        "/health": _get("The router is up, with each model's state (503 while draining)",
                        _json({"type": "object", "properties": {
                            "status": {"type": "string"}, "models": {"type": "object"}}}), 503),
        "/metrics": _get("Prometheus metrics", text),
        "/openapi.json": _get("This document", _json({"type": "object"})),
        "/api/models": _get("Every model's snapshot (admin)",
                            _json({"type": "object", "properties": {
                                "models": {"type": "array", "items": REPLICA}}}),
                            401, 403, security=[{"adminKey": []}, {}]),
        "/api/models/{name}/load": _admin_action("load"),
        "/api/models/{name}/unload": _admin_action("unload"),
        "/api/reload": {"post": {
            "summary": "Re-read models.yaml and apply it (admin)",
            "security": [{"adminKey": []}, {}],
            "responses": {"200": {"description": "What changed",
                                  "content": _json({"type": "object"})},
                          **_errors(400, 401, 403), "501": {
                              "description": "Not started from a models.yaml",
                              "content": _json(ERROR)}}}},
        "/api/usage": _get("Tokens per key name and model (admin; docs/api.md)",
                           _json({"type": "object", "properties": {
                               "since": {"type": ["number", "null"]},
                               "data": {"type": "array", "items": {"type": "object"}}}}),
                           400, 401, 403, security=[{"adminKey": []}, {}], parameters=[
                               {"name": "since", "in": "query", "required": False,
                                "schema": {"type": "string"}}]),
        "/api/ui": _get("The dashboard's facts: GPU, presets, budgets (admin)",
                        _json({"type": "object"}), 401, 403, security=[{"adminKey": []}, {}]),
        "/": {"get": {"summary": "Redirect to the dashboard",
                      "responses": {"307": {"description": "To /ui"}}}},
        "/ui": _get("The dashboard", html),
        "/ui/{name}": _get("The dashboard's files", {"*/*": {"schema": {"type": "string"}}},
                           404, parameters=[{"name": "name", "in": "path", "required": True,
                                             "schema": {"type": "string"}}]),
    }
    paths |= batch_paths(ERROR)  # /v1/files, /v1/batches
    return {
        "openapi": "3.1.0",
        "info": {"title": "vlmhub router", "version": VERSION, "description": (
            "OpenAI-compatible endpoint in front of vLLM engines that vlmhub starts, queues "
            "and swaps to fit one GPU, plus its admin API. Errors use OpenAI's shape; every "
            "503 carries Retry-After.")},
        "paths": paths,
        "components": {"securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "router.api_keys / VLMHUB_API_KEYS, when set"},
            "adminKey": {"type": "http", "scheme": "bearer", "description": (
                "router.admin_key (or the generated token of `admin_key: auto`); without "
                "one, loopback clients only")},
        }},
    }


DOCUMENT = json.dumps(build_document(), separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: the document (no key needed: it holds no secret and no model name)."""
    return Response(DOCUMENT, media_type="application/json")


def openapi_routes() -> list[Route]:
    return [Route("/openapi.json", openapi_json, methods=["GET"])]
