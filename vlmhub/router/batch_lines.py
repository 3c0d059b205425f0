"""A batch input file's lines: parsing and validation, and the output and error lines.

Pure functions over bytes and dicts: nothing here blocks but the CPU (a large file is parsed in
a worker thread by its caller). An input line is OpenAI's::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Validation collects every problem with its line number (1-based), OpenAI's ``errors.data[]``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
"""What a batch's lines may call (its ``endpoint``; every line's ``url`` must be it)."""
MAX_ERRORS = 100
"""Problems listed per failed validation (the count of the rest is the last entry)."""


@dataclass(frozen=True)
class Line:
    """One valid request line."""

    number: int
    custom_id: str
    body: dict[str, Any]


def _problem(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _check(number: int, raw: bytes, endpoint: str, known: Callable[[str], bool]
           ) -> tuple[Line | None, dict[str, Any] | None]:
    """The line, or its first problem."""
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return None, _problem(number, "invalid_json_line", f"line {number} is not valid JSON: "
                              f"{str(exc)[:200]}")
    if not isinstance(item, dict):
        return None, _problem(number, "invalid_json_line",
                              f"line {number} must be a JSON object")
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, _problem(number, "missing_custom_id", f"line {number} has no custom_id "
                              "(a non-empty string naming the request)", "custom_id")
    if item.get("method", "POST") != "POST":
        return None, _problem(number, "invalid_method", f"line {number}: method must be "
                              "POST", "method")
    if item.get("url") != endpoint:
        return None, _problem(number, "mismatched_endpoint", f"line {number}: url "
                              f"{str(item.get('url'))[:100]!r} is not the batch's endpoint "
                              f"{endpoint}", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return None, _problem(number, "invalid_body", f"line {number}: body must be a JSON "
                              "object (the request the endpoint takes)", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, _problem(number, "missing_model", f"line {number}: body.model is "
                              "missing", "body.model")
    if not known(model):
        return None, _problem(number, "model_not_found", f"line {number}: model {model[:100]!r}"
                              " is not served by this router", "body.model")
    if body.get("stream") is True:
        return None, _problem(number, "stream_unsupported", f"line {number}: a batch line "
                              "cannot stream (remove \"stream\": true)", "body.stream")
    return Line(number, cid, body), None


def parse_lines(data: bytes, endpoint: str, known: Callable[[str], bool], max_lines: int
                ) -> tuple[list[Line], list[dict[str, Any]]]:
    """The valid lines of ``data`` and the problems found (empty: the file is valid).
    ``known(model)`` tells whether the router serves a model name (or alias). Blank lines
    are skipped but counted."""
    lines: list[Line] = []
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        line, problem = _check(number, raw, endpoint, known)
        if line is not None and line.custom_id in seen:
            cid = line.custom_id
            line, problem = None, _problem(
                number, "duplicate_custom_id", f"line {number}: custom_id {cid[:100]!r} is "
                f"already used on line {seen[cid]}", "custom_id")
        if problem is not None:
            problems.append(problem)
        elif line is not None:
            seen[line.custom_id] = number
            lines.append(line)
    total = len(lines) + len(problems)
    if total == 0:
        problems.append(_problem(1, "empty_file", "the input file holds no request lines"))
    elif total > max_lines:
        problems.append(_problem(total, "too_many_requests", f"the input file holds {total} "
                                 f"lines; a batch takes at most {max_lines} "
                                 "(router.batch.max_lines)"))
    if len(problems) > MAX_ERRORS:
        rest = len(problems) - MAX_ERRORS + 1
        problems = [*problems[:MAX_ERRORS - 1],
                    _problem(problems[MAX_ERRORS - 1]["line"], "more_errors",
                             f"{rest} more problems are not listed")]
    return lines, problems


def answered(custom_id: str, status: int, request_id: str, body: Any) -> dict[str, Any]:
    """An output (or error) file line for a request that got an HTTP answer."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None}


def unanswered(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """An error file line for a request that never ran (``batch_expired``...)."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def succeeded(line: dict[str, Any]) -> bool:
    """Whether a finished line belongs in the output file (a 2xx answer), not the error file."""
    response = line.get("response")
    return isinstance(response, dict) and 200 <= int(response.get("status_code", 0)) < 300


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for x in lines)
