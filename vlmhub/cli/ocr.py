"""``vlmhub ocr INPUTS... --model M``: OCR images, PDFs and folders of them in one batch.

The pages go to an OpenAI-compatible endpoint that is already running (``vlmhub route``, by
default at the config's router address, or a ``vlmhub serve`` engine via ``--url``); this
command starts no engine, and stops at once (exit 2) when nothing answers at the URL. The
model's spec (presets, pixel limit, post-processing) comes from models.yaml, else from the
installed plugins; an unknown model is sent a generic prompt. Planning (listing files,
counting PDF pages) blocks before the event loop starts; then one ``asyncio.run`` sends
``--concurrency`` pages at a time (see :mod:`vlmhub.ocr.batch`).
The API key is read from an environment variable and never printed.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vlmhub.cli.common import ConfigOption, Context, console, err_console, run_async, user_errors
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import resolve
from vlmhub.ocr.batch import (
    DEFAULT_URL,
    BatchOptions,
    BatchRunner,
    BatchSummary,
    PageResult,
    plan,
)
from vlmhub.sizing.vram import Gpu
from vlmhub.spec import ModelSpec

_ANY_GPU = Gpu(1.0, 0.0, None, "unused", "config")  # resolve() without a fit check ignores it


def find_spec(ctx: Context, name: str) -> ModelSpec | None:
    """The spec of ``name`` (or an alias): from models.yaml, else an installed plugin, else
    None. Blocks on reading the config and loading plugins; needs no GPU."""
    plugins = ctx.registry.specs()
    for m in resolve(ctx.loaded, plugins, _ANY_GPU, check_fit=False):
        if name == m.name or name in m.aliases:
            return m.spec  # None for an external endpoint: its spec is unknown
    for spec in plugins.values():
        if name == spec.name or name in spec.aliases:
            return spec
    return None


def config_body_limit(ctx: Context) -> int | None:
    """The config router's ``max_body_mb`` in bytes, or None without a readable config."""
    try:
        return int(ctx.loaded.config.router.max_body_mb * 1024 * 1024)
    except ConfigError:
        return None


def default_url(ctx: Context) -> str:
    """The router of the config (``router.host:router.port``), else the usual default."""
    try:
        rc = ctx.loaded.config.router
    except ConfigError:
        return DEFAULT_URL
    host = "127.0.0.1" if rc.host in ("0.0.0.0", "::", "") else rc.host
    return f"http://{host}:{rc.port}/v1"


def normalise_url(url: str) -> str:
    """Add ``/v1`` to a bare ``http://host:port``."""
    url = url.rstrip("/")
    rest = url.split("://", 1)[-1]
    return url if "/" in rest else url + "/v1"


def print_summary(summary: BatchSummary, out_dir: Path) -> None:
    table = Table(title="OCR batch", box=None, pad_edge=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_row("ok", f"[green]{summary.count('ok')}[/]")
    failed = summary.count("failed")
    table.add_row("failed", f"[red]{failed}[/]" if failed else "0")
    table.add_row("skipped (done before)", str(summary.count("skipped")))
    recovered = [r.name for r in summary.results if r.recovered]
    table.add_row("recovered (repaired)", f"[yellow]{len(recovered)}[/]" if recovered else "0")
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("pages/s", f"{summary.pages_per_s:.2f}")
    table.add_row("output", escape(str(out_dir)))
    console.print(table)
    by_error: dict[str, list[str]] = {}
    for r in summary.results:
        if r.status == "failed":
            by_error.setdefault(r.error or "?", []).append(r.name)
    for error, pages in list(by_error.items())[:10]:
        shown = ", ".join(pages[:3]) + (f" and {len(pages) - 3} more" if len(pages) > 3 else "")
        err_console.print(f"  [red]failed[/] {escape(shown)}: {escape(error)}", highlight=False)
    if len(by_error) > 10:
        err_console.print(f"  ... {len(by_error) - 10} more errors: see manifest.jsonl")
    if recovered:
        shown = ", ".join(recovered[:5]) + (f" and {len(recovered) - 5} more"
                                            if len(recovered) > 5 else "")
        err_console.print(f"  [yellow]recovered[/] {escape(shown)}: the answer was cut short "
                          "or looped; the .md keeps what could be read and says so "
                          "(manifest: recovered)", highlight=False)
    if summary.stopped:
        err_console.print(f"[bold red]Stopped:[/] {escape(summary.stopped)}", highlight=False)
    if retry := summary.failed(retryable=True):
        err_console.print(f"{len(retry)} page(s) failed for a reason that may pass (connection, "
                          "server error, timeout): re-run the same command to retry them "
                          "(done pages are skipped).", highlight=False)
    if other := summary.failed(retryable=False):
        err_console.print(f"{len(other)} page(s) failed because of the input, the request "
                          "or an answer with nothing to read (errors above): a re-run alone "
                          "will not fix them.", highlight=False)


def ocr(
    inputs: Annotated[list[Path], typer.Argument(
        help="Images (png, jpg, jpeg, webp, tif, bmp), PDFs, or folders of them.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name or alias.")],
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Prompt preset of the model (default: its default preset).")]
    = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("ocr-out"),
    url: Annotated[str | None, typer.Option(
        "--url", help="OpenAI-compatible base URL (default: the config's router, "
        "http://127.0.0.1:8080/v1).")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-j", min=1, help="Pages in flight at once.")] = 4,
    api_key_env: Annotated[str, typer.Option(
        "--api-key-env", help="Environment variable holding the API key.")] = "VLMHUB_API_KEY",
    config: Path | None = ConfigOption,
    force: Annotated[bool, typer.Option(
        "--force", help="Redo pages already done (by default they are skipped).")] = False,
    max_pixels: Annotated[int | None, typer.Option(
        "--max-pixels", min=1, help="Downscale pages to at most this many pixels (default: "
        "the model's vision.max_pixels, else 11289600); never above the model's own cap.")]
    = None,
    embed_images: Annotated[bool, typer.Option(
        "--embed-images", help="Layout preset: put figures in the Markdown as data URLs "
        "instead of NAME.fig-N.png files.")] = False,
    draw_layout: Annotated[bool, typer.Option(
        "--draw-layout", help="Layout preset: also write NAME.layout.png, the page with its "
        "boxes and categories drawn.")] = False,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """OCR many images and PDF pages through a running router or engine. Writes
    NAME.raw.txt, NAME.md and manifest.jsonl (the layout preset also NAME.json and figures;
    a PDF also one Markdown for the document); a re-run resumes. Exit 1 if any page failed."""
    with user_errors():
        ctx = Context(config)
        spec = find_spec(ctx, model)
        opts = BatchOptions(model=model, out_dir=out, preset=preset, concurrency=concurrency,
                            base_url=normalise_url(url or default_url(ctx)),
                            api_key=os.environ.get(api_key_env) or None, force=force,
                            max_pixels=max_pixels, embed_images=embed_images,
                            draw_layout=draw_layout,
                            max_body_bytes=None if url else config_body_limit(ctx))
        runner = BatchRunner(opts, spec)  # an unknown preset fails here, listing the presets
        jobs = plan(inputs, opts, runner.prompt)
        todo = sum(not j.skip for j in jobs)
        what = f"preset {runner.prompt.preset}" if runner.prompt.preset else "generic prompt"
        out_console = err_console if as_json else console  # --json: stdout holds only JSON
        out_console.print(f"OCR {len(jobs)} page(s) with {model} ({what}) via {opts.base_url}"
                          + (f"; {len(jobs) - todo} already done" if todo < len(jobs) else ""),
                          highlight=False, markup=False)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(),
                      console=out_console) as bar:
            task = bar.add_task("pages", total=len(jobs))

            seen: set[str] = set()

            def on_page(r: PageResult) -> None:
                bar.update(task, advance=1, description=escape(r.name[:40]))
                if r.status == "failed" and (r.error or "?") not in seen:  # each error once
                    seen.add(r.error or "?")
                    bar.console.print(f"[red]failed[/] {escape(r.name)}: "
                                      f"{escape(r.error or '?')}", highlight=False)

            summary = run_async(lambda: asyncio.run(runner.run(jobs, on_page)))
        if as_json:  # the summary and every page's result (as in manifest.jsonl)
            print_json({"ok": summary.count("ok"), "failed": summary.count("failed"),
                        "skipped": summary.count("skipped"),
                        "recovered": sum(r.recovered for r in summary.results),
                        "seconds": round(summary.seconds, 3), "output": str(out),
                        "stopped": summary.stopped,
                        "pages": [asdict(r) for r in summary.results]})
        else:
            print_summary(summary, out)
        if any("HTTP 401" in (r.error or "") for r in summary.results):
            err_console.print(f"The endpoint wants an API key: set it in ${api_key_env}.",
                              highlight=False, markup=False)
    raise typer.Exit(1 if summary.count("failed") else 0)


def register(app: typer.Typer) -> None:
    """Add ``ocr`` to ``app``."""
    app.command("ocr")(ocr)
