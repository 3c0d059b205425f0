"""`vlmhub ocr` with the layout preset, end to end against the real stand-in engine (which
answers dots.ocr's layout prompt with layout JSON for the page it was sent): bboxes mapped to
the original page's pixels, figures cut from the page, NAME.json, the layout drawing, one
Markdown per document that a resumed run rebuilds, and the demo's command line."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pypdfium2 as pdfium
import pytest
from aiohttp import web
from PIL import Image, ImageChops, ImageDraw
from router_support import StubEngine, serve_app
from vlmhub_plugins.dots_ocr import LAYOUT_ALL, plugin

from vlmhub.ocr.batch import BatchOptions, BatchRunner, PageResult, ocr_batch, plan
from vlmhub.ocr.drawing import colour
from vlmhub.ocr.layout import smart_resize
from vlmhub.testing import stub_layout
from vlmhub.testing.stub_engine import WORDS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine() -> Iterator[StubEngine]:
    stub = StubEngine("dots-ocr", None, "--max-model-len", "32768").start()
    try:
        yield stub
    finally:
        stub.stop()


def page_image(size: tuple[int, int], tint: int) -> Image.Image:
    """A page with something in every region the stand-in puts a cell (a gradient where its
    Picture is), so that a crop in the wrong place cannot look right."""
    img = Image.new("RGB", size, "white")
    w, h = size
    grad = Image.linear_gradient("L").resize((round(0.6 * w), round(0.23 * h)))
    picture = Image.merge("RGB", [grad, grad.rotate(90).resize(grad.size),
                                  Image.new("L", grad.size, tint)])
    img.paste(picture, (round(0.2 * w), round(0.57 * h)))
    draw = ImageDraw.Draw(img)
    for _, x1, y1, x2, y2 in stub_layout.ROWS:
        draw.rectangle((x1 * w + 3, y1 * h + 3, x2 * w - 3, y2 * h - 3), outline=(tint, 0, 0))
    return img


def make_pdf(path: Path, pages: int) -> Path:
    """A US-letter PDF (850 x 1100 px at 100 dpi: 1700 x 2200 when rendered at 200 dpi)."""
    images = [page_image((850, 1100), 40 * i) for i in range(pages)]
    images[0].save(path, "PDF", resolution=100, save_all=True, append_images=images[1:])
    return path


def options(engine: StubEngine, out: Path, **kw: Any) -> BatchOptions:
    return BatchOptions(model="dots-ocr", out_dir=out, preset="layout",
                        base_url=engine.base_url + "/v1", **{"concurrency": 2, **kw})


def manifest(out: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in map(json.loads, (out / "manifest.jsonl").open())}


def to_page(box: list[int], seen: tuple[int, int], source: tuple[int, int]) -> list[int]:
    """A box in the model's pixels -> the original page's, clamped (written out here, not
    taken from vlmhub)."""
    return [min(source[i % 2], max(0, round(v * source[i % 2] / seen[i % 2])))
            for i, v in enumerate(box)]


async def test_layout_pages_get_page_coordinates_figures_and_json(
        engine: StubEngine, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    summary = await ocr_batch([pdf], options(engine, out, max_pixels=1_000_000), plugin())
    assert [r.status for r in summary.results] == ["ok", "ok"]
    lines = manifest(out)
    rendered = pdfium.PdfDocument(str(pdf))
    for number in (1, 2):
        name = f"doc-p000{number}"
        rec = lines[name]
        source = (rec["source_width"], rec["source_height"])
        assert rec["dpi"] == 200 and source == (1700, 2200)  # the page at its render dpi
        sent = (rec["width"], rec["height"])
        assert sent[0] * sent[1] <= 1_000_000 < source[0] * source[1]  # it was downscaled
        seen = smart_resize(*sent)  # dots.ocr's processor: what the model answered in
        answered = json.loads((out / f"{name}.raw.txt").read_text())
        cells = json.loads((out / f"{name}.json").read_text())
        assert [c["category"] for c in cells] == [c["category"] for c in answered]
        assert [c["bbox"] for c in cells] == [to_page(c["bbox"], seen, source)
                                              for c in answered]
        assert all(c["text"] == a["text"] for c, a in zip(cells, answered, strict=True)
                   if "text" in a)
        picture = next(c for c in cells if c["category"] == "Picture")
        assert picture["figure"] == f"{name}.fig-1.png" and "text" not in picture
        # the figure is the page's own pixels in that box (the page rendered again here)
        page = rendered[number - 1].render(scale=200 / 72).to_pil().convert("RGB")
        assert page.size == source
        figure = Image.open(out / picture["figure"]).convert("RGB")
        assert ImageChops.difference(figure, page.crop(picture["bbox"])).getbbox() is None
        md = (out / f"{name}.md").read_text()
        caption = next(c["text"] for c in cells if c["category"] == "Caption")
        assert f"![Figure 1]({name}.fig-1.png)\n\n{caption}\n\n" in md  # its caption follows
        formula = next(c["text"] for c in answered if c["category"] == "Formula")
        assert formula.startswith("\\[") and "\\[" not in md  # normalised, not double-wrapped
        assert "$$\n" + formula[2:-2].strip() + "\n$$" in md
        assert "bbox:" not in md
    rendered.close()
    # one Markdown for the document: every page, in order, each after a page-break comment
    doc = (out / "doc.md").read_text()
    marks = re.findall(r"<!-- vlmhub: page (\d) of 2, doc\.pdf \((doc-p000\d)\.md\) -->", doc)
    assert marks == [("1", "doc-p0001"), ("2", "doc-p0002")]
    first, second = (out / "doc-p0001.md").read_text(), (out / "doc-p0002.md").read_text()
    assert doc.index(first.strip()) < doc.index(second.strip())
    assert first.strip() != second.strip()  # the stand-in answered each page for itself


async def test_draw_layout_and_embedded_figures(engine: StubEngine, tmp_path: Path) -> None:
    scan = tmp_path / "scan.png"
    page_image((1240, 1754), 90).save(scan)
    out = tmp_path / "out"
    summary = await ocr_batch([scan], options(engine, out, embed_images=True, draw_layout=True),
                              plugin())
    assert summary.results[0].status == "ok"
    cells = json.loads((out / "scan.json").read_text())
    md = (out / "scan.md").read_text()
    url = re.search(r"!\[Figure 1\]\((data:image/png;base64,[^)]+)\)", md)
    assert url is not None and not list(out.glob("scan.fig-*"))  # in the Markdown, no file
    figure = Image.open(io.BytesIO(base64.b64decode(url.group(1).split(",", 1)[1])))
    picture = next(c for c in cells if c["category"] == "Picture")
    original = Image.open(scan).convert("RGB")
    assert ImageChops.difference(figure.convert("RGB"),
                                 original.crop(picture["bbox"])).getbbox() is None
    drawn = Image.open(out / "scan.layout.png").convert("RGB")
    assert drawn.size == original.size
    for cell in cells:  # each box outlined in its category's colour, at its place
        x1, y1, x2, y2 = cell["bbox"]
        assert drawn.getpixel((x2 - 1, (y1 + y2) // 2)) == colour(cell["category"])
    x1, y1, x2, y2 = picture["bbox"]
    centre = ((x1 + x2) // 2, (y1 + y2) // 2)
    page_px, drawn_px = original.getpixel(centre), drawn.getpixel(centre)
    assert isinstance(page_px, tuple) and isinstance(drawn_px, tuple)
    tint = colour("Picture")  # filled at 12 %: the page shows through
    assert all(abs(d - (0.88 * p + 0.12 * t)) <= 2
               for d, p, t in zip(drawn_px, page_px, tint, strict=True))


async def test_a_resumed_run_ends_with_the_same_document(engine: StubEngine,
                                                        tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "long.pdf", 3)
    whole = tmp_path / "whole"
    await ocr_batch([pdf], options(engine, whole), plugin())
    assert "not done" not in (whole / "long.md").read_text()
    out = tmp_path / "out"
    runner = BatchRunner(options(engine, out, concurrency=1), plugin())
    jobs = plan([pdf], runner.opts, runner.prompt)
    first_page = asyncio.get_running_loop().create_future()

    def on_page(result: PageResult) -> None:
        if not first_page.done():
            first_page.set_result(result)

    task = asyncio.create_task(runner.run(jobs, on_page))
    await first_page
    task.cancel()  # Ctrl-C after the first page
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped = (out / "long.md").read_text()
    assert (out / "long-p0001.md").read_text().strip() in stopped
    assert "page 3 of 3, long.pdf: not done" in stopped
    summary = await ocr_batch([pdf], options(engine, out), plugin())
    assert [r.status for r in summary.results] == ["skipped", "ok", "ok"]
    assert (out / "long.md").read_text() == (whole / "long.md").read_text()


async def test_a_page_that_changed_during_the_batch_is_an_error(tmp_path: Path) -> None:
    """An endpoint that answers the stand-in's layout after the input file was replaced by
    another page: its figure cannot be cut from the page that was sent."""
    scan = tmp_path / "scan.png"
    page_image((800, 1000), 0).save(scan)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        page_image((1000, 800), 0).save(scan)  # the file is replaced meanwhile
        content = stub_layout.answer(body, WORDS)
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"content": content}}]})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    async with serve_app(app) as url:
        opts = BatchOptions(model="dots-ocr", out_dir=tmp_path / "out", preset="layout",
                            base_url=url + "/v1")
        summary = await ocr_batch([scan], opts, plugin())
    result = summary.results[0]
    assert result.status == "failed" and result.retryable
    assert result.error is not None and "changed during the batch" in result.error
    assert "1000x800 px now but was 800x1000" in result.error
    assert not (tmp_path / "out" / "scan.md").exists()


def test_the_stand_in_answers_the_layout_prompt_for_the_page(engine: StubEngine) -> None:
    def ask(prompt: str, img: Image.Image | None = None, fmt: str = "PNG",
            **extra: Any) -> httpx.Response:
        buf = io.BytesIO()
        (img or page_image((1000, 1400), 0)).save(buf, format=fmt)
        url = f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
        return httpx.post(engine.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "dots-ocr", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": prompt}]}], **extra})

    def answer(resp: httpx.Response) -> str:
        assert resp.status_code == 200, resp.text
        text: str = resp.json()["choices"][0]["message"]["content"]
        return text

    cells = json.loads(answer(ask(LAYOUT_ALL)))
    seen = smart_resize(1000, 1400)  # boxes in the resized image's pixels, as dots.ocr's
    assert all(0 <= c["bbox"][0] < c["bbox"][2] <= seen[0] and
               0 <= c["bbox"][1] < c["bbox"][3] <= seen[1] for c in cells)
    assert {"Picture", "Formula", "Table", "Title", "Page-header", "Page-footer"} <= {
        c["category"] for c in cells}
    assert all(("text" in c) == (c["category"] != "Picture") for c in cells)
    assert answer(ask(LAYOUT_ALL)) == answer(ask(LAYOUT_ALL))  # deterministic
    other = json.loads(answer(ask(LAYOUT_ALL, page_image((1000, 1400), 200))))
    assert [c["text"] for c in other if "text" in c] != [c["text"] for c in cells if "text" in c]
    jpeg = json.loads(answer(ask(LAYOUT_ALL, page_image((600, 900), 0), "JPEG")))
    assert max(c["bbox"][3] for c in jpeg) <= smart_resize(600, 900)[1] < seen[1]
    cut = ask(LAYOUT_ALL, max_tokens=20)  # max_tokens cuts the answer as a model's
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    assert not answer(cut).rstrip().endswith("]")
    plain = answer(ask("Extract the text content from this image."))
    assert plain.startswith("dots-ocr: [1 image]")  # other prompts: the usual words
    bad = ask(LAYOUT_ALL, Image.new("RGB", (50, 50)), "GIF")
    assert bad.status_code == 400 and "PNG and JPEG" in bad.text


def test_the_demo_command_shows_the_whole_pipeline(tmp_path: Path) -> None:
    """`vlmhub ocr FILE.pdf --model demo-ocr --preset layout` with examples/demo.yaml (as
    after `make run`, here against one stand-in serving demo-ocr)."""
    demo = StubEngine("demo-ocr").start()
    try:
        pdf = make_pdf(tmp_path / "report.pdf", 2)
        out = tmp_path / "out"
        run = subprocess.run(
            [str(Path(sys.executable).with_name("vlmhub")), "ocr", str(pdf), "--model",
             "demo-ocr", "--preset", "layout", "--config", str(ROOT / "examples/demo.yaml"),
             "--url", demo.base_url, "--out", str(out), "--draw-layout"],
            capture_output=True, text=True, timeout=120)
    finally:
        demo.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    for page in ("report-p0001", "report-p0002"):
        for suffix in (".raw.txt", ".md", ".json", ".fig-1.png", ".layout.png"):
            assert (out / f"{page}{suffix}").is_file(), page + suffix
        assert "![Figure 1](" + page + ".fig-1.png)" in (out / f"{page}.md").read_text()
    assert (out / "report.md").read_text().count("<!-- vlmhub: page ") == 2
