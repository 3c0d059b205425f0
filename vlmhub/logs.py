"""Logging for `vlmhub route`: text or JSON lines on stderr, with secrets masked.

Loggers: ``vlmhub.access`` (one line per request), ``vlmhub.engine`` (one line per engine event:
start, phase, ready, sleep, wake, evict, fail), ``vlmhub.router`` (the rest). Every line is
masked whole by :class:`Redactor` just before it is written (message, traceback, stack and
fields alike): the configured keys, keys added by a reload (:func:`add_secrets`) and any
``HF_TOKEN``-like value become ``***``, so a secret never reaches a log line.

Logging calls never block. A record is turned into a small tuple in the calling thread (its
message and traceback formatted there, as the stdlib's QueueHandler does) and appended to a
bounded deque; one writer thread (:class:`_Writer`) drains the deque every :data:`POLL_S` and
writes the lines of a batch with one ``write``. A stderr that nobody reads (a full pipe)
therefore stalls only that thread, never the router; when the deque is full, lines are dropped
and counted, and the count is written as soon as stderr takes lines again.

An access line skips the logging module altogether (:func:`access`: a tuple of fields). On an
event loop (the router's) the loop itself renders and writes them, one batch per
:data:`POLL_S`, writing only what stderr takes without blocking (:class:`_LoopLines`): a
second thread rendering them held the GIL the loop needed, which cost the router ~10 % of its
requests/s at c=64 for a few microseconds of work a line. Off a loop they go to the writer.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import select
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal, TextIO, TypeAlias

LogFormat = Literal["text", "json"]
ENGINE = logging.getLogger("vlmhub.engine")
ACCESS = logging.getLogger("vlmhub.access")
ROUTER = logging.getLogger("vlmhub.router")
_STD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLMHUB_API_KEYS", "VLMHUB_ADMIN_KEY")


class Redactor(logging.Filter):
    """Masks every known secret (and Hugging Face token shapes) in text or a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self._any: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask ``secrets`` too from now on (one attribute swap: safe while another thread
        masks). All of them are one compiled alternation, longest first, so a line is scanned
        once however many keys there are (100 named keys: one scan, not 100 searches)."""
        fresh = {s for s in secrets if s and len(s) >= 4} | set(self.secrets)
        ordered = sorted(fresh, key=len, reverse=True)
        self._any = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.secrets = ordered

    def mask(self, text: str) -> str:
        pattern = self._any
        if pattern is not None:
            text = pattern.sub("***", text)
        return _TOKEN.sub("***", text) if "hf_" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask ``record`` whole, its traceback and stack included (they become its message)."""
        record.msg = self.mask(_full_message(record))
        record.args = None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        for key, value in list(vars(record).items()):
            if key not in _STD and isinstance(value, str):
                setattr(record, key, self.mask(value))
        return True


def _full_message(record: logging.LogRecord) -> str:
    """The record's message with its traceback and stack appended, as a formatter shows it."""
    msg = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        msg = f"{msg}\n{record.exc_text}"
    if record.stack_info:
        msg = f"{msg}\n{record.stack_info}"
    return msg


# -- access lines ------------------------------------------------------------------------------
AccessFields = tuple[float, str, str, str, "str | None", "str | None", int, "float | None",
                     "str | None", "float | None", float, int]
"""(time, request id, method, path, model, asked, status, queue ms, replica, ttfb ms,
duration ms, bytes): one request, as :class:`vlmhub.router.access.AccessMiddleware` saw it."""
ACCESS_KEYS = ("request_id", "model", "asked", "status", "queue_ms", "replica", "ttfb_ms",
               "duration_ms", "bytes", "path")


def access_message(f: AccessFields) -> str:
    """The access line's text: ``ID METHOD PATH model=M status=S queue_ms=... bytes=N``."""
    _, rid, method, path, model, asked, status, queue_ms, replica, ttfb, ms, sent = f
    also = f" (asked {asked})" if asked and asked != model else ""
    q = f"{queue_ms:.0f}" if queue_ms is not None else "-"
    t = f"{ttfb:.0f}" if ttfb is not None else "-"
    return (f"{rid} {method} {path} model={model or '-'}{also} status={status} queue_ms={q} "
            f"replica={replica or '-'} ttfb_ms={t} ms={ms:.0f} bytes={sent}")


def access_extra(f: AccessFields) -> dict[str, Any]:
    """The access line's fields (JSON lines and records carry them)."""
    _, rid, _, path, model, asked, status, queue_ms, replica, ttfb, ms, sent = f
    return dict(zip(ACCESS_KEYS, (rid, model, asked, status, queue_ms, replica, ttfb, ms, sent,
                                  path), strict=True))


def access(fields: AccessFields) -> None:
    """Log one access line. Call only when ``ACCESS.isEnabledFor(logging.INFO)``. With
    :func:`configure`'s writer and no handler on ``vlmhub.access`` itself, the tuple goes
    straight to the writer (no record, no format, no lock); otherwise a normal record."""
    writer = _writer
    if writer is not None and not ACCESS.handlers:
        lines = _lines
        if lines is None or lines.writer is not writer or not lines.running():
            lines = _loop_lines(writer)
        if lines is not None:
            lines.add(fields)
        else:  # no event loop here (or no file descriptor): the writer thread renders it
            writer.put(fields)
        return
    ACCESS.info("%s", access_message(fields), extra=access_extra(fields))


PIPE_BUF = 4096
"""Bytes a pipe takes in one write, whole or not at all, once it polls writable."""


class _LoopLines:
    """The access lines of one event loop, rendered and written by that loop itself: one
    callback every :data:`POLL_S` renders the batch (:meth:`_Writer.lines_of`) and writes
    what stderr takes now, in whole lines of at most :data:`PIPE_BUF` bytes, each write only
    after ``poll`` says stderr can take it, so the loop never blocks. A stderr nobody reads
    keeps the rest waiting, up to :data:`QUEUE_LINES` lines; beyond that lines are dropped
    and counted, and the count is written once stderr takes lines again.

    Why not the writer thread: rendering there holds the GIL the event loop needs, and every
    hand-off waits for the OS to run that thread; on two busy cores that cost the router ~10 %
    of its requests/s at c=64 for ~4 us of work a line (docs/benchmarks.md). Use on its loop's
    thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: _Writer, fd: int) -> None:
        self.loop, self.writer, self.fd = loop, writer, fd
        self.fields: list[AccessFields] = []
        self.chunks: deque[bytes] = deque()
        """Rendered, waiting for stderr: whole lines, at most PIPE_BUF bytes a chunk."""
        self.waiting = 0  # lines in chunks
        self.dropped = 0
        self.timer: asyncio.TimerHandle | None = None

    def running(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def add(self, fields: AccessFields) -> None:
        if len(self.fields) + self.waiting >= QUEUE_LINES:
            self.dropped += 1
        else:
            self.fields.append(fields)
        if self.timer is None:
            self.timer = self.loop.call_later(POLL_S, self.flush)

    def flush(self) -> None:
        """Render what came since the last flush, write what stderr takes (never blocks)."""
        self.timer = None
        self._render()
        self._drain()
        if self.chunks or self.fields or self.dropped:
            self.timer = self.loop.call_later(POLL_S, self.flush)

    def _render(self) -> None:
        batch, self.fields = self.fields, []
        if not batch:
            return
        size, part = 0, list[bytes]()
        for line in self.writer.lines_of(batch):
            raw = line.encode("utf-8", "backslashreplace")
            if len(raw) > PIPE_BUF:  # one line must stay one atomic write
                raw = raw[:PIPE_BUF - 4] + b"...\n"
            if size + len(raw) > PIPE_BUF:
                self.chunks.append(b"".join(part))
                size, part = 0, list[bytes]()
            part.append(raw)
            size += len(raw)
            self.waiting += 1
        if part:
            self.chunks.append(b"".join(part))

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while self.chunks or self.dropped:
            try:
                if not poller.poll(0):
                    return  # stderr takes nothing now: the rest waits for the next flush
                if self.dropped:  # said once stderr takes lines again
                    n, self.dropped = self.dropped, 0
                    os.write(self.fd, self.writer.dropped_line(n).encode())
                    continue
                chunk = self.chunks.popleft()
                os.write(self.fd, chunk)
                self.waiting -= chunk.count(b"\n")
            except OSError:  # stderr closed: nothing to write to
                self.chunks.clear()
                self.waiting = self.dropped = 0
                return

    def close(self) -> None:
        """At exit: hand what is left to the writer thread (it may block, briefly)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        rest = b"".join(self.chunks).decode("utf-8", "replace") + "".join(
            self.writer.lines_of(self.fields))
        self.chunks.clear()
        self.fields, self.waiting = [], 0
        if self.dropped:
            rest = self.writer.dropped_line(self.dropped) + rest
            self.dropped = 0
        if rest:
            self.writer.put(rest)


_lines: _LoopLines | None = None
_all_lines: list[_LoopLines] = []


def _loop_lines(writer: _Writer) -> _LoopLines | None:
    """The access lines of the running event loop (made on first use), or None off a loop or
    without a file descriptor for stderr."""
    global _lines
    try:
        loop = asyncio.get_running_loop()
        fd = writer.stream.fileno()
    except (RuntimeError, OSError, ValueError, AttributeError):
        return None
    _lines = _LoopLines(loop, writer, fd)
    _all_lines.append(_lines)
    del _all_lines[:-8]  # older loops' lines were flushed by their loops, or at exit below
    return _lines


# -- the writer --------------------------------------------------------------------------------
QUEUE_LINES = 10_000
"""Lines kept waiting for a slow stderr before new ones are dropped (and counted)."""
POLL_S = 0.02
"""How often the writer looks for lines (a line waits at most this long)."""
EXIT_WAIT_S = 5.0
Line = tuple[float, int, str, str, dict[str, Any]]
"""(time, level, logger, message with traceback, extra fields): a record, formatted."""
Item: TypeAlias = "Line | AccessFields | str"
"""What the writer's deque holds: a record, an access line's fields, or rendered text."""
_LEVEL_NAMES = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}


class _Front(logging.Handler):
    """The handler on ``vlmhub``: the record as a :data:`Line`, handed to the writer."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: the deque is safe
        try:
            extra = {k: v for k, v in vars(record).items() if k not in _STD}
            self.writer.put((record.created, record.levelno, record.name,
                             _full_message(record), extra))
        except Exception:
            self.handleError(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class _Writer(threading.Thread):
    """The writer thread (a daemon): drains the deque, masks and writes each batch at once."""

    def __init__(self, stream: TextIO, fmt: LogFormat, redactor: Redactor) -> None:
        super().__init__(name="vlmhub-log-writer", daemon=True)
        self.stream, self.json, self.redactor = stream, fmt == "json", redactor
        self.items: deque[Item] = deque()
        self.dropped = 0
        self._lock = threading.Lock()  # only the drop count's
        self._closing = threading.Event()
        self._stamp: tuple[int, str] = (-1, "")

    def put(self, item: Item) -> None:
        """From any thread; never blocks. A full deque drops ``item`` (counted)."""
        if len(self.items) >= QUEUE_LINES:
            with self._lock:
                self.dropped += 1
            return
        self.items.append(item)

    def take_dropped(self) -> int:
        with self._lock:
            n, self.dropped = self.dropped, 0
        return n

    def run(self) -> None:
        items = self.items
        while True:
            stopping = self._closing.is_set()
            batch = [items.popleft() for _ in range(len(items))]
            if n := self.take_dropped():
                batch.insert(0, self.dropped_line(n))
            if batch:
                self._write(self._batch(batch))
            if stopping:
                if not items:
                    return
            else:  # wait even after a batch: one wake-up and one write per POLL_S, not per line
                self._closing.wait(POLL_S)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: nothing to write to
            pass

    def close(self) -> None:
        """Write what is queued and end the thread. Blocks up to ``EXIT_WAIT_S`` (a stderr
        nobody reads must not hang the process at exit)."""
        self._closing.set()
        if self.is_alive():
            self.join(EXIT_WAIT_S)

    def _time(self, created: float) -> str:
        sec = int(created)
        if self._stamp[0] != sec:
            self._stamp = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
        return self._stamp[1]

    def dropped_line(self, n: int) -> str:
        """The warning that ``n`` lines were dropped, rendered."""
        return self._render((time.time(), logging.WARNING, "vlmhub.router",
                             f"{n} log line(s) dropped: stderr was not taking lines fast "
                             "enough", {"dropped": n}))

    def lines_of(self, batch: list[AccessFields]) -> list[str]:
        """Access lines rendered and masked (as :meth:`_batch`, kept apart)."""
        if self.json:
            return [self._render(i) for i in batch]
        return self.redactor.mask("".join(map(self._access_line, batch))).splitlines(True)

    def _batch(self, batch: list[Item]) -> str:
        """The text of a batch. As text, the lines are joined unmasked and the whole batch is
        masked in one pass (a secret holds no newline); an access line takes a short path (no
        field dict, whole-number formatting): rendering on this thread holds the GIL, and
        with the per-line path the event loop lost ~10 % of its requests/s at c=64
        (docs/benchmarks.md)."""
        if self.json:
            return "".join(i if isinstance(i, str) else self._render(i) for i in batch)
        return self.redactor.mask("".join(
            i if isinstance(i, str) else self._access_line(i) if len(i) != 5
            else self._render(i, masked=False) for i in batch))

    def _access_line(self, f: AccessFields) -> str:
        created, rid, method, path, model, asked, status, queue_ms, replica, ttfb, ms, sent = f
        sec = int(created)
        stamp = self._stamp[1] if self._stamp[0] == sec else self._time(created)
        also = f" (asked {asked})" if asked and asked != model else ""
        return (f"{stamp},{int((created - sec) * 1000):03d} INFO vlmhub.access: {rid} {method} "
                f"{path} model={model or '-'}{also} status={status} queue_ms="
                f"{'-' if queue_ms is None else round(queue_ms)} replica={replica or '-'} "
                f"ttfb_ms={'-' if ttfb is None else round(ttfb)} ms={round(ms)} bytes={sent}\n")

    def _render(self, item: Line | AccessFields, masked: bool = True) -> str:
        if len(item) == 5:
            created, level, name, message, extra = item
        else:
            fields: AccessFields = item
            created, level, name = fields[0], logging.INFO, "vlmhub.access"
            message, extra = access_message(fields), access_extra(fields)
        mask = self.redactor.mask
        ms = int((created - int(created)) * 1000)
        level_name = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        if not self.json:
            line = f"{self._time(created)},{ms:03d} {level_name} {name}: {message}\n"
            return mask(line) if masked else line
        out: dict[str, Any] = {"time": f"{self._time(created).replace(' ', 'T')}.{ms:03d}",
                               "level": level_name.lower(), "logger": name,
                               "message": mask(message)}
        for k, v in extra.items():
            out[k] = mask(v) if isinstance(v, str) else v
        return json.dumps(out, default=lambda v: mask(str(v))) + "\n"


_writer: _Writer | None = None
_redactor = Redactor(())


def _stop_writer() -> None:
    """Write the lines still queued, then end the writer thread (see :meth:`_Writer.close`)."""
    global _writer, _lines
    for lines in _all_lines:
        lines.close()
    _all_lines.clear()
    _lines = None
    writer, _writer = _writer, None
    if writer is not None:
        writer.close()


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` too from now on (a reload's new keys); the old ones stay masked."""
    _redactor.add(secrets)


def configure(level: str = "info", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    """Send vlmhub's loggers to stderr at ``level`` in ``fmt``, masking ``secrets`` and the
    secret environment variables' values. Lines go through a bounded deque to one writer
    thread (module docstring); calling this again replaces the previous set-up."""
    global _writer, _redactor
    _stop_writer()
    from_env = [v.strip() for n in SECRET_ENV for v in os.environ.get(n, "").split(",")]
    _redactor = Redactor([*secrets, *from_env])
    writer = _Writer(sys.stderr, fmt, _redactor)
    writer.start()
    _writer = writer
    front = _Front(writer)
    root = logging.getLogger("vlmhub")
    root.handlers = [front]
    root.setLevel(level.upper())
    root.propagate = False
    server = logging.getLogger("uvicorn")  # its tracebacks are masked the same way
    server.handlers = [front]
    server.propagate = False


def set_level(level: str) -> None:
    """Change the level of vlmhub's loggers (a reload's ``router.log_level``)."""
    logging.getLogger("vlmhub").setLevel(level.upper())


atexit.register(_stop_writer)
