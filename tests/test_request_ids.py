"""Request ids, queue/replica headers, the access log and CORS (issue 17 items 1, 2, 5), through
the real router: the engine is a small real HTTP server on loopback (an external model) that
records the headers it receives, so the test sees what reached the engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
from supervisor_support import build, routed

from vlmhub.engines.ports import free_port
from vlmhub.logs import ACCESS

ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@asynccontextmanager
async def engine() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An OpenAI-shaped server on 127.0.0.1 recording each request's headers."""
    seen: list[dict[str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if h)}
        await reader.readexactly(int(headers.get("content-length", "0")))
        seen.append(headers)
        body = json.dumps(ANSWER if head[0].startswith("POST") else {"data": []}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        yield f"http://127.0.0.1:{port}", seen


async def test_request_ids_reach_the_engine_and_come_back_on_every_answer(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    ACCESS.addHandler(handler)
    old_level = ACCESS.level
    ACCESS.setLevel(logging.INFO)
    try:
        async with engine() as (url, seen):
            sup, _, _ = build(tmp_path, {"m": {"url": url, "aliases": ["alias-m"]}})
            async with routed(sup) as base:
                client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
                raw = await client.chat.completions.with_raw_response.create(
                    model="alias-m", messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-request-id": "client-id-42"})
                assert raw.headers["x-request-id"] == "client-id-42"
                assert raw.parse()._request_id == "client-id-42"
                assert seen[-1]["x-request-id"] == "client-id-42"
                assert raw.headers["x-vlmhub-replica"].startswith("m@")
                assert float(raw.headers["x-vlmhub-queue-ms"]) >= 0
                made = await client.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}])
                rid = made.headers["x-request-id"]
                assert len(rid) == 32 and seen[-1]["x-request-id"] == rid  # generated, sent on
                async with httpx.AsyncClient(base_url=base) as c:
                    missing = await c.post("/v1/chat/completions", json={"model": "nope"})
                    bad = await c.post("/v1/chat/completions", content=b"{not json")
                assert missing.status_code == 404 and missing.headers["x-request-id"]
                assert bad.status_code == 400 and bad.headers["x-request-id"]
    finally:
        ACCESS.removeHandler(handler)
        ACCESS.setLevel(old_level)
    lines = [r for r in records if getattr(r, "request_id", None) == "client-id-42"]
    assert len(lines) == 1
    line = lines[0]
    assert line.model == "m" and line.asked == "alias-m"  # type: ignore[attr-defined]
    assert line.status == 200 and line.bytes > 0  # type: ignore[attr-defined]
    assert line.replica.startswith("m@") and line.ttfb_ms is not None  # type: ignore[attr-defined]
    assert any(getattr(r, "status", None) == 404 for r in records)


async def test_cors_allows_configured_origins_on_v1_only(tmp_path: Path) -> None:
    async with engine() as (url, _):
        sup, _, _ = build(tmp_path, {"m": {"url": url}},
                          router={"cors_origins": ["http://localhost:3000"]})
        async with routed(sup) as base, httpx.AsyncClient(base_url=base) as c:
            pre = await c.options("/v1/chat/completions", headers={
                "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 204
            assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
            browser = {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "cross-site"}
            ok = await c.post("/v1/chat/completions", headers=browser,
                              json={"model": "m", "messages": []})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
            assert "x-request-id" in ok.headers["access-control-expose-headers"]
            other = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
            refused = await c.post("/v1/chat/completions", headers=other,
                                   json={"model": "m", "messages": []})
            assert refused.status_code == 403
            assert "access-control-allow-origin" not in refused.headers
            admin = await c.post("/api/models/m/unload", headers=browser)
            assert admin.status_code == 403  # the admin API keeps its browser guard
