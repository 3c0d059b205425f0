"""A minimal OpenAI-shaped upstream for proxy benchmarks: raw ASGI, no framework.

POST /v1/chat/completions answers one fixed, small chat completion; with ``"stream": true`` in
the body it sends 50 SSE chunks 20 ms apart, then ``data: [DONE]``. GET /v1/models and
GET /health answer too. Served by uvicorn with uvloop and httptools when they are installed.

    python benchmarks/upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "bench"
STREAM_CHUNKS = 50
STREAM_GAP_S = 0.020

CHAT_BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}, separators=(",", ":")).encode()
MODELS_BODY = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench",
     "max_model_len": 4096}]}, separators=(",", ":")).encode()
HEALTH_BODY = b'{"status":"ok"}'
NOT_FOUND_BODY = b'{"error":{"message":"not found","type":"not_found","code":404}}'


def sse_chunk(index: int) -> bytes:
    """One ``data:`` event of the stream (a chat.completion.chunk with one token)."""
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
             "model": MODEL, "choices": [{"index": 0, "delta": {"content": f"t{index} "},
                                          "finish_reason": None}]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


SSE_CHUNKS = [sse_chunk(i) for i in range(STREAM_CHUNKS)]
SSE_DONE = b"data: [DONE]\n\n"


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_stream(send: Send) -> None:
    """50 chunks, one every 20 ms (the first at once), then [DONE]."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    for chunk in SSE_CHUNKS:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(STREAM_GAP_S)
    await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})


def wants_stream(body: bytes) -> bool:
    if b'"stream"' not in body:  # the common case: no JSON parse
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("stream") is True


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The whole upstream (raw ASGI 3)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    if method == "POST" and path == "/v1/chat/completions":
        body = await read_body(receive)
        if wants_stream(body):
            await send_stream(send)
        else:
            await send_json(send, 200, CHAT_BODY)
    elif method == "GET" and path == "/v1/models":
        await send_json(send, 200, MODELS_BODY)
    elif method == "GET" and path == "/health":
        await send_json(send, 200, HEALTH_BODY)
    else:
        await send_json(send, 404, NOT_FOUND_BODY)


def fastest_uvicorn_options() -> dict[str, str]:
    """uvloop and httptools when installed, else uvicorn's pure-Python defaults."""
    has = importlib.util.find_spec
    return {"loop": "uvloop" if has("uvloop") else "asyncio",
            "http": "httptools" if has("httptools") else "h11"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="on", **fastest_uvicorn_options())  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
