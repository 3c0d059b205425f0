"""Headless Chromium driven through the DevTools protocol (a websocket, aiohttp's client):
open a page, evaluate JavaScript, wait for a condition, set a file input, take a screenshot.
Only loopback: Chromium listens on 127.0.0.1 and loads the router's page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
ARTIFACTS = Path(os.environ.get("VLMHUB_TEST_ARTIFACTS",
                                Path(tempfile.gettempdir()) / "vlmhub-test-artifacts"))


class Page:
    """One tab: ``call`` a DevTools method, ``js`` an expression, ``wait_for`` a condition."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.errors: list[str] = []  # uncaught exceptions and console errors
        self.size: tuple[int, int] | None = None  # the window's, when set by ``resize``

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self.ids)
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection ended: {msg.type}")
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append(json.dumps(details.get("exception", details))[:500])
            elif data.get("method") == "Runtime.consoleAPICalled" and \
                    data["params"]["type"] == "error":
                self.errors.append(json.dumps(data["params"]["args"])[:500])
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def js(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise)."""
        out = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                              returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. Raises TimeoutError with the
        page's status line and errors."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                value = await self.js(expression)
            except RuntimeError:  # the page is not there yet (about:blank, still loading)
                value = None
            if value:
                return value
            if loop.time() > deadline:
                state = await self.js("document.body.innerText.slice(0, 3000)")
                raise TimeoutError(f"{expression} stayed false; errors {self.errors}; "
                                   f"page text: {state}")
            await asyncio.sleep(0.2)

    async def set_files(self, selector: str, *paths: Path) -> None:
        root = await self.call("DOM.getDocument")
        node = await self.call("DOM.querySelector", nodeId=root["root"]["nodeId"],
                               selector=selector)
        await self.call("DOM.setFileInputFiles", nodeId=node["nodeId"],
                        files=[str(p) for p in paths])

    async def resize(self, width: int, height: int) -> None:
        """Lay the page out in a window of ``width`` x ``height`` CSS pixels (a desktop's)."""
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        self.size = (width, height)

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page at ``path``, taken in a window taller than the page (as wide
        as the current one), so without a scroll bar: captureBeyondViewport alone lays the page
        out again without the bar, wider, and keeps the old width, cutting the right edge off.
        (Chromium keeps the bar in a window exactly as tall as the page: hence the margin.)"""
        width, height = self.size or await self.js("[innerWidth, innerHeight]")
        tall = await self.js("document.documentElement.scrollHeight")
        await self.call("Emulation.setDeviceMetricsOverride", width=width,
                        height=max(tall + 200, height), deviceScaleFactor=1, mobile=False)
        try:
            page = await self.js("Math.ceil(document.documentElement.getBoundingClientRect()"
                                 ".height)")
            shot = await self.call("Page.captureScreenshot", format="png", clip={
                "x": 0, "y": 0, "width": width, "height": max(page, height), "scale": 1})
        finally:
            if self.size:
                await self.resize(*self.size)
            else:
                await self.call("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium_page(url: str, profile: Path) -> AsyncIterator[Page]:
    """Headless Chromium showing ``url``, with a DevTools connection to its tab."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
                await asyncio.sleep(0.1)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Runtime.enable")
                await page.call("Page.enable")
                yield page
    finally:
        proc.kill()
        await proc.wait()
