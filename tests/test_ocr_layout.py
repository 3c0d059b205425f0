"""dots.ocr layout answers, hand-written in the model's own style: cut short by max_tokens,
caught in repeated-cell loops, and bboxes in the resized image's pixels mapped back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image
from router_support import serve_app
from vlmhub_plugins.dots_ocr import plugin

from vlmhub.ocr.batch import BatchOptions, ocr_batch
from vlmhub.ocr.layout import (
    Cell,
    layout_to_markdown,
    not_recovered,
    parse_layout,
    read_layout,
    rescale,
    smart_resize,
    was_recovered,
)

# What dots.ocr answers for a short paper page (reading order, one JSON list).
PAGE = [
    {"bbox": [112, 84, 1540, 140], "category": "Page-header", "text": "Journal of Tests, 2025"},
    {"bbox": [140, 196, 1512, 280], "category": "Title", "text": "# On Layouts"},
    {"bbox": [140, 310, 1512, 520], "category": "Text",
     "text": "We read pages. A brace {like this} and a bracket ] do not confuse the parser."},
    {"bbox": [420, 540, 1232, 620], "category": "Formula", "text": r"E = \frac{m c^{2}}{1}"},
    {"bbox": [140, 660, 1512, 900], "category": "Table",
     "text": "<table><tr><td>a</td><td>1</td></tr><tr><td>b</td><td>2</td></tr></table>"},
    {"bbox": [140, 930, 800, 1300], "category": "Picture"},
    {"bbox": [140, 1320, 1512, 1400], "category": "Caption", "text": "Figure 1: a picture."},
    {"bbox": [700, 2200, 960, 2240], "category": "Page-footer", "text": "7"},
]


def answer(cells: list[dict[str, object]]) -> str:
    return json.dumps(cells, ensure_ascii=False)


def test_a_whole_answer_is_read_as_is_and_not_flagged() -> None:
    layout = read_layout(answer(PAGE))
    assert not layout.recovered and layout.notes == []
    assert [c.category for c in layout.cells] == [c["category"] for c in PAGE]
    md = layout_to_markdown(answer(PAGE))
    assert not was_recovered(md)
    assert "Journal of Tests" not in md and "\n7\n" not in md  # header and footer dropped
    assert "$$\nE = \\frac{m c^{2}}{1}\n$$" in md
    assert "<table><tr><td>a</td>" in md
    assert "![picture](bbox:140,930,800,1300)" in md
    # a code fence around the JSON (some servers add one) changes nothing
    assert read_layout(f"```json\n{answer(PAGE)}\n```").cells == layout.cells


@pytest.mark.parametrize("cut", [30, 200, 333, 480, 517, 700])
def test_an_answer_cut_short_keeps_every_complete_cell(cut: int) -> None:
    text = answer(PAGE)[: len(answer(PAGE)) * cut // 1000]
    layout = read_layout(text)
    assert layout.truncated and layout.recovered
    complete = [c for c in layout.cells if not c.partial]
    # every complete cell is one of the page's, in order
    expected = [Cell(str(c["category"]), str(c.get("text", "")), tuple(c["bbox"]))  # type: ignore
                for c in PAGE]
    assert complete == expected[: len(complete)]
    fitting = sum(len(answer(PAGE[: i + 1])) - 1 <= len(text) for i in range(len(PAGE)))
    assert len(complete) == fitting
    md = layout_to_markdown(text)
    assert was_recovered(md) and "cut short" in md


def test_the_cell_being_written_when_cut_keeps_its_text_so_far() -> None:
    text = answer(PAGE[:2])[:-1] + ', {"bbox": [140, 310, 1512, 520], "category": "Text", ' \
        '"text": "We read pages. A brace {like th'
    layout = read_layout(text)
    assert [c.category for c in layout.cells] == ["Page-header", "Title", "Text"]
    last = layout.cells[-1]
    assert last.partial and last.text == "We read pages. A brace {like th"
    assert last.bbox == (140, 310, 1512, 520)
    # a cut inside an escape leaves no dangling backslash
    cut_escape = answer(PAGE[:1])[:-1] + ', {"bbox": [1, 2, 3, 4], "category": "Formula", ' \
        '"text": "E = \\\\fr'
    assert read_layout(cut_escape).cells[-1].text == "E = \\fr"
    cut_escape = answer(PAGE[:1])[:-1] + ', {"bbox": [1, 2, 3, 4], "category": "Formula", ' \
        '"text": "E = \\'
    assert read_layout(cut_escape).cells[-1].text == "E = "
    # cut before any text: that cell is not invented
    assert len(read_layout(answer(PAGE[:1])[:-1] + ', {"bbox": [1, 2').cells) == 1


def test_a_long_cut_answer_full_of_braces_is_read_in_one_pass() -> None:
    cells = [{"bbox": [0, i, 10, i + 1], "category": "Formula",
              "text": f"\\frac{{a}}{{{i}}}" * 20} for i in range(2000)]
    text = answer(cells)[:-5000]  # about 1,950 complete cells, cut in the middle of one
    layout = read_layout(text)
    assert layout.truncated and 1900 < len(layout.cells) < 2000


def test_repeated_cell_loops_are_dropped() -> None:
    loop = [{"bbox": [140, 600 + 40 * i, 1512, 630 + 40 * i], "category": "Text",
             "text": "Thank you for reading."} for i in range(40)]
    layout = read_layout(answer(PAGE[:3] + loop))
    assert layout.recovered and layout.repeats_dropped == 39
    assert [c.text for c in layout.cells][-2:] == [PAGE[2]["text"], "Thank you for reading."]
    # a cycle of two cells, then the page goes on
    cycle = [{"bbox": [0, i, 9, i + 5], "category": cat, "text": txt}
             for i in range(6) for cat, txt in (("List-item", "- a"), ("List-item", "- b"))]
    layout = read_layout(answer([*cycle, PAGE[6]]))
    assert [c.text for c in layout.cells] == ["- a", "- b", "Figure 1: a picture."]
    assert layout.repeats_dropped == 10
    # the exact same cell (bbox included) written again later is a loop too
    layout = read_layout(answer([PAGE[1], PAGE[2], PAGE[1]]))
    assert len(layout.cells) == 2 and layout.repeats_dropped == 1
    assert "repeated cell(s) dropped" in layout_to_markdown(answer([PAGE[1], PAGE[2], PAGE[1]]))


def test_what_is_not_a_loop_is_kept() -> None:
    pictures = [{"bbox": [0, 100 * i, 50, 100 * i + 90], "category": "Picture"} for i in range(5)]
    twice = [{"bbox": [0, 0, 9, 9], "category": "Text", "text": "Yes"},
             {"bbox": [0, 20, 9, 29], "category": "Text", "text": "Yes"}]
    layout = read_layout(answer(pictures + twice))
    assert len(layout.cells) == 7 and not layout.recovered


def test_not_json_at_all_is_marked_not_recovered() -> None:
    layout = read_layout("I cannot read this page.")
    assert layout.malformed and not layout.recovered and layout.cells == []
    md = layout_to_markdown("I cannot read this page.")
    assert not_recovered(md) and not was_recovered(md) and "not layout JSON" in md
    assert "cannot read" not in md  # nothing of the answer passed off as the page
    cells, not_as_given = parse_layout("I cannot read this page.")
    assert cells == [] and not_as_given
    fine = layout_to_markdown(answer([{"bbox": [0, 0, 9, 9], "category": "Text", "text": "A"}]))
    assert not not_recovered(fine) and not was_recovered(fine)


def test_smart_resize_matches_the_processor() -> None:
    # multiples of 28, area within the caps (values as the Qwen2-VL/dots.ocr processor gives)
    assert smart_resize(1654, 2339) == (1652, 2352)  # A4 at 200 dpi: just rounded
    w, h = smart_resize(4000, 5000)  # over 11,289,600 px: scaled down, then floored
    assert (w % 28, h % 28) == (0, 0) and w * h <= 11289600 and (w, h) == (2996, 3752)
    assert smart_resize(20, 20) == (56, 56)  # under min_pixels 3136: scaled up
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 10)


def test_bboxes_are_mapped_back_to_the_original_image() -> None:
    # the model saw a 4000x5000 scan as 2996x3752: a box around its centre in those pixels
    layout = read_layout(answer([{"bbox": [1498, 1876, 2996, 3752], "category": "Text",
                                  "text": "x"}]), size=(4000, 5000))
    assert layout.cells[0].bbox == (2000, 2500, 4000, 5000)
    # an explicit size seen by the model; boxes outside the image are clamped to it
    layout = read_layout(answer([{"bbox": [-5, 10, 700, 2000], "category": "Text",
                                  "text": "x"}]), size=(1000, 1000), seen=(500, 500))
    assert layout.cells[0].bbox == (0, 20, 1000, 1000)
    assert rescale((10, 10, 20, 20), (100, 100), (100, 100)) == (10, 10, 20, 20)
    # swapped corners and float coordinates are normalised; junk boxes become None
    cells = read_layout(answer([{"bbox": [20.4, 30, 10, 5.6], "category": "Text", "text": "a"},
                                {"bbox": [1, 2, "x", 4], "category": "Text", "text": "b"},
                                {"bbox": [1, 2, 3], "category": "Text", "text": "c"}])).cells
    assert [c.bbox for c in cells] == [(10, 6, 20, 30), None, None]


def test_the_plugin_postprocess_flags_a_recovered_page() -> None:
    spec = plugin()
    assert not was_recovered(spec.postprocess(answer(PAGE), "layout"))
    assert was_recovered(spec.postprocess(answer(PAGE)[:-40], "layout"))
    assert spec.postprocess("plain text", "ocr") == "plain text"


async def test_vlmhub_ocr_reports_per_page_whether_it_was_recovered(tmp_path: Path) -> None:
    """A real batch against a loopback endpoint that answers dots.ocr layouts: whole for
    one page, cut short (finish_reason length) for another, and no JSON at all for a third
    (that page fails: it is not reported as a page, and its raw answer is kept)."""
    answers = {"whole.png": (answer(PAGE), "stop"), "cut.png": (answer(PAGE)[:-60], "length"),
               "junk.png": ("lorem ipsum {{ not a layout", "stop")}
    order = list(answers)
    sent: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][0]["content"][1]["text"]
        assert text == plugin().presets["layout"].prompt
        name = order[len(sent)]  # concurrency 1: in order
        sent.append(name)
        content, finish = answers[name]
        return web.json_response({"choices": [{"index": 0, "finish_reason": finish,
                                               "message": {"role": "assistant",
                                                           "content": content}}]})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in order:
        Image.new("RGB", (400, 560), "white").save(pages / name)
    async with serve_app(app) as url:
        opts = BatchOptions(model="dots-ocr", out_dir=tmp_path / "out", concurrency=1,
                            base_url=url + "/v1")
        summary = await ocr_batch([pages / n for n in order], opts, plugin())
    by_name = {r.name: r for r in summary.results}
    assert by_name["whole"].status == by_name["cut"].status == "ok"
    assert not by_name["whole"].recovered and by_name["cut"].recovered
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").open()]
    assert {m["name"]: m["recovered"] for m in manifest} == {"whole": False, "cut": True,
                                                            "junk": False}
    assert was_recovered((tmp_path / "out" / "cut.md").read_text())
    junk = by_name["junk"]
    assert junk.status == "failed" and not junk.recovered and not junk.retryable
    assert junk.error is not None
    assert "not layout JSON" in junk.error and "junk.raw.txt" in junk.error
    assert (tmp_path / "out" / "junk.raw.txt").read_text() == "lorem ipsum {{ not a layout"
    assert not_recovered((tmp_path / "out" / "junk.md").read_text())
