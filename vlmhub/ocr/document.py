"""One Markdown file per document: a PDF's (or a multi-page TIFF's) pages joined in order.

``report.pdf`` gives ``report-p0001.md``, ``report-p0002.md``, ... and ``report.md``: each page
starts with a comment that marks the page break (``<!-- vlmhub: page 2 of 40, report.pdf
(report-p0002.md) -->``), then holds that page's Markdown as written. A page that is not done
(it failed, or the run stopped before it) is a comment saying so. The file is rewritten as
pages finish (at most every :data:`WRITE_EVERY_S` seconds, and always when the last page of
the document finishes and when the batch ends), so a resumed run, which reads the pages done
before from their ``.md`` files, ends with the same file as a run that did every page at once.

:class:`Documents` is driven from the event loop; its file reads and writes go to threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmhub.ocr.plan import PageJob

WRITE_EVERY_S = 1.0


def page_mark(source: str, number: int, count: int, page_name: str) -> str:
    return f"<!-- vlmhub: page {number} of {count}, {source} ({page_name}.md) -->"


def missing_mark(source: str, number: int, count: int) -> str:
    return (f"<!-- vlmhub: page {number} of {count}, {source}: not done (failed, or not run "
            "yet: see manifest.jsonl; a re-run does it) -->")


@dataclass
class Document:
    """One document: its page names in order, and the Markdown of the pages done."""

    name: str
    source: str
    pages: list[str]
    done: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)  # done, failed or skipped in this run
    written_at: float = 0.0
    dirty: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def text(self) -> str:
        count, parts = len(self.pages), []
        for number, page in enumerate(self.pages, 1):
            if page in self.done:
                parts.append(f"{page_mark(self.source, number, count, page)}\n\n"
                             f"{self.done[page].strip()}")
            else:
                parts.append(missing_mark(self.source, number, count))
        return "\n\n".join(parts) + "\n"


class Documents:
    """The documents of a batch: built from its jobs, told of each page as it finishes."""

    def __init__(self, out_dir: Path, jobs: Sequence[PageJob],
                 write: Callable[[Path, str], None]) -> None:
        self.out_dir, self.write = out_dir, write
        self.docs: dict[str, Document] = {}
        for job in jobs:
            if job.document is None:
                continue
            doc = self.docs.get(job.document)
            if doc is None:
                doc = self.docs[job.document] = Document(job.document, job.ref.path.name, [])
            doc.pages.append(job.name)
        self.by_page = {p: d for d in self.docs.values() for p in d.pages}
        self.skipped = [j.name for j in jobs if j.skip and j.name in self.by_page]

    def _read(self, page: str) -> None:
        """Take page ``page``'s Markdown from its file (blocks: one file read)."""
        doc, path = self.by_page[page], self.out_dir / f"{page}.md"
        try:
            doc.done[page] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            doc.done.pop(page, None)
        doc.finished.add(page)
        doc.dirty = True

    async def start(self) -> None:
        """Read the pages done before, before any page of this run finishes."""
        for page in self.skipped:
            await asyncio.to_thread(self._read, page)

    async def finished(self, page: str, ok: bool) -> None:
        """Page ``page`` finished (``ok``: its Markdown is written): rewrite its document
        when it is complete or was not written for a while."""
        doc = self.by_page.get(page)
        if doc is None:
            return
        if ok:
            await asyncio.to_thread(self._read, page)
        else:
            doc.done.pop(page, None)
            doc.finished.add(page)
            doc.dirty = True
        doc.dirty = True
        complete = len(doc.finished) == len(doc.pages)
        if complete or time.monotonic() - doc.written_at >= WRITE_EVERY_S:
            await self._write(doc)

    async def flush(self) -> None:
        """Write every document that changed since it was last written."""
        for doc in self.docs.values():
            if doc.dirty:
                await self._write(doc)

    async def _write(self, doc: Document) -> None:
        async with doc.lock:
            doc.dirty, doc.written_at = False, time.monotonic()
            await asyncio.to_thread(self.write, self.out_dir / f"{doc.name}.md", doc.text())
