"""Logging for `vlmhub route`: text or JSON lines on stderr, with secrets masked.

Loggers: ``vlmhub.access`` (one line per request), ``vlmhub.engine`` (one line per engine event:
start, phase, ready, sleep, wake, evict, fail), ``vlmhub.router`` (the rest). Every record passes
:class:`Redactor`, which replaces the configured keys and any ``HF_TOKEN``-like value with
``***`` in the message and its fields, so a secret never reaches a log line.
Logging calls never block: a record is masked, then put on a bounded queue in the calling
thread (the event loop), and one writer thread (:class:`logging.handlers.QueueListener`) writes
the lines to stderr. A stderr that nobody reads (a full pipe) therefore stalls only that thread,
never the router; when the queue is full, lines are dropped and counted, and the count is
written as soon as stderr takes lines again.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

LogFormat = Literal["text", "json"]
ENGINE = logging.getLogger("vlmhub.engine")
ACCESS = logging.getLogger("vlmhub.access")
ROUTER = logging.getLogger("vlmhub.router")
_STD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLMHUB_API_KEYS", "VLMHUB_ADMIN_KEY")


class Redactor(logging.Filter):
    """Masks every known secret (and Hugging Face token shapes) in a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return _TOKEN.sub("***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STD and isinstance(value, str):
                setattr(record, key, self.mask(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


QUEUE_LINES = 10_000
"""Lines kept waiting for a slow stderr before new ones are dropped (and counted)."""


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that never blocks: a full queue drops the record and counts it."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self.dropped = 0
        self._lock = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._lock:
            n, self.dropped = self.dropped, 0
        return n


class _Writer(logging.StreamHandler):  # type: ignore[type-arg]
    """The writer thread's handler: before each line, says how many were dropped."""

    def __init__(self, source: DroppingQueueHandler) -> None:
        super().__init__(sys.stderr)
        self.source = source

    def emit(self, record: logging.LogRecord) -> None:
        if n := self.source.take_dropped():
            note = logging.makeLogRecord({
                "name": "vlmhub.router", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{n} log line(s) dropped: stderr was not taking lines fast enough",
                "dropped": n,
            })
            super().emit(note)
        super().emit(record)


class _Listener(logging.handlers.QueueListener):
    """The writer thread (a daemon). :meth:`close` gives it ``EXIT_WAIT_S`` to write what is
    queued: a stderr nobody reads must not hang the process at exit either."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None], writer: logging.Handler) -> None:
        super().__init__(q, writer)
        self.q = q

    def close(self) -> None:
        """Blocks up to about 2 x ``EXIT_WAIT_S``."""
        with contextlib.suppress(queue.Full):
            self.q.put(None, timeout=EXIT_WAIT_S)  # QueueListener's sentinel
        thread: threading.Thread | None = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(EXIT_WAIT_S)
        self._thread = None


EXIT_WAIT_S = 5.0
_listener: _Listener | None = None


def _stop_listener() -> None:
    """Write the lines still queued, then end the writer thread (see :meth:`_Listener.close`)."""
    global _listener
    if _listener is not None:
        _listener.close()
        _listener = None


def configure(level: str = "info", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    """Send vlmhub's loggers to stderr at ``level`` in ``fmt``, masking ``secrets`` and the
    secret environment variables' values. Records go through a bounded queue to one writer
    thread (module docstring); calling this again replaces the previous set-up."""
    global _listener
    _stop_listener()
    q: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_LINES)
    front = DroppingQueueHandler(q)
    from_env = [v.strip() for n in SECRET_ENV for v in os.environ.get(n, "").split(",")]
    front.addFilter(Redactor([*secrets, *from_env]))  # masked before it leaves the caller
    writer = _Writer(front)
    writer.setFormatter(
        JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    _listener = _Listener(q, writer)
    _listener.start()
    root = logging.getLogger("vlmhub")
    root.handlers = [front]
    root.setLevel(level.upper())
    root.propagate = False


atexit.register(_stop_listener)
