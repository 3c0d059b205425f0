"""Runs batches: one background task, owned by the router app's lifespan.

Each unfinished batch gets its own task (:meth:`BatchRunner.run` starts them, also for batches
found on disk at start: a restarted router resumes them). A batch goes ``validating`` ->
``in_progress`` -> ``finalizing`` -> ``completed`` (or ``failed`` at validation, ``cancelling``
-> ``cancelled``, or ``expired`` when its ``completion_window`` passes).

Every line takes the path a ``/v1`` request takes, minus the HTTP hop: the model name is
resolved (aliases), a lease is acquired from the supervisor **at batch priority** (so the swap
policy treats it as it treats ``vlmhub ocr``, and the model's queue bounds it), and the request
is forwarded by :func:`vlmhub.router.proxy.forward` over the router's pooled session; refusals
become the same OpenAI-shaped errors. At most ``router.batch.concurrency`` lines of all batches
are in flight at once (one semaphore). A 502/503/504 is retried (3 tries in all) before it is
recorded.

Exactly once in the output: a line's result is appended to the batch's journal and fsynced
*before* it is counted; a resumed batch skips every custom_id in its journal. A line that was in
flight when the router stopped or crashed has no journal entry, so it runs again after the
restart (its engine may have seen it twice; its output line is written once).

Everything runs on the event loop; file reads, journal appends and output writes go to worker
threads. Shutdown cancels the tasks; a cancelled line releases its lease and is not journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import Message

from vlmhub.config.schema import BatchConfig
from vlmhub.control.contract import AcquireError
from vlmhub.router.batch_lines import Line, answered, jsonl, parse_lines, succeeded, unanswered
from vlmhub.router.batch_store import BatchStore, Journal, Record
from vlmhub.router.errors import acquire_error_response, unknown_model_response
from vlmhub.router.keys import batch_key
from vlmhub.router.proxy import forward
from vlmhub.router.state import RouterState

log = logging.getLogger("vlmhub.router.batches")
RETRIED = frozenset({502, 503, 504})
TRIES = 3
Results = dict[str, Record]  # custom_id -> finished line


class BatchRunner:
    """See the module docs. ``state()`` is the router's :class:`RouterState` (its supervisor,
    session, metrics and config); ``config.concurrency`` is read once, at :meth:`run` (a
    change takes a restart), ``max_lines`` from the router's config at each validation."""

    def __init__(self, store: BatchStore, state: Callable[[], RouterState],
                 config: BatchConfig, *, tick_s: float = 1.0, backoff_s: float = 1.0) -> None:
        self.store, self.state, self.config = store, state, config
        self.tick_s, self.backoff_s = tick_s, backoff_s
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None

    def wake(self) -> None:
        """Look for new or cancelled batches now (call on the loop's thread)."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        """Start a task per unfinished batch, now and whenever woken; until cancelled, which
        cancels every batch task (their lines in flight are not journaled: they run again)."""
        self._wakeup, self._slots = asyncio.Event(), asyncio.Semaphore(self.config.concurrency)
        try:
            while True:
                for rec in self.store.unfinished():
                    if rec["id"] not in self.tasks:
                        self.tasks[rec["id"]] = asyncio.create_task(self._guarded(rec))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick_s):
                        await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, rec: Record) -> None:
        try:
            await self._run_batch(rec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a disk failure: the batch fails, the router serves
            log.exception("batch %s failed", rec["id"])
            with contextlib.suppress(OSError):
                self.store.set_status(rec, "failed", errors={"object": "list", "data": [{
                    "code": "internal_error", "message": f"{type(exc).__name__}: {exc}",
                    "param": None, "line": None}]})
        finally:
            self.tasks.pop(rec["id"], None)

    def _known(self, name: str) -> bool:
        return self.state().supervisor.resolve(name) is not None

    async def _lines(self, rec: Record) -> tuple[list[Line], list[dict[str, Any]]]:
        """The batch's lines and their problems. Model names are checked at validation only:
        a resumed batch keeps a line whose model has gone (it is answered 404)."""
        known = self._known if rec["status"] == "validating" else (lambda _: True)
        path = self.store.content_path(rec["input_file_id"])
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return [], [{"code": "missing_input_file", "message": f"the input file "
                         f"{rec['input_file_id']} is gone", "param": None, "line": None}]
        most = self.state().config.router.batch.max_lines
        return await asyncio.to_thread(parse_lines, data, rec["endpoint"], known, most)

    async def _run_batch(self, rec: Record) -> None:
        lines, problems = await self._lines(rec)
        if rec["status"] == "validating":
            if problems:
                self.store.set_status(rec, "failed",
                                      errors={"object": "list", "data": problems})
                return
            rec["request_counts"]["total"] = len(lines)
            self.store.set_status(rec, "in_progress")
        elif problems and not lines:  # its input file went missing while it was stopped
            self.store.set_status(rec, "failed", errors={"object": "list", "data": problems})
            return
        journal = self.store.journal(rec["id"])
        results: Results = {}
        for item in await asyncio.to_thread(journal.load):
            results.setdefault(item["custom_id"], item)
        self._count(rec, results)
        if rec["status"] == "in_progress":
            await self._run_lines(rec, lines, results, journal)
        await self._finish(rec, lines, results)

    def _count(self, rec: Record, results: Results) -> None:
        ok = sum(1 for r in results.values() if succeeded(r))
        rec["request_counts"].update(completed=ok, failed=len(results) - ok)

    def _stopping(self, rec: Record) -> bool:
        return bool(rec["status"] != "in_progress" or self.store.clock() >= rec["expires_at"])

    async def _run_lines(self, rec: Record, lines: list[Line], results: Results,
                         journal: Journal) -> None:
        """Send every line not yet in ``results``, at most ``concurrency`` at once (all
        batches together), until done, cancelled or expired; lines in flight finish."""
        assert self._slots is not None
        slots = self._slots
        running: set[asyncio.Task[None]] = set()
        try:
            for line in lines:
                if line.custom_id in results:
                    continue
                if self._stopping(rec):
                    break
                await slots.acquire()
                if self._stopping(rec):
                    slots.release()
                    break
                task = asyncio.create_task(self._one(rec, line, results, journal))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        except BaseException:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _one(self, rec: Record, line: Line, results: Results, journal: Journal) -> None:
        assert self._slots is not None
        try:
            done = await self._attempts(rec, line)
            await asyncio.to_thread(journal.append, done)  # durable before it counts
            results.setdefault(line.custom_id, done)
            self._count(rec, results)
        finally:
            self._slots.release()

    async def _attempts(self, rec: Record, line: Line) -> Record:
        for attempt in range(TRIES):
            status, body, request_id, retry_after = await self._send(rec, line)
            if status not in RETRIED or attempt == TRIES - 1 or self._stopping(rec):
                break
            await asyncio.sleep(min(30.0, retry_after or self.backoff_s * 2**attempt))
        return answered(line.custom_id, status, request_id, body)

    async def _send(self, rec: Record, line: Line) -> tuple[int, Any, str, float | None]:
        """One try: (status, body, request id, retry-after). Blocks (asynchronously) while
        the model loads and while the engine answers."""
        st = self.state()
        request_id = f"req_{uuid.uuid4().hex}"
        started = time.monotonic()
        model = st.supervisor.resolve(line.body["model"])
        key = batch_key(st.settings.keys, rec.get("owner"))
        if model is None or not key.allows(model):  # gone since validation, or not its key's
            missing = unknown_model_response(line.body["model"], st.supervisor, key.visible)
            return 404, json.loads(bytes(missing.body)), request_id, None
        try:
            lease = await st.supervisor.acquire(model, "batch")
        except AcquireError as exc:
            st.metrics.observe_request(model, exc.status, time.monotonic() - started)
            refusal = acquire_error_response(exc)
            return exc.status, json.loads(bytes(refusal.body)), request_id, exc.retry_after
        body = json.dumps(line.body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            response = await forward(
                st.http(), st.supervisor, lease, method="POST", path=rec["endpoint"],
                headers=[("content-type", "application/json"), ("x-request-id", request_id)],
                body=body, payload=line.body, stream=False, usage=st.meter(key, model))
        except BaseException:
            st.supervisor.release(lease)  # never handed to a response
            raise
        status, answer = await _collect(response)
        st.metrics.observe_request(model, status, time.monotonic() - started)
        return status, answer, request_id, None

    async def _finish(self, rec: Record, lines: list[Line], results: Results) -> None:
        """Write the output and error files and end the batch (completed, cancelled or
        expired)."""
        missing = [ln.custom_id for ln in lines if ln.custom_id not in results]
        if rec["status"] == "in_progress" and missing:  # stopped early: the window passed
            final = "expired"
            for cid in missing:
                results[cid] = unanswered(cid, "batch_expired", "This request could not be "
                                          "executed before the completion window expired.")
            self._count(rec, results)
        elif rec["status"] == "cancelling":
            final = "cancelled"
        else:
            final = "completed"
            if rec["status"] != "finalizing":
                self.store.set_status(rec, "finalizing")
        order = {ln.custom_id: ln.number for ln in lines}
        done = sorted(results.values(), key=lambda r: order.get(r["custom_id"], 0))
        ok = [r for r in done if succeeded(r)]
        bad = [r for r in done if not succeeded(r)]
        stem = rec["id"].removeprefix("batch_")[:24]
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for field, part, chosen in (("output_file_id", "output", ok),
                                    ("error_file_id", "error", bad)):
            if chosen:
                f = await self.store.add_file(jsonl(chosen), f"{rec['id']}_{part}.jsonl",
                                              "batch_output", rec.get("owner"),
                                              f"file-{stem}-{part}")
                ids[field] = f["id"]
        self.store.set_status(rec, final, **ids)
        log.info("batch %s %s: %d ok, %d failed", rec["id"], final, len(ok), len(bad))

    def cancel(self, rec: Record) -> bool:
        """Start cancelling a batch (lines in flight finish; no new one starts). False when it
        has already ended."""
        if rec["status"] not in ("validating", "in_progress"):
            return bool(rec["status"] == "cancelling")
        self.store.set_status(rec, "cancelling")
        self.wake()
        return True


async def _collect(response: Any) -> tuple[int, Any]:
    """Run a :class:`~vlmhub.router.proxy.ProxyResponse` to its end: (status, JSON body, or
    the text when it is not JSON). No client can hang up: the receive channel never ends."""
    status = 0
    chunks: list[bytes] = []
    never = asyncio.Event()

    async def receive() -> Message:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message.get("body"):
            chunks.append(message["body"])

    await response({"type": "http"}, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")
