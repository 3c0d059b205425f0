"""The web page: GET /ui and its assets, / -> /ui, and GET /api/ui, served by a real router
over the REAL supervisor and stand-in engines; then the page run by a real headless Chromium
(the browser tier: scripts/test.sh installs Chromium; skipped without it, failed under CI)."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from supervisor_support import build, model, routed_app

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
CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)


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
        for body in (page.text, js.text, css.text):  # no CDN, no external asset of any kind
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.I)
            assert "innerHTML" not in body  # server data is inserted as text only

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
