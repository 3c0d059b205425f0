"""Token usage per key name and model: read from the engines' answers, counted, kept on disk.

:class:`UsageTap` reads one answer's ``usage`` on its way to the client: a non-streamed JSON
body is searched from its end for ``"usage"`` and only that object is parsed; a stream is
passed on in whole SSE events (bytes after the last event boundary wait for the next read),
and only events that mention ``"usage"`` are parsed. For a stream the engine is asked for
``stream_options.include_usage``; when the client did not ask for it itself, that final usage
chunk is taken out of what the client receives.

:class:`UsageLedger` keeps the counts in hourly buckets (hour, key name, model) on the event
loop's thread and writes them to ``<state_dir>/usage.json`` (one owner: the router) as an
atomic snapshot: every :data:`FLUSH_S` seconds when something changed, and at shutdown; the
write runs in a worker thread. A key is never stored, only its name (vlmhub.router.keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from starlette.applications import Starlette

log = logging.getLogger("vlmhub.router.usage")

USAGE_FILE = "usage.json"
FLUSH_S = 30.0
HOUR = 3600
STREAM_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Engine routes whose streams carry a usage chunk when asked (``stream_options``)."""
ASK = b'"stream_options":{"include_usage":true},'
_DECODER = json.JSONDecoder()
EVENT_END = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")
"""What ends an SSE event (a blank line, in any of the three line endings)."""
Bucket = tuple[int, str, str]  # hour (Unix time), key name, model


class UsageSink(Protocol):
    def observe_usage(self, key: str, model: str, prompt: int, completion: int) -> None: ...


def _tokens(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(prompt, 0), max(completion or 0, 0)


def body_usage(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a JSON answer, parsing only its ``usage`` object (the
    last ``"usage"`` key: a string value holding that word has its quotes escaped)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    colon = body.find(b":", at + 7)
    if colon < 0:
        return None
    text = body[colon + 1:].decode("utf-8", "replace").lstrip()
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return _tokens(value)


class UsageTap:
    """One answer's usage on its way to the client; ``on_usage(prompt, completion)`` is called
    at most once, by :meth:`finish`. Used from the response's task only."""

    def __init__(self, on_usage: Callable[[int, int], None]) -> None:
        self.on_usage = on_usage
        self.strip = False  # the client did not ask for the usage chunk: take it out
        self._splice = False
        self._pending = b""
        self._found: tuple[int, int] | None = None
        self._done = False

    def prepare(self, body: bytes, payload: Mapping[str, Any] | None, stream: bool,
                path: str) -> tuple[bytes, Mapping[str, Any] | None]:
        """The request to send: a stream of a usage-carrying route asks the engine for
        ``include_usage`` (spliced in at send time, or the body re-encoded when the client
        sent ``stream_options`` without it)."""
        if not stream or payload is None or path not in STREAM_USAGE_PATHS:
            return body, payload
        options = payload.get("stream_options")
        if options is None:
            self._splice = self.strip = True
            return body, payload
        if isinstance(options, dict) and options.get("include_usage") is not True:
            self.strip = True
            new = {**payload, "stream_options": {**options, "include_usage": True}}
            return json.dumps(new, ensure_ascii=False, separators=(",", ":")).encode(), new
        return body, payload

    def request_body(self, body: bytes) -> bytes:
        """``body`` (the bytes going to the engine) with ``include_usage`` spliced in."""
        if not self._splice:
            return body
        at = body.find(b"{")
        return body if at < 0 else body[:at + 1] + ASK + body[at + 1:]

    def body(self, body: bytes) -> None:
        """A non-streamed answer (200)."""
        self._found = body_usage(body)

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of a stream to send now: whole events only (the rest waits for the next
        chunk), the usage chunk taken out when :attr:`strip`."""
        data = self._pending + chunk if self._pending else chunk
        ends = [at + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")
                if (at := data.rfind(sep)) >= 0]
        end = max(ends, default=-1)
        if end < 0:
            if len(data) > 1 << 16:  # no event boundary in sight: not ours to hold
                self._pending = b""
                return data
            self._pending = data
            return b""
        head, self._pending = data[:end], data[end:]
        return self._events(head) if b'"usage"' in head else head

    def flush(self) -> bytes:
        """What is left of the stream at its end."""
        rest, self._pending = self._pending, b""
        return self._events(rest) if b'"usage"' in rest else rest

    def _events(self, head: bytes) -> bytes:
        parts = EVENT_END.split(head)  # event, its end, event, its end, ..., the rest
        kept: list[bytes] = []
        for i in range(0, len(parts), 2):
            event, end = parts[i], parts[i + 1] if i + 1 < len(parts) else b""
            if b'"usage"' in event and event.startswith(b"data:"):
                try:
                    obj = json.loads(event[5:])
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and (got := _tokens(obj.get("usage"))) is not None:
                    self._found = got
                    if self.strip and obj.get("choices") == []:
                        continue
            kept += (event, end)
        return b"".join(kept)

    def finish(self) -> None:
        """Report the usage found (once; nothing when the answer carried none)."""
        if not self._done:
            self._done = True
            if self._found is not None:
                self.on_usage(*self._found)


SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str | None, now: float) -> float | None:
    """``1d``, ``12h``, ``30m``, ``2w``, a Unix time or an ISO date/time -> a Unix time
    (None: everything). ValueError for anything else."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if (m := SINCE.match(text)) is not None:
        return now - float(m.group(1)) * UNITS[m.group(2)]
    with contextlib.suppress(ValueError):
        return float(text)
    import datetime as dt
    when = dt.datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


class UsageLedger:
    """Counts per (hour, key name, model): requests, prompt and completion tokens. Mutated on
    the event loop's thread only; :meth:`save` copies it there and writes in any thread."""

    def __init__(self, metrics: UsageSink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics, self.clock = metrics, clock
        self.buckets: dict[Bucket, list[int]] = {}
        self.path: Path | None = None
        self.dirty = False

    def add(self, key: str, model: str, prompt: int, completion: int) -> None:
        hour = int(self.clock()) // HOUR * HOUR
        counts = self.buckets.get((hour, key, model))
        if counts is None:
            counts = self.buckets[(hour, key, model)] = [0, 0, 0]
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        self.dirty = True
        if self.metrics is not None:
            self.metrics.observe_usage(key, model, prompt, completion)

    def report(self, since: float | None) -> list[dict[str, Any]]:
        """Totals per key name and model over the hours from ``since`` (its hour included)."""
        start = -1 if since is None else int(since) // HOUR * HOUR
        totals: dict[tuple[str, str], list[int]] = {}
        for (hour, key, model), counts in self.buckets.items():
            if hour >= start:
                t = totals.setdefault((key, model), [0, 0, 0])
                for i in range(3):
                    t[i] += counts[i]
        return [{"key": k, "model": m, "requests": r, "prompt_tokens": p,
                 "completion_tokens": c, "total_tokens": p + c}
                for (k, m), (r, p, c) in sorted(totals.items())]

    def load(self, state_dir: Path) -> None:
        """Read ``<state_dir>/usage.json`` (blocks on the disk; start-up). A missing file is
        an empty ledger; a damaged one is set aside (``usage.json.bad``) and logged."""
        self.path = state_dir / USAGE_FILE
        try:
            rows = json.loads(self.path.read_text())["buckets"]
            for hour, key, model, req, prompt, completion in rows:
                self.buckets[(int(hour), str(key), str(model))] = [
                    int(req), int(prompt), int(completion)]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("usage file %s is unreadable (%s); starting from zero, the old file "
                        "kept as %s.bad", self.path, type(exc).__name__, self.path.name)
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_name(USAGE_FILE + ".bad"))

    def snapshot(self) -> bytes:
        rows = [[h, k, m, *c] for (h, k, m), c in sorted(self.buckets.items())]
        self.dirty = False
        return json.dumps({"version": 1, "buckets": rows}, separators=(",", ":")).encode()

    def write(self, data: bytes) -> None:
        """Replace the usage file with ``data`` (temp file, fsync, rename). Blocks on disk."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{USAGE_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    @contextlib.asynccontextmanager
    async def keep(self, every_s: float = FLUSH_S) -> AsyncIterator[None]:
        """Write a snapshot every ``every_s`` seconds when counts changed, and a last one when
        the caller's block ends (the router's lifespan)."""

        async def flusher() -> None:
            while True:
                await asyncio.sleep(every_s)
                if self.dirty:
                    try:
                        await asyncio.to_thread(self.write, self.snapshot())
                    except OSError as exc:
                        self.dirty = True
                        log.warning("cannot write the usage file: %s", exc)

        task = asyncio.create_task(flusher())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await asyncio.to_thread(self.write, self.snapshot())
            except OSError as exc:
                log.warning("cannot write the usage file at shutdown: %s", exc)


def attach_usage(app: Starlette, state_dir: Path) -> UsageLedger:
    """Keep ``app``'s usage in ``<state_dir>/usage.json``: loaded now (blocks on the disk:
    start-up), written while the app runs and at its shutdown (wraps the app's lifespan)."""
    ledger = cast(UsageLedger, app.state.router.usage)
    ledger.load(state_dir)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Starlette) -> AsyncIterator[Any]:
        async with inner(a) as inner_state, ledger.keep():
            yield inner_state

    app.router.lifespan_context = lifespan
    return ledger
