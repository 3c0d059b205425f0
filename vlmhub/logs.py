"""Logging for `vlmhub route`: text or JSON lines on stderr, with secrets masked.

Loggers: ``vlmhub.access`` (one line per request), ``vlmhub.engine`` (one line per engine event:
start, phase, ready, sleep, wake, evict, fail), ``vlmhub.router`` (the rest). Every record passes
:class:`Redactor`, which replaces the configured keys and any ``HF_TOKEN``-like value with
``***`` in the message and its fields, so a secret never reaches a log line.
Logging calls never block on the network; handlers write to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Literal

LogFormat = Literal["text", "json"]
ENGINE = logging.getLogger("vlmhub.engine")
ACCESS = logging.getLogger("vlmhub.access")
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


def configure(level: str = "info", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    """Send vlmhub's loggers to stderr at ``level`` in ``fmt``, masking ``secrets`` and the
    secret environment variables' values."""
    handler = logging.StreamHandler(sys.stderr)
    from_env = [v.strip() for n in SECRET_ENV for v in os.environ.get(n, "").split(",")]
    handler.addFilter(Redactor([*secrets, *from_env]))
    handler.setFormatter(
        JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("vlmhub")
    root.handlers = [handler]
    root.setLevel(level.upper())
    root.propagate = False
