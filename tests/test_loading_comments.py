"""Loading progress for streaming clients (issue 17 item 3), through the real router and
supervisor over stand-in engines (local processes that take 2 s to start).

A streamed request that has to wait for a start gets ``: vlmhub loading MODEL: PHASE (N s)``
comment lines at once and then every ``router.loading_comments_s``; the real openai SDK streams
through them unchanged; a failed start ends the stream with an error the SDK raises; and
``loading_comments_s: 0`` turns them off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from supervisor_support import build, model, routed

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hello there"}],
                        "max_tokens": 8}


async def stream_text(base: str, name: str) -> str:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model=name, stream=True, **CHAT)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def raw_stream(base: str, name: str) -> tuple[int, str, list[str]]:
    """(status, content type, every line) of a streamed request, read with plain httpx."""
    body = {"model": name, "stream": True, **CHAT}
    async with httpx.AsyncClient(base_url=base, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines()]
        return r.status_code, r.headers["content-type"], lines


async def test_a_streamed_request_waiting_for_a_start_gets_loading_comments(
    tmp_path: Path,
) -> None:
    sup, _, _ = build(tmp_path, {"a": model(2.0), "b": model(2.0)}, delay=2.0,
                      router={"loading_comments_s": 0.5})
    async with routed(sup) as base:
        status, ctype, lines = await raw_stream(base, "a")
        assert status == 200 and ctype.startswith("text/event-stream")
        comments = [ln for ln in lines if ln.startswith(":")]
        data = [ln for ln in lines if ln.startswith("data: ")]
        # the first at once, then every 0.5 s through a start of at least 2 s
        assert len(comments) >= 3, lines
        assert all(ln.startswith(": vlmhub loading a: ") for ln in comments), comments
        assert comments[0].endswith("(0 s)")
        assert lines.index(comments[-1]) < lines.index(data[0])  # all before the answer
        assert data[-1] == "data: [DONE]" and not any('"error"' in d for d in data)
        # the same answer as a client of a ready model gets: the comments changed nothing
        warm = await stream_text(base, "a")
        assert warm
        chunks = [json.loads(d[6:]) for d in data[:-1]]
        cold_text = "".join(c["choices"][0]["delta"].get("content") or ""
                            for c in chunks if c["choices"])
        assert cold_text == warm
        # the real openai SDK streams through the comments of a cold start unchanged
        await sup.unload("a")
        assert await stream_text(base, "a") == warm
        ready_status, _, ready_lines = await raw_stream(base, "a")  # ready: no comment at all
        assert ready_status == 200 and not any(ln.startswith(":") for ln in ready_lines)


async def test_a_start_that_fails_ends_the_stream_with_its_reason(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"bad": model(2.0, env={
        "VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"})}, delay=1.0,
        router={"loading_comments_s": 0.3})
    async with routed(sup) as base:
        status, _, lines = await raw_stream(base, "bad")
        assert status == 200  # the status line went out with the first comment
        assert lines[0].startswith(": vlmhub loading bad: ")
        errors = [ln for ln in lines if ln.startswith("data: ") and '"error"' in ln]
        assert len(errors) == 1 and "No available memory for the cache blocks" in errors[0]
        assert '"code": 503' in errors[0] or '"code":503' in errors[0]
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match=r"cache blocks"):
            stream = await client.chat.completions.create(model="bad", stream=True, **CHAT)
            async for _ in stream:
                pass


async def test_loading_comments_off(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(2.0)}, delay=1.0, router={"loading_comments_s": 0})
    async with routed(sup) as base:
        status, _, lines = await raw_stream(base, "a")
        assert status == 200 and lines and not any(ln.startswith(":") for ln in lines)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def reasoning_of(chunk: Any) -> str | None:
    """``delta.reasoning_content`` of an SDK chunk (an extra field to the openai types)."""
    delta = chunk.choices[0].delta
    extra = delta.model_extra or {}
    value = extra.get("reasoning_content", getattr(delta, "reasoning_content", None))
    return value if isinstance(value, str) else None


async def test_reasoning_progress_is_what_a_chat_window_shows(tmp_path: Path) -> None:
    """``router.loading_progress: reasoning``: the real openai SDK's chunks carry the loading
    phases as ``reasoning_content`` of one completion, then the engine's answer."""
    sup, _, _ = build(tmp_path, {"a": model(2.0)}, delay=2.0,
                      router={"loading_comments_s": 0.5, "loading_progress": "reasoning"})
    async with routed(sup) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="a", stream=True, **CHAT)
        chunks = [c async for c in stream if c.choices]
        thinking = [c for c in chunks if reasoning_of(c)]
        assert len(thinking) >= 3, chunks  # at once, then every 0.5 s through a 2 s start
        first = chunks.index(thinking[0])
        assert first == 0 and chunks[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in thinking[1:])
        assert len({c.id for c in thinking}) == 1 and thinking[0].model == "a"
        assert thinking[0].object == "chat.completion.chunk"
        phases = "".join(reasoning_of(c) or "" for c in thinking)
        assert phases.startswith("Loading a: ") and "(0 s)\n" in phases, phases
        answer = [c for c in chunks if c.choices[0].delta.content]
        assert chunks.index(answer[0]) > chunks.index(thinking[-1])  # the phases, then it
        text = "".join(c.choices[0].delta.content or "" for c in answer)
        assert text == await stream_text(base, "a")  # the same answer as when warm
        # ready: no reasoning at all
        warm = [c async for c in await client.chat.completions.create(
            model="a", stream=True, **CHAT) if c.choices]
        assert not any(reasoning_of(c) for c in warm)


async def test_the_progress_header_overrides_the_setting(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(2.0)}, delay=1.0,
                      router={"loading_comments_s": 0.3, "loading_progress": "reasoning"})
    async with routed(sup) as base:
        body = {"model": "a", "stream": True, **CHAT}
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            bad = await c.post("/v1/chat/completions", json=body,
                               headers={"X-Vlmhub-Loading-Progress": "loud"})
            assert bad.status_code == 400
            assert bad.json()["error"]["code"] == "invalid_loading_progress"
            r = await c.post("/v1/chat/completions", json=body,
                             headers={"X-Vlmhub-Loading-Progress": "off"})
        lines = r.text.splitlines()
        assert r.status_code == 200 and lines[-2:] in (["data: [DONE]", ""], ["", "data: [DONE]"])
        assert not any(ln.startswith(":") for ln in lines)
        assert "reasoning_content" not in r.text  # neither comments nor reasoning
        await sup.unload("a")
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json=body,
                             headers={"X-Vlmhub-Loading-Progress": "comments"})
        assert r.text.startswith(": vlmhub loading a: ")
        assert "reasoning_content" not in r.text
