"""What a batch is: its options, its prompt, its pages (:func:`plan`), their results, and the
manifest that makes a batch resumable. Planning blocks (it lists folders, counts PDF pages and
reads the manifest); the rest is data. :mod:`vlmhub.ocr.batch` runs the plan and re-exports
all of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmhub.errors import VlmhubError
from vlmhub.ocr.pages import PageRef, find_inputs, list_pages, output_names
from vlmhub.spec import ModelSpec

DEFAULT_URL = "http://127.0.0.1:8080/v1"
GENERIC_PROMPT = "Extract all text from this image."
MANIFEST = "manifest.jsonl"
Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Prompt:
    """The text and sampling settings sent with every page. ``preset`` None: generic."""

    preset: str | None
    text: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


def choose_prompt(spec: ModelSpec | None, preset: str | None, model: str) -> Prompt:
    """The preset asked for, else the spec's default (or its ``ocr`` preset), else a generic
    prompt. An unknown preset raises VlmhubError listing the model's presets."""
    if spec is None:
        if preset is not None:
            raise VlmhubError(f"{model!r} is not in the config, so its presets are unknown. "
                              "Fix: drop --preset, or pass the --config that declares it")
        return Prompt(None, GENERIC_PROMPT)
    if preset is None:
        preset = spec.default_preset or ("ocr" if "ocr" in spec.presets else None)
        if preset is None:
            return Prompt(None, GENERIC_PROMPT)
    if preset not in spec.presets:
        known = "; ".join(f"{n} ({p.description})" if p.description else n
                          for n, p in spec.presets.items()) or "none: omit --preset"
        raise VlmhubError(f"{model} has no preset {preset!r}. Fix: use one of: {known}")
    p = spec.presets[preset]
    return Prompt(preset, p.prompt, p.temperature, p.top_p, p.max_tokens)


@dataclass(frozen=True)
class BatchOptions:
    """How to run a batch. ``api_key`` is sent as a bearer token and never shown."""

    model: str
    out_dir: Path
    base_url: str = DEFAULT_URL
    preset: str | None = None
    concurrency: int = 4
    api_key: str | None = field(default=None, repr=False)
    force: bool = False
    max_attempts: int = 5
    backoff_s: float = 1.0
    max_wait_s: float = 60.0
    timeout_s: float = 900.0
    max_pixels: int | None = None  # None: the spec's cap, else DEFAULT_MAX_PIXELS
    max_body_bytes: int | None = None  # the endpoint's body limit, when known beforehand
    stop_after: int = 3  # pages in a row that cannot connect before the batch stops
    embed_images: bool = False  # layout figures as data URLs in the Markdown, not files
    draw_layout: bool = False  # NAME.layout.png: the page with its layout drawn


@dataclass(frozen=True)
class PageJob:
    """One page to do. ``error`` is set when the input could not even be opened;
    ``document`` is the name of the Markdown its pages are joined in (paged inputs only)."""

    ref: PageRef
    name: str
    skip: bool = False
    error: str | None = None
    document: str | None = None

    @property
    def page(self) -> int | None:
        return None if self.error is not None and self.ref.count == 0 else self.ref.number


@dataclass(frozen=True)
class PageResult:
    """The outcome of one page, as reported to the progress callback and the manifest."""

    input: str
    page: int | None
    name: str
    status: Status
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 0
    http_status: int | None = None
    finish_reason: str | None = None
    width: int | None = None
    height: int | None = None
    dpi: int | None = None
    source_width: int | None = None  # the original page (NAME.json's coordinates)
    source_height: int | None = None
    encoding: str | None = None  # "original" (the JPEG file as is), "png" or "jpeg"
    retryable: bool = False  # a failure that running the batch again can fix
    recovered: bool = False  # the answer was repaired (cut short, loops): see ocr.layout


@dataclass
class BatchSummary:
    results: list[PageResult]
    seconds: float
    stopped: str | None = None  # why the batch stopped early (the endpoint went away)

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    def failed(self, retryable: bool) -> list[PageResult]:
        """The failed pages that a re-run can fix (``retryable``), or the others."""
        return [r for r in self.results if r.status == "failed" and r.retryable == retryable]

    @property
    def pages_per_s(self) -> float:
        return self.count("ok") / self.seconds if self.seconds > 0 else 0.0


def page_key(input_path: str, page: int | None, model: str, preset: str | None) -> str:
    return json.dumps([input_path, page, model, preset])


def read_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest manifest line per (input, page, model, preset). Bad lines are ignored."""
    latest: dict[str, dict[str, Any]] = {}
    path = out_dir / MANIFEST
    if not path.is_file():
        return latest
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            latest[page_key(rec["input"], rec["page"], rec["model"], rec["preset"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return latest


def plan(inputs: Sequence[Path], opts: BatchOptions, prompt: Prompt) -> list[PageJob]:
    """Every page of every input, marked ``skip`` when already done. Blocks (file system)."""
    files = find_inputs(inputs)
    names = output_names(files)
    done = {} if opts.force else read_manifest(opts.out_dir)
    jobs: list[PageJob] = []
    for f in files:
        try:
            refs = list_pages(f)
        except VlmhubError as exc:
            jobs.append(PageJob(PageRef(f, 0, 0, "pdf"), names[f], error=str(exc)))
            continue
        for ref in refs:
            name = f"{names[f]}-p{ref.number:04d}" if ref.paged else names[f]
            rec = done.get(page_key(str(f.resolve()), ref.number, opts.model, prompt.preset))
            skip = (rec is not None and rec.get("status") == "ok"
                    and (opts.out_dir / f"{name}.raw.txt").is_file())
            jobs.append(PageJob(ref, name, skip, document=names[f] if ref.paged else None))
    return jobs
