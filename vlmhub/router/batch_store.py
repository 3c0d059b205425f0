"""The Batch and Files API's state on disk: uploaded files, batch records and batch journals.

Layout under ``<state_dir>/batches/`` (one router owns a state dir, so one process writes it)::

    files/<file-id>.jsonl      a file's bytes (input files, output and error files)
    files/<file-id>.json       its object (OpenAI's file object, plus its owner)
    runs/<batch-id>.json       a batch's record (OpenAI's batch object, plus its owner)
    runs/<batch-id>.journal    one line per finished request line, appended and fsynced
                               *before* it counts: the source of truth for what has run

Records are written whole (temp file, fsync, rename), so a crash leaves the old or the new one.
A journal's torn last line (a crash mid-append) is cut off when the batch is loaded again.

Everything is held in memory as well (:class:`BatchStore` loads it once at start); the router's
handlers and the batch runner read and change it on the event loop's thread only. Writing a
record or a file object blocks for one small write and fsync (rare: on a status change);
:meth:`Journal.append` blocks on the disk and is run in a worker thread by its caller;
:meth:`BatchStore.add_file` and :meth:`BatchStore.delete_file` run their disk work in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]
PRIVATE = ("owner", "created")
"""Keys of a stored object that are not part of OpenAI's object."""
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})
WINDOWS = {"24h": 24 * 3600}
"""``completion_window`` values and their seconds."""


def key_identity(key: bytes | None) -> str | None:
    """Who a batch or file belongs to: a fingerprint of the API key (never the key itself),
    or None when the router needs no key."""
    if key is None:
        return None
    return "key-" + hashlib.sha256(key).hexdigest()[:16]


def public(record: Record) -> Record:
    """The OpenAI object of a stored record."""
    return {k: v for k, v in record.items() if k not in PRIVATE}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole: temp file, fsync, rename. Blocks on the disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Record | None:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and isinstance(got.get("id"), str) else None


class Journal:
    """A batch's finished lines, appended durably. :meth:`append` blocks on the disk (call it
    in a worker thread); appends from several threads are serialized."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> list[Record]:
        """The finished lines so far; a torn last line is cut off first. Blocks on the disk."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a crash mid-append: drop the partial line before appending again
            with self._lock, open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        out: list[Record] = []
        for raw in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(raw)
                if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                    out.append(item)
        return out

    def append(self, line: Record) -> None:
        """Append one finished line and fsync it: once this returns, it survives a crash."""
        data = json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)


class BatchStore:
    """Files and batches of one state dir, in memory and on disk (see the module docs)."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = state_dir / "batches"
        self.files_dir, self.runs_dir = self.root / "files", self.root / "runs"
        self.clock = clock
        self.files: dict[str, Record] = {}
        self.batches: dict[str, Record] = {}

    def open(self) -> None:
        """Create the dirs and load every record. Blocks on the disk (start-up only)."""
        for d in (self.files_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self.files_dir.glob("*.json"):
            if (rec := _read_json(path)) is not None and self.content_path(rec["id"]).exists():
                self.files[rec["id"]] = rec
        for path in self.runs_dir.glob("*.json"):
            if (rec := _read_json(path)) is not None:
                self.batches[rec["id"]] = rec

    # ------------------------------------------------------------------------------ files
    def content_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    async def add_file(self, data: bytes, filename: str, purpose: str, owner: str | None,
                       file_id: str | None = None) -> Record:
        """Store a file's bytes and its object (``file_id`` given: replace that file, which
        makes finalizing a batch twice harmless). The writes run in a worker thread; the
        in-memory index changes on the loop's thread once they are done."""
        now = self.clock()
        rec: Record = {
            "id": file_id or f"file-{uuid.uuid4().hex[:24]}", "object": "file",
            "bytes": len(data), "created_at": int(now), "filename": filename,
            "purpose": purpose, "status": "processed", "status_details": None,
            "expires_at": None, "owner": owner, "created": now,
        }
        await asyncio.to_thread(self._write_file, rec, data)
        self.files[rec["id"]] = rec
        return rec

    def _write_file(self, rec: Record, data: bytes) -> None:
        _write_atomic(self.content_path(rec["id"]), data)
        _write_atomic(self.files_dir / f"{rec['id']}.json", json.dumps(rec).encode())

    async def delete_file(self, file_id: str) -> None:
        """Forget a file now and remove its bytes (in a worker thread)."""
        self.files.pop(file_id, None)
        await asyncio.to_thread(self._unlink_file, file_id)

    def _unlink_file(self, file_id: str) -> None:
        for path in (self.content_path(file_id), self.files_dir / f"{file_id}.json"):
            path.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- batches
    def new_batch(self, input_file_id: str, endpoint: str, window: str,
                  metadata: dict[str, str] | None, owner: str | None) -> Record:
        """A new batch in ``validating``, saved."""
        now = self.clock()
        rec: Record = {
            "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint,
            "errors": None, "input_file_id": input_file_id, "completion_window": window,
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(now), "in_progress_at": None,
            "expires_at": int(now) + WINDOWS[window], "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata, "owner": owner, "created": now,
        }
        self.batches[rec["id"]] = rec
        self.save(rec)
        return rec

    def save(self, rec: Record) -> None:
        """Write a batch record whole (one small write and fsync: blocks briefly)."""
        _write_atomic(self.runs_dir / f"{rec['id']}.json", json.dumps(rec).encode())

    def set_status(self, rec: Record, status: str, **fields: Any) -> None:
        """Move a batch to ``status`` (stamping ``<status>_at`` when OpenAI has one) and save."""
        rec["status"] = status
        stamp = f"{status}_at"
        if stamp in rec:
            rec[stamp] = int(self.clock())
        rec.update(fields)
        self.save(rec)

    def journal(self, batch_id: str) -> Journal:
        return Journal(self.runs_dir / f"{batch_id}.journal")

    def unfinished(self) -> list[Record]:
        """Batches still to run or to finish, oldest first."""
        return sorted((r for r in self.batches.values() if r["status"] not in FINISHED),
                      key=lambda r: r.get("created", 0.0))

    def in_use(self, file_id: str) -> str | None:
        """The unfinished batch reading ``file_id``, if any."""
        return next((r["id"] for r in self.unfinished() if r["input_file_id"] == file_id), None)


def page(records: Iterable[Record], *, limit: int, after: str | None, newest_first: bool = True
         ) -> Record:
    """OpenAI's list object (``data``, ``first_id``, ``last_id``, ``has_more``) of ``records``
    in creation order (newest first unless told), starting after the id ``after``."""
    ordered = sorted(records, key=lambda r: (r.get("created", 0.0), r["id"]),
                     reverse=newest_first)
    if after is not None:
        ids = [r["id"] for r in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    data = [public(r) for r in ordered[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}
