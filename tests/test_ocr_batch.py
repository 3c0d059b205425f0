"""Batch OCR (vlmhub.ocr) against a REAL router over stand-in engines, and against a tiny real
HTTP server on loopback for the retry paths; pages rendered by real Pillow and pypdfium2."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from ocr_support import FlakyServer, photo
from PIL import Image
from supervisor_support import build, model, routed

from vlmhub.config.registry import Registry
from vlmhub.errors import VlmhubError
from vlmhub.ocr.batch import BatchOptions, ocr_batch
from vlmhub.ocr.images import fit_within, prepare
from vlmhub.ocr.pages import (
    PageRenderer,
    find_inputs,
    list_pages,
    output_names,
    pdf_dpi,
    require,
)
from vlmhub.testing.pytest_plugin import in_ci

if not in_ci():  # CI installs the ocr extra: there a missing pypdfium2 must fail, not skip
    pytest.importorskip("pypdfium2")

KEY = "sekret-ocr-key-4711"
SPEC = {  # the OCR stand-in's spec: small pixel cap, two presets (one asks for too much)
    "capabilities": ["chat", "vision", "ocr"],
    "vision": {"max_pixels": 200_000, "min_output_tokens": 256},
    "presets": {
        "plain": {"prompt": "Read this page.", "description": "plain text", "max_tokens": 24,
                  "temperature": 0.1, "top_p": 0.9},
        "huge": {"prompt": "Read.", "description": "more than the context", "max_tokens": 5000},
    },
    "default_preset": "plain",
}


def make_inputs(folder: Path) -> list[str]:
    """Three images and a 3-page PDF; returns the output names expected."""
    folder.mkdir(parents=True)
    Image.new("RGB", (640, 480), "white").save(folder / "a.png")
    Image.new("RGBA", (300, 900), (10, 20, 30, 128)).save(folder / "b.png")  # flattened
    Image.new("L", (1200, 1600), 200).save(folder / "c.jpg")  # 1.9 MP > 200k: downscaled
    pages = [Image.new("RGB", (200 + 50 * i, 300), (40 * i, 0, 0)) for i in range(3)]
    pages[0].save(folder / "doc.pdf", save_all=True, append_images=pages[1:])
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    return ["a", "b", "c", "doc-p0001", "doc-p0002", "doc-p0003"]


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m vlmhub ...`` as a real subprocess, awaited so that the router keeps
    serving in this event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vlmhub", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200", **(env or {})})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_batch_through_the_router_resumes_and_records_failures(tmp_path: Path) -> None:
    names = make_inputs(tmp_path / "in")
    sup, _, _ = build(tmp_path, {"ocr-a": model(1.0, spec=SPEC)}, delay=0.2,
                      router={"api_keys": [KEY]})
    spec = sup.replicas["ocr-a"].model.spec
    config = str(tmp_path / "models.yaml")
    async with routed(sup) as url:
        out = tmp_path / "out"
        opts = BatchOptions(model="ocr-a", out_dir=out, base_url=url + "/v1", api_key=KEY,
                            concurrency=3)
        first = await ocr_batch([tmp_path / "in"], opts, spec)
        assert (first.count("ok"), first.count("failed")) == (6, 0), first.results
        for name in names:
            raw = (out / f"{name}.raw.txt").read_text()
            assert raw.startswith("ocr-a: [1 image]"), raw
            assert (out / f"{name}.md").read_text() == raw  # an inline spec: identity
        lines = manifest(out)
        assert sorted(r["name"] for r in lines) == names
        assert {(r["status"], r["model"], r["preset"]) for r in lines} == {("ok", "ocr-a",
                                                                           "plain")}
        assert all(r["width"] * r["height"] <= 200_000 for r in lines)  # nothing over the cap
        assert {r["dpi"] for r in lines if r["name"].startswith("doc")} == {200}

        again = await ocr_batch([tmp_path / "in"], opts, spec)  # resume: nothing to do
        assert again.count("skipped") == 6 and len(manifest(out)) == 6
        forced = await ocr_batch([tmp_path / "in"], BatchOptions(**{**vars(opts), "force": True}),
                                 spec)
        assert forced.count("ok") == 6 and len(manifest(out)) == 12

        # one unreadable page fails alone; fixed, only it is redone
        (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
        mixed = await ocr_batch([tmp_path / "in"], opts, spec)
        assert (mixed.count("skipped"), mixed.count("failed")) == (6, 1)
        broken = next(r for r in mixed.results if r.name == "broken")
        assert broken.status == "failed" and "cannot read the image" in (broken.error or "")
        Image.new("RGB", (50, 50)).save(tmp_path / "in" / "broken.png")
        fixed = await ocr_batch([tmp_path / "in"], opts, spec)
        assert (fixed.count("ok"), fixed.count("skipped")) == (1, 6)

        # a 404 (unknown model) fails every page: the first is sent, the rest are not
        bad = await ocr_batch([tmp_path / "in" / "a.png", tmp_path / "in" / "doc.pdf"],
                              BatchOptions(**{**vars(opts), "model": "nope", "concurrency": 1}))
        assert [r.attempts for r in bad.results] == [1, 0, 0, 0]
        assert all("HTTP 404: The model `nope` does not exist" in (r.error or "")
                   for r in bad.results)
        assert [r["status"] for r in manifest(out) if r["model"] == "nope"] == ["failed"] * 4
        # a 400 (too many tokens for the context) is that page's failure, never retried
        huge = await ocr_batch([tmp_path / "in" / "a.png"],
                               BatchOptions(**{**vars(opts), "preset": "huge"}), spec)
        assert huge.results[0].http_status == 400 and huge.results[0].attempts == 1
        assert all((out / f"{n}.raw.txt").read_text().startswith("ocr-a:") for n in names)

        # the CLI, as a user runs it; the key comes from the environment and is never shown
        cli_out = tmp_path / "cli-out"
        args = ["ocr", str(tmp_path / "in" / "doc.pdf"), str(tmp_path / "in" / "a.png"),
                "--model", "ocr-a", "--url", url, "--config", config, "--out", str(cli_out),
                "--concurrency", "2"]
        code, text = await cli(*args, env={"VLMHUB_API_KEY": KEY})
        assert code == 0, text
        assert KEY not in text and "pages/s" in text
        assert sorted(r["name"] for r in manifest(cli_out)) == ["a", *names[3:]]
        assert all(r["status"] == "ok" for r in manifest(cli_out))
        assert (cli_out / "doc-p0002.raw.txt").read_text().startswith("ocr-a: [1 image]")
        code, text = await cli(*args, env={"VLMHUB_API_KEY": KEY})
        assert code == 0 and "already done" in text and len(manifest(cli_out)) == 4
        code, text = await cli(*args, "--force", env={"VLMHUB_API_KEY": ""})  # no key: 401
        assert code == 1 and "VLMHUB_API_KEY" in text, text
        assert [r["status"] for r in manifest(cli_out)][4:] == ["failed"] * 4
        code, text = await cli(*args, "--preset", "nope")
        assert code == 2 and "plain" in text and "huge" in text, text


async def test_retries_honour_retry_after_and_record_what_cannot_succeed(tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    Image.new("RGB", (100, 80), "white").save(page)
    fake = FlakyServer()
    async with fake.serve() as url:
        def opts(name: str) -> BatchOptions:
            return BatchOptions(model=name, out_dir=tmp_path / name, base_url=url,
                                backoff_s=0.05, max_attempts=3)

        flaky = (await ocr_batch([page], opts("flaky"))).results[0]
        assert flaky.status == "ok" and flaky.attempts == 3, flaky
        first, second, _ = fake.seen["flaky"]
        assert second - first >= 0.9  # waited as Retry-After said, not the 0.05 s backoff
        assert (tmp_path / "flaky" / "page.raw.txt").read_text() == "flaky: done"

        gateway = (await ocr_batch([page], opts("gateway"))).results[0]
        assert (gateway.status, gateway.attempts, gateway.http_status) == ("failed", 1, 504)
        assert len(fake.seen["gateway"]) == 1
        busy = (await ocr_batch([page], opts("busy"))).results[0]
        assert busy.status == "failed" and len(fake.seen["busy"]) == 3
        assert "gave up after 3 attempts" in (busy.error or "")
        assert not (tmp_path / "busy" / "page.raw.txt").exists()

        dots = Registry().specs()["dots-ocr"]  # the real plugin: layout JSON -> Markdown
        await ocr_batch([page], opts("dots-ocr"), dots)
        assert (tmp_path / "dots-ocr" / "page.raw.txt").read_text().startswith("[{")
        assert (tmp_path / "dots-ocr" / "page.md").read_text() == "# Hi\n"  # footer dropped
    with pytest.raises(VlmhubError, match=f"ConnectError.*is `vlmhub route` running at {url}"):
        await ocr_batch([page], opts("gone"))  # the server is gone: no page is attempted
    assert not (tmp_path / "gone" / "manifest.jsonl").exists()


def test_oversized_images_are_downscaled_within_max_pixels() -> None:
    assert fit_within(640, 480, 1_000_000) == (640, 480)
    assert fit_within(640, 480, None) == (640, 480)
    w, h = fit_within(3000, 2000, 1_000_000)
    assert w * h <= 1_000_000 and w * h > 0.99 * 1_000_000 and abs(w / h - 1.5) < 0.01
    sent = prepare(Image.new("RGB", (3000, 2000), "white"), 1_000_000)
    assert sent.downscaled and (sent.width, sent.height) == (w, h)
    header, data = sent.data_url.split(",", 1)
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as png:
        assert (png.format, png.size) == ("PNG", (w, h))
    small = prepare(Image.new("RGB", (640, 480)), 1_000_000)
    assert not small.downscaled and (small.width, small.height) == (640, 480)


def test_pdf_pages_render_at_200_dpi_or_72_when_a_side_exceeds_4500_px(tmp_path: Path) -> None:
    assert pdf_dpi(1620, 100) == 200  # exactly 4500 px at 200 dpi
    assert pdf_dpi(100, 1621) == 72
    pages = [Image.new("RGB", (300, 200), "white"), Image.new("RGB", (1700, 120), "white")]
    pages[0].save(tmp_path / "mixed.pdf", save_all=True, append_images=pages[1:])  # 72 dpi
    refs = list_pages(tmp_path / "mixed.pdf")
    assert [(r.number, r.count, r.paged) for r in refs] == [(1, 2, True), (2, 2, True)]
    with PageRenderer() as renderer:
        normal = renderer.load(refs[0], None)
        wide = renderer.load(refs[1], None)  # 1700 pt = 4723 px at 200 dpi: too wide
    assert (normal.dpi, normal.width, normal.height) == (200, 834, 556)
    assert (wide.dpi, wide.width, wide.height) == (72, 1700, 120)


def test_inputs_tiff_frames_distinct_names_and_clear_errors(tmp_path: Path) -> None:
    frames = [Image.new("L", (40, 30), 0), Image.new("L", (50, 30), 255)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    refs = list_pages(tmp_path / "scan.tif")
    assert [r.kind for r in refs] == ["frames", "frames"]
    with PageRenderer() as renderer:
        assert renderer.load(refs[1], None).width == 50
    (tmp_path / "sub").mkdir()
    for f in ("scan.png", "sub/scan.png", "x.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / f)
    files = find_inputs([tmp_path, tmp_path / "x.jpg"])  # a file met twice counts once
    assert sorted(f.name for f in files) == ["scan.png", "scan.png", "scan.tif", "x.jpg"]
    names = output_names(files)
    assert len(set(names.values())) == 4 and names[tmp_path / "scan.tif"] == "scan-tif"
    assert names[tmp_path / "x.jpg"] == "x"
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 truncated")
    with pytest.raises(VlmhubError, match="cannot open the PDF"):
        list_pages(tmp_path / "bad.pdf")
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(VlmhubError, match="not an image or a PDF"):
        find_inputs([tmp_path / "notes.txt"])
    with pytest.raises(VlmhubError, match=r"pip install 'vlmhub\[ocr\]'"):
        require("pypdfium2_not_installed_here")


async def test_a_413_teaches_the_routers_body_limit_and_pages_are_made_to_fit(
        tmp_path: Path) -> None:
    """A model without a pixel cap behind a router whose body limit is 0.25 MB: the first
    page's PNG (2 MB) gets a 413, is prepared again to fit and sent; later pages fit at once.
    Before, every such page failed with 413."""
    sup, _, _ = build(tmp_path, {"plain": model(1.0)}, delay=0.1,
                      router={"max_body_mb": 0.25})
    limit = int(0.25 * 1024 * 1024)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        photo(1200, 900).save(inputs / f"photo{i}.png")
    assert (inputs / "photo0.png").stat().st_size > 4 * limit
    async with routed(sup) as url:
        summary = await ocr_batch([inputs], BatchOptions(
            model="plain", out_dir=tmp_path / "out", base_url=url + "/v1", concurrency=1))
    results = summary.results
    assert [r.status for r in results] == ["ok"] * 3, results
    assert [r.attempts for r in results] == [2, 1, 1]  # one 413, then it knew
    assert all(r.http_status == 200 and r.encoding == "jpeg" for r in results)
    assert all(r.width is not None and r.width < 1200 for r in results)
    assert (tmp_path / "out" / "photo0.raw.txt").read_text().startswith("plain: [1 image]")


async def test_an_unreachable_endpoint_fails_fast_with_the_reason(tmp_path: Path) -> None:
    """Nothing listening: the CLI stops before the first page (no 5 x 15 s of retries per
    page) and says what to check."""
    page = tmp_path / "page.png"
    Image.new("RGB", (100, 80), "white").save(page)
    fake = FlakyServer()
    async with fake.serve() as url:
        pass  # the port is free again: connections are refused
    (tmp_path / "models.yaml").write_text("models: {}\n")
    code, text = await cli("ocr", str(page), str(page), "--model", "m", "--url", url, "--out",
                           str(tmp_path / "out"), "--config", str(tmp_path / "models.yaml"))
    assert code != 0, text
    assert f"is `vlmhub route` running at {url}?" in " ".join(text.split()), text
    assert not (tmp_path / "out" / "manifest.jsonl").exists()  # no page was attempted


async def test_the_batch_stops_when_the_endpoint_goes_away(tmp_path: Path) -> None:
    """The server answers two pages, then stops listening: three pages in a row cannot
    connect, and the rest are not even tried. All of them are marked for a re-run."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(12):
        Image.new("L", (60, 40), 255).save(inputs / f"p{i:02d}.png")
    fake = FlakyServer(vanish_after=2)
    async with fake.serve() as url:
        summary = await ocr_batch([inputs], BatchOptions(
            model="vanish", out_dir=tmp_path / "out", base_url=url, concurrency=1,
            backoff_s=0.01, max_attempts=2))
    results = summary.results
    assert [r.status for r in results[:2]] == ["ok", "ok"]
    assert len(fake.seen["vanish"]) == 2
    tried = [r for r in results[2:] if r.attempts]
    assert len(tried) == 3 and all("ConnectError" in (r.error or "") for r in tried)
    assert all(r.attempts == 0 for r in results[5:])  # not sent at all
    assert summary.stopped is not None and f"is `vlmhub route` running at {url}?" in \
        summary.stopped
    assert all(r.retryable for r in results[2:])
    assert all(f"not sent: cannot reach {url}" in (r.error or "") for r in results[5:])


async def test_the_summary_offers_a_re_run_only_for_what_a_re_run_can_fix(
        tmp_path: Path) -> None:
    """A 400 and an unreadable file are the input's fault: no "re-run to retry". A 503 is
    passing: the summary says to re-run. (And --max-pixels caps what is sent.)"""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (400, 300), "white").save(inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "models.yaml").write_text("models: {}\n")
    fake = FlakyServer()
    async with fake.serve() as url:
        base = ["ocr", str(inputs), "--url", url, "--concurrency", "1", "--config",
                str(tmp_path / "models.yaml")]
        code, text = await cli(*base, "--model", "bad", "--out", str(tmp_path / "bad"),
                               "--max-pixels", "30000")
        flat = " ".join(text.split())
        assert code == 1, text
        assert "re-run the same command" not in flat.lower(), text
        assert "2 page(s) failed because of the input, the request or an answer" in flat, text
        bad = manifest(tmp_path / "bad")
        assert [r["retryable"] for r in bad] == [False, False]
        assert fake.image("bad").width * fake.image("bad").height <= 30_000

        code, text = await cli(*base, "--model", "busy", "--out", str(tmp_path / "busy"))
        flat = " ".join(text.split())
        assert code == 1, text
        assert "1 page(s) failed for a reason that may pass" in flat, text
        assert "re-run the same command to retry them" in flat, text
        assert "1 page(s) failed because of the input, the request" in flat, text  # broken
        busy = {r["name"]: r["retryable"] for r in manifest(tmp_path / "busy")}
        assert busy == {"good": True, "broken": False}
