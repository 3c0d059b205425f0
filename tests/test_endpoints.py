"""Every model route vLLM serves goes through the router by model (issue 26 item 3), JSON and
multipart, through the real router and stand-in engines started as vLLM would be for their task
(``--runner generate``, ``--runner pooling``, ``--task score``, ``--task transcription``); a
route a model's engine does not serve is the engine's own 404 with the reason added."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from supervisor_support import build, model, routed

from vlmhub.router.app import PROXIED
from vlmhub.router.multipart import read_form, with_field
from vlmhub.router.state import Reject
from vlmhub.testing.stub_endpoints import AUDIO, TASK_ROUTES

AUDIO_BYTES = b"RIFF" + bytes(range(256)) * 40  # 10 KiB of made-up "audio"
JSON_ROUTES: dict[str, tuple[str, dict[str, Any], str]] = {  # path -> (model, body, answer key)
    "/v1/embeddings": ("embed", {"input": ["a b", "c"]}, "data"),
    "/pooling": ("embed", {"input": "a b"}, "data"),
    "/score": ("scorer", {"text_1": "q", "text_2": ["x", "y"]}, "data"),
    "/v1/score": ("scorer", {"text_1": "q", "text_2": ["x"]}, "data"),
    "/rerank": ("scorer", {"query": "q", "documents": ["x", "y", "z"], "top_n": 2}, "results"),
    "/v1/rerank": ("scorer", {"query": "q", "documents": ["x"]}, "results"),
    "/v2/rerank": ("scorer", {"query": "q", "documents": ["x", "y"]}, "results"),
    "/classify": ("scorer", {"input": ["good", "bad"]}, "data"),
    "/v1/responses": ("chat", {"input": "hello"}, "output"),
    "/v1/chat/completions": ("chat", {"messages": [{"role": "user", "content": "hi"}]},
                             "choices"),
    "/v1/completions": ("chat", {"prompt": "hi"}, "choices"),
    "/tokenize": ("chat", {"prompt": "a b c"}, "tokens"),
    "/detokenize": ("chat", {"tokens": [1, 2]}, "prompt"),
}


def task(*argv: str) -> dict[str, Any]:
    return {"spec": {"options": {"max_model_len": 1024, "enforce_eager": True,
                                 "extra_args": list(argv)}}}


def models() -> dict[str, dict[str, Any]]:
    return {"chat": model(1.0, **task("--runner", "generate")),
            "embed": model(1.0, **task("--runner", "pooling")),
            "scorer": model(1.0, **task("--task", "score")),
            "whisper": model(1.0, aliases=["asr"], **task("--task", "transcription"))}


def test_the_vllm_route_list_is_covered() -> None:
    """Every route the stand-in serves for some task is one the router forwards."""
    served = frozenset().union(*TASK_ROUTES.values())
    assert served <= PROXIED.keys()
    assert served - AUDIO <= JSON_ROUTES.keys()


async def test_every_model_route_is_routed_by_model(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models(), total_gib=8.0)
    async with routed(sup) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        for path, (name, body, key) in JSON_ROUTES.items():
            r = await http.post(path, json={"model": name, **body})
            assert r.status_code == 200, (path, r.text)
            assert key in r.json(), (path, r.text)
        rerank = (await http.post("/rerank", json={"model": "scorer", **JSON_ROUTES["/rerank"][1]}))
        assert len(rerank.json()["results"]) == 2  # the engine's top_n: the body went through
        # the openai SDK: embeddings, and the multipart audio routes (an alias in a form field)
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        emb = await client.embeddings.create(model="embed", input=["one", "two"])
        assert len(emb.data) == 2
        text = await client.audio.transcriptions.create(
            model="asr", file=("a.wav", io.BytesIO(AUDIO_BYTES), "audio/wav"))
        assert text.text == f"whisper: a transcript of {len(AUDIO_BYTES)} bytes of audio"
        trans = await client.audio.translations.create(
            model="whisper", file=("a.wav", io.BytesIO(AUDIO_BYTES), "audio/wav"))
        assert trans.text.startswith("whisper: ")
        # the same priorities as chat: a batch-class request is routed the same way
        r = await http.post("/score", json={"model": "scorer", "text_1": "a", "text_2": "b"},
                            headers={"X-Vlmhub-Priority": "batch"})
        assert r.status_code == 200, r.text


async def test_a_route_the_engine_does_not_serve_is_its_404_with_the_reason(
    tmp_path: Path,
) -> None:
    sup, _, _ = build(tmp_path, {"chat": models()["chat"], "embed": models()["embed"]})
    async with routed(sup) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        r = await http.post("/v1/embeddings", json={"model": "chat", "input": "x"})
        assert r.status_code == 404
        body = r.json()
        assert body["detail"] == "Not Found"  # vLLM's (FastAPI's) own shape, kept
        assert body["error"]["code"] == "endpoint_not_served"
        assert "'chat' does not serve POST /v1/embeddings" in body["error"]["message"]
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="does not serve POST /v1/chat"):
            await client.chat.completions.create(
                model="embed", messages=[{"role": "user", "content": "hi"}])
        # an unknown model is still the router's own 404 listing the models
        r = await http.post("/pooling", json={"model": "nope", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_multipart_limits_and_errors(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"whisper": models()["whisper"]},
                      router={"max_body_mb": 0.005})  # 5 KiB
    async with routed(sup) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        url = "/v1/audio/transcriptions"
        big = await http.post(url, data={"model": "whisper"}, files={"file": AUDIO_BYTES})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        small = b"RIFF" + bytes(100)
        none = await http.post(url, data={"language": "en"}, files={"file": small})
        assert none.status_code == 400 and none.json()["error"]["code"] == "missing_model"
        broken = await http.post(url, content=b"--x\r\nno headers end",
                                 headers={"content-type": "multipart/form-data; boundary=x"})
        assert broken.status_code == 400
        assert broken.json()["error"]["code"] == "malformed_multipart"
        ok = await http.post(url, data={"model": "whisper"}, files={"file": small})
        assert ok.status_code == 200, ok.text


def form(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--BND\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--BND--\r\n", "multipart/form-data; boundary=BND"


def test_read_form_finds_the_routing_fields_in_place() -> None:
    # a file whose bytes look like a model field must not be read as one
    trap = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nevil\r\n'
    body, ctype = form(("file", trap * 50, "a.wav"), ("model", b"asr", None),
                       ("stream", b"true", None))
    found = read_form(body, ctype)
    assert found.values == {"model": "asr", "stream": "true"}
    rewritten = with_field(body, found, "model", "whisper-large")
    again = read_form(rewritten, ctype)
    assert again.values["model"] == "whisper-large"
    assert rewritten.replace(b"whisper-large", b"asr") == body
    assert with_field(body, found, "model", "asr") is body  # same name: the same bytes
    with pytest.raises(Reject):
        read_form(body, "multipart/form-data")  # no boundary
