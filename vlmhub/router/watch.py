"""Watch one request's client for a hang-up, with one task for the request's whole life.

A proxied request waits twice while its client may leave: for a lease (a model loading), then
for the engine's answer. Racing each wait against the client in separate tasks cost four extra
tasks and two ``asyncio.wait`` per request. :class:`ClientWatch` runs one task that waits for
``http.disconnect``; whichever coroutine is *armed* at that moment is cancelled in its own task,
so a lease granted at once (a ready or external model) runs inline, with no task and no race.

Use on the event loop's thread only. The cancellation is delivered at the armed task's next
``await``; :meth:`ClientWatch.caught` tells it apart from any other cancellation and undoes it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

CLIENT_LEFT = "client left"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """One request's hang-up watch (see module docs). Create inside the running loop once the
    body has been read; :meth:`close` it when the request is over."""

    __slots__ = ("_cancelled", "_target", "_task", "reason")

    def __init__(self, receive: Receive) -> None:
        self._task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            _wait_disconnect(receive))
        self._task.add_done_callback(self._client_left)
        self._target: asyncio.Task[Any] | None = None
        self._cancelled: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        """Why the armed task was interrupted (:data:`CLIENT_LEFT`, or what
        :meth:`interrupt` was given); None while it was not."""

    @property
    def gone(self) -> bool:
        """The client has hung up (or its connection failed)."""
        return self._task.done() and not self._task.cancelled()

    def arm(self) -> None:
        """From now on a hang-up (or :meth:`interrupt`) cancels the current task."""
        self._target = asyncio.current_task()

    def disarm(self) -> None:
        """Stop cancelling: call before anything that must not be cut short."""
        self._target = None

    def interrupt(self, reason: str) -> None:
        """Cancel the armed task with ``reason`` (at most once per watch; a no-op when
        disarmed). Safe from any callback on the loop."""
        target = self._target
        if target is None or self.reason is not None:
            return
        self.reason, self._cancelled, self._target = reason, target, None
        target.cancel()

    def caught(self) -> str | None:
        """Call in ``except asyncio.CancelledError`` of the armed task: the reason when this
        watch cancelled it, and the cancellation undone; None when it came from elsewhere (then
        re-raise it)."""
        task = asyncio.current_task()
        if self.reason is None or task is None or self._cancelled is not task:
            return None
        self._cancelled = None
        return self.reason if task.uncancel() == 0 else None

    def _client_left(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        task.exception()  # a failed receive counts as a hang-up; retrieved so it is not logged
        self.interrupt(CLIENT_LEFT)

    def close(self) -> None:
        """Stop watching (idempotent)."""
        self._target = None
        if not self._task.done():
            self._task.remove_done_callback(self._client_left)
            self._task.cancel()
