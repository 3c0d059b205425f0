"""Host port choice for engines. Blocks only on a local bind() test."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from vlmhub.errors import PortInUse


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Any free port, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_port(
    preferred: int | None,
    port_range: tuple[int, int],
    taken: Iterable[int] = (),
    host: str = "127.0.0.1",
) -> tuple[int, str | None]:
    """A free port: ``preferred`` if free, else the next free one in ``port_range``.

    Returns ``(port, note)``; ``note`` says why the port differs from the one asked for.
    """
    used = set(taken)
    if preferred is not None and preferred not in used and port_is_free(preferred, host):
        return preferred, None
    lo, hi = port_range
    for port in range(lo, hi + 1):
        if port not in used and port != preferred and port_is_free(port, host):
            note = f"port {preferred} is in use; using {port}" if preferred is not None else None
            return port, note
    raise PortInUse(
        f"no free port in {lo}-{hi} on {host}"
        + (f" (and {preferred} is in use)" if preferred is not None else "")
        + "; free one, or widen runtime.port_range in models.yaml"
    )
