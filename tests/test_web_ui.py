"""The web page: GET /ui and its assets, / -> /ui, GET /api/ui, the engine log tails, the last
hour's history and the OCR playground's helpers, served by a real router over the REAL
supervisor and stand-in engines (dots.ocr's real plugin spec run by the stand-in answering a
layout); then the page run by a real headless Chromium (the browser tier: scripts/test.sh
installs Chromium; skipped without it, failed under CI=true), driven through the DevTools
protocol to upload a page, run it and keep screenshots (printed paths)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from browser_support import ARTIFACTS, CHROMIUM, chromium_page
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from supervisor_support import build, model, routed_app

from vlmhub.config.registry import Registry
from vlmhub.config.schema import load_config, resolve
from vlmhub.control.contract import ReplicaInfo
from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.process import ProcessRuntime
from vlmhub.router.app import create_app
from vlmhub.router.history import History, Tee, attach_history, held_gib
from vlmhub.sizing.vram import Gpu
from vlmhub.testing.pytest_plugin import skip_or_fail

PRESETS: dict[str, Any] = {
    "description": "a stand-in with presets",
    "capabilities": ["chat", "vision", "ocr"],
    "presets": {
        "describe": {"prompt": "Describe this image in detail.", "description": "a paragraph"},
        "ocr": {
            "prompt": "Read all the text in this image.",
            "description": "plain text",
            "temperature": 0.0,
            "max_tokens": 256,
        },
    },
    "default_preset": "ocr",
}
ADMIN_KEY = "adm1n-s3cret-for-tests"
USER_KEY = "us3r-k3y-for-tests"


def models() -> dict[str, dict[str, Any]]:
    # footprints: alpha 1.25 GiB (asleep 0.5), bravo 2.25 GiB, on an 8 GiB card
    return {"alpha": model(1.0, sleep_gib=0.5, aliases=["a"], spec=PRESETS), "bravo": model(2.0)}


async def test_the_page_and_its_assets_are_served_and_root_redirects(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models())
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url) as http:
        page = await http.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script src="/ui/app.js"' in page.text
        assert '<link rel="stylesheet" href="/ui/style.css">' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"

        js = await http.get("/ui/app.js")
        assert js.status_code == 200
        assert js.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "/v1/chat/completions" in js.text and "getReader()" in js.text
        css = await http.get("/ui/style.css")
        assert css.status_code == 200
        assert css.headers["content-type"] == "text/css; charset=utf-8"
        bodies = [page.text, js.text, css.text]
        for script in ("ocr.js", "panels.js"):  # the playground, logs and the chart
            r = await http.get(f"/ui/{script}")
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/javascript; charset=utf-8"
            assert f'<script src="/ui/{script}" defer></script>' in page.text
            bodies.append(r.text)
        for body in bodies:  # no CDN, no external asset of any kind
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.I)
            assert "innerHTML" not in body and "outerHTML" not in body  # text only
            assert "insertAdjacentHTML" not in body and "eval(" not in body

        for other in ("/ui/index.htm", "/ui/ui.py", "/ui/..%2Frouter%2Fui.py", "/ui/__init__.py"):
            assert (await http.get(other)).status_code == 404, other

        home = await http.get("/", follow_redirects=False)
        assert home.status_code == 307 and home.headers["location"] == "/ui"
        assert (await http.get("/", follow_redirects=True)).text == page.text


async def test_api_ui_lists_the_gpu_and_every_model_with_its_presets(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models())
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url) as http:
        info = (await http.get("/api/ui")).json()
        listed = (await http.get("/api/models")).json()["models"]
    assert info["gpu"] == {"name": "test", "total_gib": 8.0, "usable_gib": 8.0}
    assert info["max_body_bytes"] == 50 * 1024 * 1024  # router.max_body_mb, for `vlmhub ocr`
    by_name = {m["name"]: m for m in info["models"]}
    assert list(by_name) == [m["name"] for m in listed] == ["alpha", "bravo"]
    alpha, bravo = by_name["alpha"], by_name["bravo"]
    assert alpha["aliases"] == ["a"]
    assert alpha["capabilities"] == ["chat", "vision", "ocr"]
    assert alpha["default_preset"] == "ocr"
    assert set(alpha["presets"]) == {"describe", "ocr"}
    assert alpha["presets"]["ocr"]["prompt"] == "Read all the text in this image."
    assert alpha["presets"]["ocr"]["description"] == "plain text"
    assert alpha["presets"]["ocr"]["max_tokens"] == 256
    assert alpha["presets"]["describe"]["temperature"] is None
    assert (alpha["budget_gib"], alpha["sleep_gib"], alpha["max_model_len"]) == (1.25, 0.5, 1024)
    assert bravo["presets"] == {} and bravo["default_preset"] is None
    assert bravo["capabilities"] == ["chat", "vision"]  # the spec's default
    assert bravo["budget_gib"] == 2.25
    assert {m["name"]: m["budget_gib"] for m in listed} == {"alpha": 1.25, "bravo": 2.25}


async def test_api_ui_follows_the_admin_rule_and_the_page_holds_no_secret(
    tmp_path: Path,
) -> None:
    sup, _, _ = build(tmp_path, models(), router={"admin_key": ADMIN_KEY, "api_keys": [USER_KEY]})
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url) as http:
        denied = await http.get("/api/ui")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_admin_key"
        user = await http.get("/api/ui", headers={"Authorization": f"Bearer {USER_KEY}"})
        assert user.status_code == 401  # an API key is not the admin key
        ok = await http.get("/api/ui", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert ok.status_code == 200 and len(ok.json()["models"]) == 2
        for path in ("/ui", "/ui/app.js", "/ui/style.css"):  # static: served without a key
            r = await http.get(path)
            assert r.status_code == 200
            assert ADMIN_KEY not in r.text and USER_KEY not in r.text


async def test_without_an_admin_key_api_ui_answers_loopback_clients_only(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models())
    async with routed_app(sup) as (url, app):
        async with httpx.AsyncClient(base_url=url) as http:  # a real loopback connection
            assert (await http.get("/api/ui")).status_code == 200
        remote = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=remote, base_url="http://vlmhub") as http:
            refused = await http.get("/api/ui")
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "admin_forbidden"
            assert (await http.get("/ui")).status_code == 200  # the page itself is public


async def run_chromium(url: str, profile: Path) -> tuple[str, str]:
    """Load ``url`` in headless Chromium; return (the DOM after the page's JS ran, stderr)."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(  # async: the router runs in this event loop
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--window-size=1280,900",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(), err.decode(errors="replace")


@pytest.mark.browser
async def test_a_real_browser_fills_the_models_table_and_the_gpu_bar(tmp_path: Path) -> None:
    if CHROMIUM is None:
        skip_or_fail("no Chromium binary (scripts/test.sh installs Debian's chromium)")
    sup, _, _ = build(tmp_path, models(), delay=0.1)
    async with routed_app(sup) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            loaded = await http.post("/api/models/alpha/load")
            assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
        dom, log = await run_chromium(url + "/", tmp_path / "chromium-profile")  # via redirect
    assert "Uncaught" not in log, log[-2000:]  # no JavaScript error on the console
    rows = dict(re.findall(r'<tr data-model="([^"]+)" data-state="([^"]+)"', dom))
    assert rows == {"alpha": "ready", "bravo": "stopped"}, dom[-3000:]
    assert '<span class="badge ready">ready</span>' in dom
    assert '<span class="badge stopped">stopped</span>' in dom
    assert "alpha: 1.25 GiB (ready)" in dom  # its GPU-bar legend entry
    assert "bravo: " not in dom  # a stopped model holds no memory
    assert "1.25 GiB held · 6.75 GiB free" in dom and "8.00 GiB usable" in dom
    assert re.search(r'<option value="alpha"[^>]*>alpha \(chat, vision, ocr\)</option>', dom)
    assert '<option value="ocr">ocr</option>' in dom  # alpha's presets in "Try it"
    assert '<p id="preset-desc" class="muted small">plain text</p>' in dom  # the default one


# --- engine logs, the last hour -------------------------------------------------------------


async def test_engine_logs_tail_a_running_and_a_stopped_engine(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models(), router={"admin_key": ADMIN_KEY})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url, timeout=60,
                                                              headers=admin) as http:
        assert (await http.post("/api/models/alpha/load")).json()["state"] == "ready"
        logs = (await http.get("/api/ui/logs/a", params={"tail": 500})).json()  # by alias
        assert logs["name"] == "alpha" and logs["state"] == "ready" and logs["running"]
        assert any("Application startup complete" in ln for ln in logs["lines"])
        assert any("Starting vLLM API server" in ln for ln in logs["lines"])
        short = (await http.get("/api/ui/logs/alpha", params={"tail": 2})).json()["lines"]
        assert short == logs["lines"][-2:]
        assert (await http.post("/api/models/alpha/unload")).json()["state"] == "stopped"
        after = (await http.get("/api/ui/logs/alpha")).json()  # the process log outlives it
        assert not after["running"] and after["state"] == "stopped"
        assert any("Shutting down" in ln for ln in after["lines"])
        never = (await http.get("/api/ui/logs/bravo")).json()
        assert never["lines"] == [] and never["error"] is None
        missing = await http.get("/api/ui/logs/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        for bad in ("0", "abc", "999999"):
            r = await http.get("/api/ui/logs/alpha", params={"tail": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tail"
        denied = await http.get("/api/ui/logs/alpha", headers={"Authorization": "Bearer x"})
        assert denied.status_code == 401
        assert (await http.get("/api/ui/history")).json()["recording"] is False  # not wired


def test_history_keeps_changes_within_the_window() -> None:
    now = [1000.0]
    h = History(window_s=600, clock=lambda: now[0])
    info = ReplicaInfo("m", "ready", "", "process", 1, 2.5, 0, 0, False, False, None, None, None)
    asleep = ReplicaInfo("m", "sleeping", "", "process", 1, 2.5, 0, 0, False, False, None, None,
                         None)
    assert h.sample([info], {"m": 0.5})
    now[0] += 1
    assert not h.sample([info], {"m": 0.5})  # nothing changed: no new sample
    now[0] += 60
    assert h.sample([info], {"m": 0.5})  # a minute on: one to carry the line
    assert h.sample([asleep], {"m": 0.5})
    assert [s[1] for s in h.samples] == [{"m": 2.5}, {"m": 2.5}, {"m": 0.5}]
    h.observe_load("m", 3.25, True)
    h.observe_eviction("m", "sleep")
    now[0] += 700  # the window moves past all of it: the last sample stays as the start
    h.observe_load("m", 1.0, False)
    data = h.as_json()
    assert [s["held_gib"] for s in data["samples"]] == [{"m": 0.5}]
    assert [(e["kind"], e["seconds"]) for e in data["events"]] == [("load_failed", 1.0)]
    assert held_gib(info, 0.5) == 2.5 and held_gib(asleep, 0.5) == 0.5
    stopping = ReplicaInfo("m", "stopping", "", "process", 1, 2.5, 0, 0, False, False, None,
                           None, None)
    assert held_gib(stopping, 0.5) == 2.5  # vLLM holds the memory until it has gone
    external = ReplicaInfo("x", "ready", "", "external", 1, 0.0, 0, 0, False, True, None, None,
                           None)
    assert held_gib(external, 0.0) == 0.0


async def test_history_records_memory_held_loads_and_evictions(tmp_path: Path) -> None:
    """On a 3 GiB card alpha (1.25) and bravo (2.25) do not fit together: loading bravo
    evicts alpha. The router's history (wired as `vlmhub route` wires it) shows all of it."""
    built, rec, _ = build(tmp_path, models(), total_gib=3.0)
    await built.shutdown()  # only its parts are used: a supervisor that also feeds a history
    history = History()
    sup = Supervisor([r.model for r in built.replicas.values()], built.config, built.gpu,
                     built.runtime, observer=Tee(rec, history), tick_s=0.05)
    async with routed_app(sup) as (url, app), sampled(app, sup, history), \
            httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.post("/api/models/alpha/load")).json()["state"] == "ready"
        await asyncio.sleep(0.2)
        assert (await http.post("/api/models/bravo/load")).json()["state"] == "ready"
        await asyncio.sleep(0.2)
        data = (await http.get("/api/ui/history")).json()
    assert data["recording"] and data["window_s"] == 3600
    kinds = [(e["model"], e["kind"]) for e in data["events"]]
    assert kinds == [("alpha", "load"), ("alpha", "evict_stop"), ("bravo", "load")]
    assert rec.loads == [("alpha", True), ("bravo", True)]  # the metrics side still sees them
    held = [s["held_gib"] for s in data["samples"]]
    assert held[0] == {"alpha": 0.0, "bravo": 0.0}
    assert {"alpha": 1.25, "bravo": 0.0} in held and held[-1] == {"alpha": 0.0, "bravo": 2.25}
    assert all(sum(h.values()) <= 3.0 for h in held)  # never both at once
    times = [s["t"] for s in data["samples"]]
    assert times == sorted(times) and data["now"] >= times[-1]


@contextlib.asynccontextmanager
async def sampled(app: Starlette, sup: Supervisor, history: History) -> AsyncIterator[None]:
    """What :func:`attach_history` adds to a router app (tested below), for an app that is
    already running: ``app.state.history`` and its sampler."""
    app.state.history = history
    task = asyncio.create_task(history.run(sup, interval_s=0.05))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_attach_history_samples_only_while_the_app_lives(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, models())
    history = History()
    app = create_app(sup, sup.config)
    attach_history(app, sup, history, interval_s=0.01)
    assert app.state.history is history
    async with app.router.lifespan_context(app):  # the app's own lifespan runs inside
        await asyncio.sleep(0.1)
        assert app.state.router.session is not None  # (what create_app's lifespan opens)
    kept = len(history.samples)
    assert kept >= 1 and history.samples[0][1] == {"alpha": 0.0, "bravo": 0.0}
    await asyncio.sleep(0.1)
    history.sample([], {})  # the sampler has stopped: only this one is added
    assert len(history.samples) == kept + 1
    await sup.shutdown()


# --- the OCR playground ---------------------------------------------------------------------

# The page the tests upload is 1240 x 1754 px; dots.ocr sees it as 1232 x 1764 (multiples of
# 28), and answers boxes in those pixels.
PAGE_SIZE, SEEN = (1240, 1754), (1232, 1764)
TABLE = "<table><tr><th>Item</th><th>Qty</th></tr><tr><td>Apples</td><td>3</td></tr></table>"
LAYOUT = [
    {"bbox": [88, 50, 1144, 98], "category": "Page-header", "text": "ACME quarterly"},
    {"bbox": [88, 140, 1144, 220], "category": "Title", "text": "# Fruit report"},
    {"bbox": [88, 260, 1144, 420], "category": "Text",
     "text": "Sales of **apples** rose; see the table <script>alert(1)</script>."},
    {"bbox": [88, 460, 700, 640], "category": "Table", "text": TABLE},
    {"bbox": [300, 680, 930, 760], "category": "Formula", "text": r"\[ E = m c^{2} \]"},
    {"bbox": [88, 800, 616, 1300], "category": "Picture"},
    {"bbox": [88, 1320, 616, 1380], "category": "Caption", "text": "Figure 1: an apple."},
    {"bbox": [560, 1700, 680, 1740], "category": "Page-footer", "text": "3"},
]


def ocr_supervisor(tmp_path: Path, answer: str) -> Supervisor:
    """dots.ocr's real plugin spec, run by the stand-in engine answering ``answer``."""
    base = random.randint(21000, 60000)
    cfg = {
        "gpu": {"total_gib": 24, "reserve_gib": 0, "force_total": True},
        "router": {"health_interval_s": 0.5},
        "runtime": {"kind": "process", "port_range": [base, base + 20],
                    "process_argv": [sys.executable, str(Path(__file__).with_name(
                        "layout_engine.py"))],
                    "env": {"VLMHUB_STUB_STARTUP_DELAY": "0.1", "VLMHUB_TEST_LAYOUT": answer}},
        "models": {"dots-ocr": {"plugin": "dots-ocr"}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    gpu = Gpu(24.0, 0, None, "test", "config")
    resolved = resolve(loaded, Registry().specs(), gpu)
    rt = ProcessRuntime(loaded.config.runtime, state_dir=tmp_path / "state")
    return Supervisor(resolved, loaded.config, gpu, rt, tick_s=0.05)


def page_png(path: Path) -> Path:
    img = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(img)
    for cell in LAYOUT:  # something on the page where each box is
        x1, y1, x2, y2 = (round(v * s / t) for v, s, t in
                          zip(cell["bbox"], PAGE_SIZE * 2, SEEN * 2, strict=True))
        draw.rectangle((x1 + 4, y1 + 4, x2 - 4, y2 - 4), outline="black", width=3)
    img.save(path)
    return path


async def test_ocr_page_prepares_images_and_pdf_pages(tmp_path: Path) -> None:
    sup = ocr_supervisor(tmp_path, "[]")
    png = page_png(tmp_path / "page.png").read_bytes()
    pdf_path = tmp_path / "two.pdf"
    Image.new("RGB", (850, 1100), "white").save(
        pdf_path, "PDF", resolution=100, save_all=True,
        append_images=[Image.new("RGB", (1100, 850), "white")])
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url, timeout=60) as http:
        info = await http.post("/api/ui/ocr/page", content=png,
                               params={"model": "dots.ocr", "name": "scan.PNG"})
        assert info.status_code == 200, info.text
        page = info.json()
        assert (page["width"], page["height"], page["pages"], page["page"]) == (1240, 1754, 1, 1)
        assert page["data_url"].startswith("data:image/png;base64,")
        second = (await http.post("/api/ui/ocr/page", content=pdf_path.read_bytes(),
                                  params={"model": "dots-ocr", "name": "two.pdf",
                                          "page": 2})).json()
        assert second["pages"] == 2 and second["dpi"] == 200  # rendered as `vlmhub ocr` does
        assert (second["width"], second["height"]) == (2200, 1700)  # 11 x 8.5 in at 200 dpi
        beyond = await http.post("/api/ui/ocr/page", content=pdf_path.read_bytes(),
                                 params={"name": "two.pdf", "page": 3})
        assert beyond.status_code == 400
        assert beyond.json()["error"]["message"] == "two.pdf has 2 page(s): there is no page 3"
        junk = await http.post("/api/ui/ocr/page", content=b"not a png",
                               params={"name": "broken.png"})
        assert junk.status_code == 400
        message = junk.json()["error"]["message"]
        assert "broken.png" in message and "cannot read the image" in message
        assert "vlmhub-ui-" not in message  # no server path
        other = await http.post("/api/ui/ocr/page", content=b"x", params={"name": "notes.txt"})
        assert other.status_code == 400 and "not an image or a PDF" in other.text
        assert list(Path(tempfile.gettempdir()).glob("vlmhub-ui-*")) == []  # cleaned up


async def test_ocr_render_gives_markdown_and_boxes_on_the_sent_page(tmp_path: Path) -> None:
    sup = ocr_supervisor(tmp_path, "[]")
    answer = json.dumps(LAYOUT)
    async with routed_app(sup) as (url, _), httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def render(text: str, preset: str | None = "layout",
                         **source: int) -> dict[str, Any]:
            r = await http.post("/api/ui/ocr/render", json={
                "model": "dots-ocr", "preset": preset, "text": text,
                "width": PAGE_SIZE[0], "height": PAGE_SIZE[1], **source})
            assert r.status_code == 200, r.text
            data: dict[str, Any] = r.json()
            return data

        # a page sent downscaled from 2480 x 3508: boxes (and the Markdown's picture link) in
        # the original page's pixels, the coordinates of `vlmhub ocr`'s NAME.json
        big = await render(answer, source_width=2480, source_height=3508)
        assert (big["layout"]["width"], big["layout"]["height"]) == (2480, 3508)
        picture = LAYOUT[5]["bbox"]
        box = [round(v * 2480 / SEEN[0]) if i % 2 == 0 else round(v * 3508 / SEEN[1])
               for i, v in enumerate(picture)]
        assert big["layout"]["cells"][5]["bbox"] == box
        assert f"![picture](bbox:{','.join(map(str, box))})" in big["markdown"]
        assert big["layout"]["colours"]["Picture"] == "#c2255c"  # the drawing's colours
        whole = await render(answer)
        assert whole["markdown"].startswith("# Fruit report\n\n")  # dots.ocr's Markdown
        assert TABLE in whole["markdown"] and "$$\nE = m c^{2}\n$$" in whole["markdown"]
        assert "ACME quarterly" not in whole["markdown"]  # page header dropped
        cells = whole["layout"]["cells"]
        assert [c["category"] for c in cells] == [c["category"] for c in LAYOUT]
        sx, sy = PAGE_SIZE[0] / SEEN[0], PAGE_SIZE[1] / SEEN[1]
        for cell, sent in zip(cells, LAYOUT, strict=True):
            x1, y1, x2, y2 = sent["bbox"]
            assert cell["bbox"] == [round(x1 * sx), round(y1 * sy), round(x2 * sx),
                                    round(y2 * sy)]
        assert not whole["recovered"]
        cut = await render(answer[: answer.index("Formula") + 30])
        assert cut["recovered"] and cut["layout"]["truncated"]
        assert cut["layout"]["cells"][-1]["partial"]  # the formula, cut in its text
        assert "vlmhub: recovered" in cut["markdown"]
        plain = await render("Just some text.", "ocr")
        assert plain == {"markdown": "Just some text.", "layout": None, "recovered": False,
                         "not_recovered": False}
        junk = await render("I cannot read this page.")  # layout preset, no JSON at all
        assert junk["not_recovered"] and not junk["recovered"]
        assert "vlmhub: not recovered" in junk["markdown"]
        bad = await http.post("/api/ui/ocr/render", json={"text": 3})
        assert bad.status_code == 400 and "`text`" in bad.json()["error"]["message"]


# --- the browser tier: the playground, logs and the chart in headless Chromium ---------------


def keep_artifact(made: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """Copy a screenshot out of the test's tmp dir to ARTIFACTS and say where it is."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / name
    shutil.copyfile(made, kept)
    with capsys.disabled():
        print(f"\nscreenshot: {kept}")
    return kept


@pytest.mark.browser
async def test_ocr_playground_in_a_real_browser(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Upload a page, run dots.ocr's layout preset (the stand-in engine answers a layout),
    and see the boxes drawn where the cells are, their text on hover, the Markdown with its
    table and formula, and the two downloads."""
    if CHROMIUM is None:
        skip_or_fail("no Chromium binary (scripts/test.sh installs Debian's chromium)")
    sup = ocr_supervisor(tmp_path, json.dumps(LAYOUT))
    scan = page_png(tmp_path / "scan.png")
    async with routed_app(sup) as (url, _), chromium_page(url + "/ui",
                                                          tmp_path / "profile") as page:
        await page.wait_for("!!document.querySelector('#ocr-model option[value=\"dots-ocr\"]')")
        assert await page.js("document.getElementById('ocr-preset').value") == "layout"
        await page.set_files("#ocr-file", scan)
        await page.wait_for("document.getElementById('ocr').dataset.state === 'ready'")
        status = await page.js("document.getElementById('ocr-status').textContent")
        assert "1240\u00d71754 px" in status  # not downscaled: under dots.ocr's pixel cap
        await page.js("document.getElementById('ocr-run').click()")
        await page.wait_for("document.getElementById('ocr').dataset.state === 'done'", 120)
        boxes = await page.js("""[...document.querySelectorAll('#ocr-boxes rect')].map(r =>
            [r.dataset.category, ...['x', 'y', 'width', 'height'].map(a => +r.getAttribute(a))])""")
        sx, sy = PAGE_SIZE[0] / SEEN[0], PAGE_SIZE[1] / SEEN[1]
        expected = []
        for cell in LAYOUT:
            x1, y1, x2, y2 = cell["bbox"]
            left, top = round(x1 * sx), round(y1 * sy)
            expected.append([cell["category"], left, top, round(x2 * sx) - left,
                             round(y2 * sy) - top])
        assert boxes == expected  # every cell, at its place on the page that was sent
        assert await page.js("document.getElementById('ocr-boxes').getAttribute('viewBox')") \
            == "0 0 1240 1754"
        await page.js("document.querySelector('#ocr-boxes rect[data-category=Text]')"
                      ".dispatchEvent(new Event('mouseenter'))")
        hover = await page.js("document.getElementById('ocr-hover').textContent")
        assert hover.startswith("Text: Sales of **apples** rose")
        md = "document.getElementById('ocr-md')"
        assert await page.js(f"{md}.querySelector('h3').textContent") == "Fruit report"
        cells = await page.js(f"[...{md}.querySelectorAll('table td')].map(t => t.textContent)")
        assert cells == ["Apples", "3"]  # the table's HTML, rendered
        assert await page.js(f"{md}.querySelector('pre.formula').textContent") \
            == "$$\nE = m c^{2}\n$$"  # the formula as its LaTeX source
        assert await page.js(f"{md}.querySelector('strong').textContent") == "apples"
        assert await page.js(f"{md}.querySelectorAll('script').length") == 0
        assert "alert(1)" in await page.js(f"{md}.textContent")  # shown as text, not run
        downloads = tmp_path / "downloads"  # what a click on each link saves
        await page.call("Page.setDownloadBehavior", behavior="allow",
                        downloadPath=str(downloads))
        for link in ("ocr-md-dl", "ocr-json-dl"):
            await page.js(f"document.getElementById('{link}').click()")
        for _ in range(100):
            if {p.name for p in downloads.glob("*")} >= {"scan.md", "scan.json"}:
                break
            await asyncio.sleep(0.1)
        saved_md = (downloads / "scan.md").read_text()
        assert saved_md.startswith("# Fruit report") and TABLE in saved_md
        saved = json.loads((downloads / "scan.json").read_text())
        assert saved["model"] == "dots-ocr" and saved["preset"] == "layout"
        assert [c["bbox"] for c in saved["cells"]] == [
            [e[1], e[2], e[1] + e[3], e[2] + e[4]] for e in expected]
        assert saved["raw"] == json.dumps(LAYOUT) and saved["finish_reason"] == "stop"
        shot = await page.screenshot(tmp_path / "ocr-playground.png")
        assert page.errors == []
    assert shot.stat().st_size > 10_000
    keep_artifact(shot, "ocr-playground.png", capsys)


@pytest.mark.browser
async def test_logs_and_the_last_hour_in_a_real_browser(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """alpha, then bravo on a 3 GiB card (alpha is evicted): the chart shows both areas and
    the three events; the log panel tails bravo's engine."""
    if CHROMIUM is None:
        skip_or_fail("no Chromium binary (scripts/test.sh installs Debian's chromium)")
    built, rec, _ = build(tmp_path, models(), total_gib=3.0, delay=0.1)
    await built.shutdown()
    history = History()
    sup = Supervisor([r.model for r in built.replicas.values()], built.config, built.gpu,
                     built.runtime, observer=Tee(rec, history), tick_s=0.05)
    async with routed_app(sup) as (url, app), sampled(app, sup, history):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for name in ("alpha", "bravo"):
                assert (await http.post(f"/api/models/{name}/load")).json()["state"] == "ready"
        async with chromium_page(url + "/ui", tmp_path / "profile") as page:
            chart = "document.getElementById('history-chart')"
            await page.wait_for(f"{chart}.dataset.events === '3'")
            marks = await page.js(f"[...{chart}.querySelectorAll('.ev')].map(e => "
                                  "[e.dataset.model, e.getAttribute('class')])")
            assert marks == [["alpha", "ev load"], ["alpha", "ev evict_stop"],
                             ["bravo", "ev load"]]
            areas = await page.js(f"[...{chart}.querySelectorAll('.area')]"
                                  ".map(a => a.dataset.model)")
            assert areas == ["alpha", "bravo"]
            tip = await page.js(f"{chart}.querySelector('.ev.load title').textContent")
            assert re.search(r"alpha loaded in \d+\.\d s$", tip)
            summary = await page.js("document.getElementById('history-summary').textContent")
            assert summary.startswith("last hour: 2 load(s), 0 failed, 1 eviction(s)")
            logs = "document.getElementById('logs-out')"
            await page.wait_for(f"{logs}.textContent.includes('Application startup complete')")
            assert await page.js("document.getElementById('logs-model').value") == "bravo"
            assert "bravo: ready" in await page.js(
                "document.getElementById('logs-status').textContent")
            assert await page.js(f"{logs}.querySelectorAll('span.phase').length") > 0
            shot = await page.screenshot(tmp_path / "logs-and-history.png")
            assert page.errors == []
    keep_artifact(shot, "logs-and-history.png", capsys)


# vLLM writes lines like these: its arguments as one dict, and paths without a space in them.
LONG_LOG_LINES = [
    "INFO 05-12 10:00:00 [api_server.py:1] non-default args: {"
    + ", ".join(f"'option_{i}': 'value-{i}-{'x' * 12}'" for i in range(40)) + "}",
    "ERROR 05-12 10:00:01 [core.py:711] OSError: cannot open "
    + "/".join(f"segment-{i:03d}" for i in range(60)) + "/model.safetensors",
]


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1280, 1920])
async def test_the_dashboard_never_scrolls_sideways_with_long_log_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], width: int) -> None:
    """Issue 21 item 16: long engine-log lines stay inside the log panel (wrapped) and the
    models table scrolls inside its own box; the page is never wider than the window."""
    if CHROMIUM is None:
        skip_or_fail("no Chromium binary (scripts/test.sh installs Debian's chromium)")
    sup, _, _ = build(tmp_path, models(), delay=0.1)
    assert isinstance(sup.runtime, ProcessRuntime)
    async with routed_app(sup) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for name in ("alpha", "bravo"):
                assert (await http.post(f"/api/models/{name}/load")).json()["state"] == "ready"
        for name in ("alpha", "bravo"):  # appended to the engines' own log files
            with sup.runtime.log_path(name).open("a") as log:
                log.write("\n".join(LONG_LOG_LINES) + "\n")
        async with chromium_page(url + "/ui", tmp_path / "profile") as page:
            await page.resize(width, 900)
            logs = "document.getElementById('logs-out')"
            await page.wait_for(f"{logs}.textContent.includes('segment-059/model.safetensors')")
            await page.wait_for("document.querySelectorAll('#models-body tr[data-model]')"
                                ".length === 2")
            await page.wait_for("document.querySelectorAll('#gpu-segments .seg').length === 2")
            sizes = await page.js("""(() => {
                const root = document.documentElement, right = (id) =>
                    document.getElementById(id).getBoundingClientRect().right;
                const out = document.getElementById('logs-out');
                return {window: window.innerWidth, visible: root.clientWidth,
                        page: root.scrollWidth, body: document.body.scrollWidth,
                        cards: Math.max(...[...document.querySelectorAll('.card')].map(
                            (c) => c.getBoundingClientRect().right)),
                        bar: right('gpu-bar'),
                        wrap: document.querySelector('.table-wrap').getBoundingClientRect().right,
                        log: right('logs-out'), logScroll: out.scrollWidth,
                        logClient: out.clientWidth};
            })()""")
            shot = await page.screenshot(tmp_path / f"dashboard-{width}.png")
            assert page.errors == []
    keep_artifact(shot, f"dashboard-{width}.png", capsys)
    window = sizes["window"]
    assert window == width
    visible = sizes["visible"]  # the window less its vertical scroll bar
    assert sizes["page"] <= visible and sizes["body"] <= visible, sizes  # no sideways scroll
    for part in ("cards", "bar", "wrap", "log"):  # nothing cut at the right edge
        assert sizes[part] <= visible, (part, sizes)
    assert sizes["logScroll"] <= sizes["logClient"], sizes  # long lines wrap in the panel
