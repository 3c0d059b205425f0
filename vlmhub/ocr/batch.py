"""OCR many pages through an OpenAI-compatible endpoint (the router, or one engine).

:func:`plan` turns inputs into :class:`PageJob` objects (blocking: it lists folders, counts PDF
pages and reads the manifest); :meth:`BatchRunner.run` sends them, ``concurrency`` pages at a
time, each as one ``POST /chat/completions`` with the page as an image data URL plus the preset's
prompt and sampling settings. :func:`ocr_batch` does both. Before the first page it checks that
the endpoint answers (``GET /models``) and raises VlmhubError ("is `vlmhub route` running at
URL?") when it does not.

Concurrency: ``concurrency`` worker tasks share one :class:`httpx.AsyncClient` on the event
loop. Rendering, resizing and image/JSON encoding run in threads (PDFium in its own single
thread, see :class:`~vlmhub.ocr.pages.PageRenderer`), output files are written in threads,
and manifest lines are appended from the event loop (one short write each).

Retries: 503, 502 and 429 answers (honouring ``Retry-After``) and connection errors are retried
with exponential backoff, ``max_attempts`` tries in all. Any other error (400, 504, a read
timeout, an unreadable page) is that page's failure: it is recorded and the batch goes on.
After a 401, 403 or 404 (a wrong key or model, which every page would meet) the pages not yet
started are recorded as failed without being rendered or sent; after ``stop_after`` pages in a
row that could not connect at all, the batch stops the same way (:attr:`BatchSummary.stopped`).
A 413 teaches the body limit (from its message, else by shrinking): the page is prepared again
to fit and re-sent, and every later page is prepared to fit. Each failure is marked
``retryable`` when running the batch again can fix it (connection, 5xx, 429, timeouts), not
when the input or the request is at fault (an unreadable file, another 4xx) or the answer has
nothing to read (a layout preset answered with no layout JSON: ``not recovered``).

Outputs in ``out_dir``: ``<name>.raw.txt`` (the answer as is), ``<name>.md``
(``spec.postprocess(text, preset)``, or the answer when the model's spec is unknown), where
``<name>`` is the input's stem plus ``-p0001`` for a PDF page, and one ``manifest.jsonl`` line
per page attempted. A page whose latest manifest line for the same model and preset is ``ok``
(and whose ``.raw.txt`` exists) is skipped, unless ``force``. The ``layout`` preset's pages
also get ``<name>.json``, their figures and (``draw_layout``) a drawing, in the original
page's pixels (:mod:`vlmhub.ocr.outputs`); a PDF's or multi-page TIFF's pages are also joined
in one ``<stem>.md`` (:mod:`vlmhub.ocr.document`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from vlmhub.errors import VlmhubError
from vlmhub.ocr.answers import (
    CONNECT_ERRORS,
    RETRY_ERRORS,
    RETRY_STATUSES,
    Answer,
    body_limit,
    error_text,
    not_running,
    parse_answer,
    retry_after_s,
)
from vlmhub.ocr.document import Documents
from vlmhub.ocr.images import DEFAULT_MAX_PIXELS
from vlmhub.ocr.layout import not_recovered, was_recovered
from vlmhub.ocr.outputs import (
    PageGeometry,
    is_layout,
    needs_image,
    page_files,
    read_page_layout,
    write_atomic,
    write_page_files,
)
from vlmhub.ocr.pages import PageRenderer
from vlmhub.ocr.plan import (
    DEFAULT_URL,
    GENERIC_PROMPT,
    MANIFEST,
    BatchOptions,
    BatchSummary,
    PageJob,
    PageResult,
    Prompt,
    Status,
    choose_prompt,
    page_key,
    plan,
    read_manifest,
)
from vlmhub.spec import ModelSpec

__all__ = ["DEFAULT_URL", "GENERIC_PROMPT", "MANIFEST", "BatchOptions", "BatchRunner",
           "BatchSummary", "PageJob", "PageResult", "Prompt", "Status", "choose_prompt",
           "ocr_batch", "page_key", "plan", "read_manifest", "write_atomic"]

FATAL_STATUSES = frozenset({401, 403, 404})  # wrong key or model: every page would fail
CHECK_TIMEOUT_S = 10.0
FIT_TRIES = 3  # sends of one page that a 413 may cause


class BatchRunner:
    """Runs planned pages against ``opts.base_url``. One instance per batch."""

    def __init__(self, opts: BatchOptions, spec: ModelSpec | None = None,
                 prompt: Prompt | None = None) -> None:
        if min(opts.concurrency, opts.max_attempts, opts.stop_after, opts.max_pixels or 1) < 1:
            raise VlmhubError("concurrency, max_attempts, stop_after and max_pixels must be at "
                              "least 1")
        self.opts, self.spec = opts, spec
        self.prompt = prompt or choose_prompt(spec, opts.preset, opts.model)
        capped = spec.vision.max_pixels if spec and spec.vision else None
        caps = [c for c in (capped, opts.max_pixels) if c is not None]
        self.max_pixels = min(caps) if caps else DEFAULT_MAX_PIXELS
        self.body_limit = opts.max_body_bytes  # learnt from a 413 when not known
        self.fatal: str | None = None  # set by a 401/403/404: later pages are not sent
        self.stopped: str | None = None  # set after stop_after unreachable pages in a row
        self.unreachable = 0  # pages in a row that could not connect

    def url_budget(self) -> int | None:
        """The longest data URL that keeps a request under the body limit (None: no
        known limit). Blocks briefly (JSON-encodes the prompt)."""
        if self.body_limit is None:
            return None
        return max(0, self.body_limit - len(self.payload("")) - 256)

    def payload(self, data_url: str) -> bytes:
        """The request body for one page. Blocks (JSON-encodes a large string)."""
        p = self.prompt
        body: dict[str, Any] = {
            "model": self.opts.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": p.text},
            ]}],
        }
        for key in ("temperature", "top_p", "max_tokens"):
            if getattr(p, key) is not None:
                body[key] = getattr(p, key)
        return json.dumps(body).encode()

    async def post(self, client: httpx.AsyncClient, body: bytes) -> Answer:
        """POST one page, retrying 429/502/503 and connection errors with backoff. Waits
        (asynchronously) between attempts; never raises for an HTTP or network failure."""
        opts, last = self.opts, "no attempt"
        status: int | None = None
        unreachable = True
        for attempt in range(1, opts.max_attempts + 1):
            wait = min(opts.backoff_s * 2 ** (attempt - 1), opts.max_wait_s)
            try:
                resp = await client.post("/chat/completions", content=body)
            except RETRY_ERRORS as exc:
                last, status = f"{type(exc).__name__}: {exc or 'connection failed'}", None
                unreachable = unreachable and isinstance(exc, CONNECT_ERRORS)
            except httpx.TimeoutException:
                return Answer(None, attempt, None, f"no answer within {opts.timeout_s:.0f} s")
            except httpx.HTTPError as exc:
                return Answer(None, attempt, None, f"{type(exc).__name__}: {exc}")
            else:
                status = resp.status_code
                if status == 200:
                    return parse_answer(resp, attempt)
                last = error_text(resp)
                if status not in RETRY_STATUSES:
                    return Answer(None, attempt, status, last)
                unreachable = False
                asked = retry_after_s(resp.headers.get("retry-after"))
                if asked is not None:
                    wait = min(asked, opts.max_wait_s)
            if self.stopped is not None:  # the endpoint is gone: give up this page now
                return Answer(None, attempt, status, last, unreachable=unreachable)
            if attempt < opts.max_attempts:
                await asyncio.sleep(wait)
        return Answer(None, opts.max_attempts, status, f"{last} (gave up after "
                      f"{opts.max_attempts} attempts)", unreachable=unreachable)

    async def one(self, client: httpx.AsyncClient, renderer: PageRenderer,
                  job: PageJob) -> PageResult:
        """Prepare, send and save one page; prepare and send it again (smaller) after a
        413. Never raises for a page's own failure."""
        t0 = time.monotonic()
        res = PageResult(str(job.ref.path.resolve()), job.page, job.name, "failed")
        if job.error is not None:
            return replace(res, error=job.error)
        if self.fatal is not None:
            return replace(res, error=f"not sent after {self.fatal}")
        if self.stopped is not None:
            return replace(res, error=f"not sent: {self.stopped}", retryable=True)
        attempts = 0
        for _ in range(FIT_TRIES):
            try:
                page = await renderer.aload(job.ref, self.max_pixels, self.url_budget())
            except VlmhubError as exc:
                return replace(res, attempts=attempts, seconds=time.monotonic() - t0,
                               error=str(exc))
            res = replace(res, width=page.width, height=page.height, dpi=page.dpi,
                          encoding=page.encoding, source_width=page.source_width,
                          source_height=page.source_height)
            geo = PageGeometry.of((page.source_width, page.source_height),
                                  (page.width, page.height), self.spec, self.max_pixels)
            body = await asyncio.to_thread(self.payload, page.data_url)
            del page
            ans = await self.post(client, body)
            attempts += ans.attempts
            if ans.status != 413:
                break
            limit = body_limit(ans.error, len(body))  # learnt: later pages fit at once
            self.body_limit = min(limit, self.body_limit or limit)
        res = replace(res, attempts=attempts, http_status=ans.status)
        self.note_reachability(ans)
        if ans.status in FATAL_STATUSES:
            self.fatal = self.fatal or ans.error
        if ans.text is None:
            return replace(res, seconds=time.monotonic() - t0, error=ans.error,
                           retryable=ans.retryable)
        try:
            md = await self.save(renderer, job, ans.text, geo)
        except VlmhubError as exc:  # the page changed since it was sent: a re-run sends it
            return replace(res, seconds=time.monotonic() - t0, error=str(exc), retryable=True)
        except (OSError, ValueError) as exc:
            return replace(res, seconds=time.monotonic() - t0,
                           error=f"saving the result failed: {exc}")
        res = replace(res, seconds=time.monotonic() - t0, finish_reason=ans.finish_reason)
        if not_recovered(md):  # an answer, but no layout in it: never reported as a page
            return replace(res, error=f"the answer is not layout JSON: nothing could be "
                           f"recovered (the model's answer is in {job.name}.raw.txt)")
        return replace(res, status="ok", recovered=was_recovered(md))

    def note_reachability(self, ans: Answer) -> None:
        """Count pages in a row that could not connect; stop the batch after
        ``stop_after`` of them. Any HTTP answer resets the count."""
        if not ans.unreachable:
            self.unreachable = 0
            return
        self.unreachable += 1
        if self.unreachable >= self.opts.stop_after and self.stopped is None:
            self.stopped = not_running(self.opts.base_url, f"{self.unreachable} pages in a "
                                       f"row could not connect: {ans.error}")

    async def check(self, client: httpx.AsyncClient) -> None:
        """``GET /models`` once: raise VlmhubError when nothing answers (any HTTP status,
        401 included, means the endpoint is there). Waits at most 10 s."""
        try:
            await client.get("/models", timeout=CHECK_TIMEOUT_S)
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise VlmhubError(not_running(self.opts.base_url, why)) from None

    async def save(self, renderer: PageRenderer, job: PageJob, text: str,
                   geo: PageGeometry) -> str:
        """Write ``NAME.raw.txt`` and ``NAME.md`` and, for the layout preset, the page's
        figures, ``NAME.json`` and (``draw_layout``) ``NAME.layout.png``, all in the original
        page's pixels (:mod:`vlmhub.ocr.outputs`); return the Markdown. File writes and CPU
        work run in threads; the page is read (or rendered, in the PDFium thread) again only
        when it has a picture to crop or its layout is drawn. Raises VlmhubError when that
        page is no longer the page that was sent."""
        out, name = self.opts.out_dir, job.name
        await asyncio.to_thread(write_atomic, out / f"{name}.raw.txt", text)
        if not is_layout(self.prompt.preset):
            md = (await asyncio.to_thread(self.spec.postprocess, text, self.prompt.preset)
                  if self.spec else text)
            await asyncio.to_thread(write_atomic, out / f"{name}.md", md)
            return md
        layout = await asyncio.to_thread(read_page_layout, text, geo)
        image = None
        if needs_image(layout, self.opts.draw_layout):
            image = await renderer.aimage(job.ref)
            if image.size != geo.source:
                raise VlmhubError(
                    f"{job.ref.label()}: the page is {image.width}x{image.height} px now but "
                    f"was {geo.source[0]}x{geo.source[1]} when it was sent (the file changed "
                    "during the batch): its figures cannot be cut from it. Fix: run again")
        files = await asyncio.to_thread(page_files, layout, name, image,
                                        embed=self.opts.embed_images,
                                        draw=self.opts.draw_layout)
        del image
        await asyncio.to_thread(write_page_files, out, name, files)
        return str(files[f"{name}.md"])

    def record(self, result: PageResult) -> None:
        """Append one manifest line. Blocks briefly (one small write)."""
        line = {**asdict(result), "model": self.opts.model, "preset": self.prompt.preset,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        line["seconds"] = round(result.seconds, 3)
        with (self.opts.out_dir / MANIFEST).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")

    async def run(self, jobs: Sequence[PageJob],
                  on_page: Callable[[PageResult], None] | None = None) -> BatchSummary:
        """Do every job not marked ``skip``, ``concurrency`` at a time, and return all the
        results in job order. ``on_page`` is called in the event loop once per page (skipped
        ones first). Cancelling this (Ctrl-C) loses no finished page. Raises VlmhubError,
        before any page is sent, when the endpoint does not answer."""
        opts = self.opts
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        results: dict[int, PageResult] = {}
        for i, job in enumerate(jobs):
            if job.skip:
                results[i] = PageResult(str(job.ref.path.resolve()), job.page, job.name,
                                        "skipped")
                if on_page:
                    on_page(results[i])
        todo = iter([(i, j) for i, j in enumerate(jobs) if not j.skip])
        # a batch yields to interactive work when a swap is needed (docs/scheduling.md)
        headers = {"Content-Type": "application/json", "X-Vlmhub-Priority": "batch"}
        if opts.api_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        timeout = httpx.Timeout(opts.timeout_s, connect=min(30.0, opts.timeout_s))
        limits = httpx.Limits(max_connections=opts.concurrency)

        async def worker() -> None:
            for i, job in todo:  # one shared iterator: each job goes to one worker
                results[i] = await self.one(client, renderer, job)
                self.record(results[i])
                await documents.finished(job.name, results[i].status == "ok")
                if on_page:
                    on_page(results[i])

        client = httpx.AsyncClient(base_url=opts.base_url.rstrip("/"), headers=headers,
                                   timeout=timeout, limits=limits)
        renderer = PageRenderer()
        documents = Documents(opts.out_dir, jobs, write_atomic)
        tasks: list[asyncio.Task[None]] = []
        try:
            await documents.start()
            if len(results) < len(jobs):
                await self.check(client)
            tasks = [asyncio.create_task(worker()) for _ in range(opts.concurrency)]
            await asyncio.gather(*tasks)
        finally:  # on an error or a cancel, stop the other workers before closing
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            renderer.close()
            await documents.flush()
        ordered = [results[i] for i in sorted(results)]
        return BatchSummary(ordered, time.monotonic() - t0, self.stopped)


async def ocr_batch(inputs: Sequence[Path], opts: BatchOptions, spec: ModelSpec | None = None,
                    on_page: Callable[[PageResult], None] | None = None) -> BatchSummary:
    """Plan (in a thread) and run a batch: the whole Python API in one call."""
    runner = BatchRunner(opts, spec)
    jobs = await asyncio.to_thread(plan, inputs, opts, runner.prompt)
    return await runner.run(jobs, on_page)
