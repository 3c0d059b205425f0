"""Errors a user sees. Each carries the fix in its message; none should surface as a traceback."""

from __future__ import annotations


class VlmhubError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing message that names the fix."""


class RuntimeUnavailable(VlmhubError):
    """The engine host (Docker daemon, vLLM executable) cannot be reached."""


class ImageUnavailable(VlmhubError):
    """The image is missing locally and could not be pulled."""


class PortInUse(VlmhubError):
    """A requested port is taken and no free one was found in the range."""


class EngineStartError(VlmhubError):
    """The engine exited or failed before it became ready.

    ``reason`` is the parsed vLLM reason (see :mod:`vlmhub.engine_log`), ``tail`` the last
    log lines.
    """

    def __init__(self, model: str, message: str, tail: list[str], code: str = "engine_exited"):
        self.model = model
        self.code = code
        self.tail = tail
        super().__init__(message)


class EngineStartTimeout(EngineStartError):
    """The engine did not become ready within its start-up timeout."""
