"""What the router says when a model's engine does not serve the route a request asked for.

vLLM registers a route only for the tasks its model runs (``/v1/embeddings`` for an embedding
model, ``/v1/audio/transcriptions`` for a speech model, ...); any other answers FastAPI's own
``404 {"detail": "Not Found"}``. :func:`not_served` keeps that body and adds an OpenAI-shaped
``error`` naming the model and the route, so an SDK shows why. Pure; nothing blocks.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

FASTAPI_NOT_FOUND = {"detail": "Not Found"}


def not_served(body: bytes, model: str, url: str) -> bytes:
    """``body`` (an engine's 404) with the explanation added when it is FastAPI's route-level
    404; any other 404 (an unknown model name, ...) unchanged."""
    if len(body) > 64:
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if parsed != FASTAPI_NOT_FOUND:
        return body
    path = urlsplit(url).path
    message = (f"Model {model!r} does not serve POST {path}: its engine has no such route "
               "(vLLM serves a route only for its model's task, e.g. /v1/embeddings with "
               "--runner pooling, /v1/audio/transcriptions for a speech model). Send the "
               "request to a model that serves it (GET /v1/models lists them).")
    return json.dumps({**FASTAPI_NOT_FOUND, "error": {
        "message": message, "type": "invalid_request_error", "param": "model",
        "code": "endpoint_not_served"}}).encode()
