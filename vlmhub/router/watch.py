"""Watch one request's client for a hang-up, with at most one task for the request's whole life.

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


WATCH_AFTER_S = 0.05
"""How long a request runs before its watch task starts. Most answers of a fast engine come
sooner, and then no task is made at all (a task per request was ~2 % of a proxied request,
py-spy); a client that hung up earlier is seen as soon as the task starts (uvicorn's
``receive`` then answers ``http.disconnect`` at once), so a hang-up is noticed at most this
much later."""


class ClientWatch:
    """One request's hang-up watch (see module docs). Create inside the running loop once the
    body has been read; :meth:`close` it when the request is over. Its task starts
    ``after_s`` later (:data:`WATCH_AFTER_S`; 0: at once)."""

    __slots__ = ("_cancelled", "_receive", "_target", "_task", "_timer", "reason")

    def __init__(self, receive: Receive, after_s: float = WATCH_AFTER_S) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._target: asyncio.Task[Any] | None = None
        self._cancelled: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        """Why the armed task was interrupted (:data:`CLIENT_LEFT`, or what
        :meth:`interrupt` was given); None while it was not."""
        if after_s > 0:
            self._timer = asyncio.get_running_loop().call_later(after_s, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(_wait_disconnect(self._receive))
        self._task.add_done_callback(self._client_left)

    @property
    def gone(self) -> bool:
        """The client has hung up (or its connection failed)."""
        task = self._task
        return task is not None and task.done() and not task.cancelled()

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            task.remove_done_callback(self._client_left)
            task.cancel()
