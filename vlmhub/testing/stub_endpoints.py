"""The stand-in engine's task-dependent routes: vLLM's pooling, scoring, speech and Responses
endpoints, and the 404 of a route its model's task does not serve. A test double, not a model.

vLLM registers a route only when its model's task uses it (``vllm/entrypoints/.../factories.py``:
the pooling routers for ``--runner pooling`` / ``--task embed|classify|score``, the speech
routers for a transcription model); any other route answers FastAPI's ``404 {"detail": "Not
Found"}``. The stand-in reads the same flags (:func:`add_args`, :func:`task_of`). Without any of
them it serves every route, as it always did, so a default stand-in stays a lenient double.

:func:`handled` is the one hook :mod:`vlmhub.testing.stub_engine` calls from its request thread
for each POST: True when it answered. Answers are deterministic, made-up, in vLLM's shapes.
Standard library only (the stand-in's Docker image runs stub_engine.py without this file: then
there is no hook and every route is served as before).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Protocol

SCORE = frozenset({"/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"})
AUDIO = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
GENERATE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
TASK_ROUTES: dict[str, frozenset[str]] = {
    "generate": GENERATE,
    "embed": frozenset({"/v1/embeddings", "/pooling"}) | SCORE,  # bi-encoder scores
    "classify": frozenset({"/classify", "/pooling"}),
    "score": SCORE | {"/classify", "/pooling"},  # a cross-encoder
    "reward": frozenset({"/pooling"}),
    "transcription": AUDIO,
}
ALWAYS = frozenset({"/tokenize", "/detokenize"})
MODEL_ROUTES = frozenset().union(*TASK_ROUTES.values()) | ALWAYS
SERVED_ELSEWHERE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                              "/tokenize"})  # stub_engine's own handlers
TASK_ALIASES = {"embedding": "embed", "transcribe": "transcription"}


class Handler(Protocol):
    """What this module needs of stub_engine's request handler."""

    headers: Any
    server: Any

    def reply(self, code: int, body: bytes = b"", ctype: str = "application/json") -> None: ...

    def reply_json(self, code: int, obj: Any) -> None: ...


def add_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's task flags (kept, where the stand-in ignores other unknown flags)."""
    parser.add_argument("--task", default=None)
    parser.add_argument("--runner", default=None)
    parser.add_argument("--convert", default=None)


def task_of(args: argparse.Namespace) -> str | None:
    """The model's task as vLLM derives it from the flags; None: no flag, every route."""
    task = str(getattr(args, "task", None) or "auto")
    if task != "auto":
        return TASK_ALIASES.get(task, task)
    runner, convert = getattr(args, "runner", None), getattr(args, "convert", None)
    if runner == "pooling" or convert not in (None, "auto", "none"):
        return convert if convert in ("embed", "classify", "reward") else "embed"
    if runner in ("generate", "draft"):
        return "generate"
    return None


def handled(handler: Handler, path: str, data: bytes) -> bool:
    """Answer ``POST path`` if it is this module's to answer (a new route, or a route the
    model's task does not serve); False leaves it to stub_engine."""
    if path not in MODEL_ROUTES:
        return False
    task = task_of(handler.server.stub.args)
    if task is not None and path not in TASK_ROUTES.get(task, frozenset()) | ALWAYS:
        handler.reply_json(404, {"detail": "Not Found"})
        return True
    if path in SERVED_ELSEWHERE:
        return False
    ctype = handler.headers.get("Content-Type") or ""
    try:
        body = _form(data, ctype) if path in AUDIO else _json(data)
    except ValueError as exc:
        handler.reply_json(400, _error(f"JSON decode error: {exc}", "BadRequestError", 400))
        return True
    stub = handler.server.stub
    model = str(body.get("model") or stub.names[0])
    if model not in stub.names:
        handler.reply_json(404, _error(f"The model `{model}` does not exist.",
                                       "NotFoundError", 404))
        return True
    if stub.sleep_level:
        handler.reply_json(503, _error("vlmhub stub engine: the engine is asleep",
                                       "ServiceUnavailableError", 503))
        return True
    handler.reply_json(200, ANSWERS[_kind(path)](model, body))
    return True


def _kind(path: str) -> str:
    if path in AUDIO:
        return "audio"
    if path in SCORE:
        return "rerank" if "rerank" in path else "score"
    return path.rsplit("/", 1)[-1]  # responses, pooling, classify, detokenize


def _json(data: bytes) -> dict[str, Any]:
    body = json.loads(data) if data.strip() else {}
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _form(data: bytes, ctype: str) -> dict[str, Any]:
    """A multipart form's fields: text as str, the file as its bytes (``file``)."""
    if not ctype.lower().startswith("multipart/form-data"):
        raise ValueError("expected multipart/form-data")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + data)
    out: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        out[str(name)] = raw if part.get_filename() else raw.decode("utf-8", "replace")
    if "file" not in out:
        raise ValueError("the form has no `file` field")
    return out


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _numbers(model: str, item: Any, n: int) -> list[float]:
    digest = hashlib.sha256(f"{model}\n{json.dumps(item, default=str)}".encode()).digest()
    return [round(b / 255, 4) for b in digest[:n]]


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _usage(*texts: Any) -> dict[str, int]:
    used = sum(len(str(t).split()) for t in texts)
    return {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0}


def _meta(prefix: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()), "model": model}


def responses(model: str, body: dict[str, Any]) -> dict[str, Any]:
    words = [f"w{int(x * 100)}" for x in _numbers(model, body.get("input"), 6)]
    text = f"{model}: " + " ".join(words)
    used = len(json.dumps(body.get("input", "")).split())
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
            "created_at": int(time.time()), "model": model, "status": "completed",
            "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                        "status": "completed", "content": [
                            {"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": used, "output_tokens": 7, "total_tokens": used + 7}}


def pooling(model: str, body: dict[str, Any]) -> dict[str, Any]:
    items = _items(body.get("input", ""))
    return {**_meta("pool", model), "usage": _usage(*items), "data": [
        {"index": i, "object": "pooling", "data": _numbers(model, x, 8)}
        for i, x in enumerate(items)]}


def classify(model: str, body: dict[str, Any]) -> dict[str, Any]:
    items = _items(body.get("input", ""))
    data = []
    for i, x in enumerate(items):
        p = _numbers(model, x, 1)[0]
        data.append({"index": i, "label": "LABEL_1" if p >= 0.5 else "LABEL_0",
                     "probs": [round(1 - p, 4), p], "num_classes": 2})
    return {**_meta("classify", model), "usage": _usage(*items), "data": data}


def score(model: str, body: dict[str, Any]) -> dict[str, Any]:
    first = body.get("text_1", body.get("queries", ""))
    second = _items(body.get("text_2", body.get("documents", "")))
    return {**_meta("score", model), "usage": _usage(first, *second), "data": [
        {"index": i, "object": "score", "score": _numbers(model, [first, x], 1)[0]}
        for i, x in enumerate(second)]}


def rerank(model: str, body: dict[str, Any]) -> dict[str, Any]:
    query, docs = body.get("query", ""), _items(body.get("documents", []))
    scores = [_numbers(model, [query, d], 1)[0] for d in docs]
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    results = [{"index": i, "relevance_score": scores[i], "document": {
        "text": docs[i] if isinstance(docs[i], str) else json.dumps(docs[i])}} for i in order]
    top = body.get("top_n")
    if isinstance(top, int) and top > 0:
        results = results[:top]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "usage": {"total_tokens": _usage(query, *docs)["total_tokens"]}, "results": results}


def audio(model: str, body: dict[str, Any]) -> dict[str, Any]:
    size = len(body["file"]) if isinstance(body["file"], bytes) else 0
    return {"text": f"{model}: a transcript of {size} bytes of audio",
            "usage": {"type": "duration", "seconds": max(1, size // 32000)}}


def detokenize(model: str, body: dict[str, Any]) -> dict[str, Any]:
    tokens = body.get("tokens") or []
    return {"prompt": " ".join(f"t{t}" for t in tokens if isinstance(t, int))}


ANSWERS = {"responses": responses, "pooling": pooling, "classify": classify, "score": score,
           "rerank": rerank, "audio": audio, "detokenize": detokenize}
