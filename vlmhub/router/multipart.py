"""Routing fields of a ``multipart/form-data`` body (``/v1/audio/transcriptions``, ...).

OpenAI's audio routes send the model as a form field next to the file. :func:`read_form` finds
the small routing fields (``model``, ``stream``) in the body the router has already read (with
its size limit): it scans for the part delimiters in place and slices out only those fields'
values, so the file is neither parsed nor copied. :func:`with_field` rewrites one value (an
alias to the engine's served name): one copy of the body, made only when the names differ.
Pure; nothing blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmhub.router.errors import error_response
from vlmhub.router.state import Reject

ROUTING = frozenset({b"model", b"stream"})
MAX_VALUE = 1024  # a routing field's value longer than this is not a model name


@dataclass(frozen=True, slots=True)
class Form:
    """The routing fields found: their text and where each value lies in the body."""

    values: dict[str, str]
    spans: dict[str, tuple[int, int]]


def is_multipart(content_type: str | None) -> bool:
    return content_type is not None and content_type[:19].lower() == "multipart/form-data"


def _bad(message: str) -> Reject:
    return Reject(error_response(400, message, "invalid_request_error", "malformed_multipart"))


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` parameter of a multipart Content-Type; 400 without one."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1", "replace")
    raise _bad("a multipart/form-data body needs a boundary in its Content-Type header")


def _field_name(headers: bytes) -> bytes | None:
    """The ``name`` of a part's Content-Disposition header, or None."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        for param in value.split(b";")[1:]:
            k, _, v = param.strip().partition(b"=")
            if k.strip().lower() == b"name":
                return v.strip().strip(b'"')
    return None


def read_form(body: bytes, content_type: str) -> Form:
    """The routing fields of ``body``; 400 (OpenAI shape) when it is not a form."""
    delim = b"--" + boundary_of(content_type)
    pos = body.find(delim)
    if pos < 0:
        raise _bad("the multipart body does not contain its boundary")
    values: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    sep = b"\r\n" + delim
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):  # the closing delimiter
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise _bad("a part of the multipart body has no end to its headers")
        start = head_end + 4
        end = body.find(sep, start)
        if end < 0:
            raise _bad("the multipart body ends before its closing boundary")
        name = _field_name(body[pos:head_end])
        if name in ROUTING and name is not None:
            key = name.decode("latin-1")
            if end - start > MAX_VALUE:
                raise _bad(f"the form field {key!r} is longer than {MAX_VALUE} bytes")
            values[key] = body[start:end].decode("utf-8", "replace").strip()
            spans[key] = (start, end)
        pos = end + 2  # at the next delimiter
    return Form(values, spans)


def with_field(body: bytes, form: Form, name: str, value: str) -> bytes:
    """``body`` with form field ``name`` set to ``value`` (the original bytes when equal)."""
    if form.values.get(name) == value or name not in form.spans:
        return body
    start, end = form.spans[name]
    return body[:start] + value.encode() + body[end:]
