"""A tiny real HTTP/1.1 server on loopback for the OCR batch tests: answers by model name,
records every page it is sent, and can go away mid-batch."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image, ImageChops


class FlakyServer:
    """``GET`` anything: 200 (the batch's endpoint check). ``POST``: the answer depends on
    the request's model: ``flaky`` 503 (Retry-After 1), then a dropped connection, then 200;
    ``gateway`` 504; ``busy`` always 503; ``bad`` 400; ``dots-ocr`` 200 with a dots.ocr layout
    JSON; ``vanish`` 200 for ``vanish_after`` requests, then the server stops listening (every
    later connection is refused); anything else 200 ``<model>: done``."""

    def __init__(self, vanish_after: int = 2) -> None:
        self.seen: dict[str, list[float]] = {}
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.gets = 0
        self.heads: list[bytes] = []
        self.vanish_after = vanish_after
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET "):
            self.gets += 1
            self.reply(writer, 200, "", json.dumps({"object": "list", "data": []}).encode())
            await writer.drain()
            writer.close()
            return
        self.heads.append(head.lower())
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                      if h.lower().startswith(b"content-length"))
        body = json.loads(await reader.readexactly(length))
        name = body["model"]
        n = len(self.seen.setdefault(name, []))
        self.seen[name].append(time.monotonic())
        self.bodies.setdefault(name, []).append(body)
        if name == "flaky" and n == 1:
            writer.close()  # the connection drops without an answer
            return
        if name == "vanish" and n + 1 >= self.vanish_after and self.server is not None:
            self.server.close()  # stop listening: later connections are refused
        status, extra, content = 200, "", f"{name}: done"
        if (name == "flaky" and n == 0) or name == "busy":
            status, extra = 503, "Retry-After: 1\r\n" if name == "flaky" else "Retry-After: 0\r\n"
        elif name == "gateway":
            status = 504
        elif name == "bad":
            status = 400
        elif name == "dots-ocr":
            content = json.dumps([{"bbox": [1, 2, 3, 4], "category": "Title", "text": "# Hi"},
                                  {"bbox": [1, 5, 3, 9], "category": "Page-footer", "text": "7"}])
        answer = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": content}}]} if status == 200 else
            {"error": {"message": f"status {status}", "type": "x", "code": status}}).encode()
        self.reply(writer, status, extra, answer)
        await writer.drain()
        writer.close()

    @staticmethod
    def reply(writer: asyncio.StreamWriter, status: int, extra: str, answer: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(answer)}\r\n{extra}Connection: close\r\n\r\n".encode() + answer)

    def image_url(self, model: str, index: int = 0) -> str:
        """The data URL of the ``index``-th page sent for ``model``."""
        content = self.bodies[model][index]["messages"][0]["content"]
        url: str = next(p for p in content if p["type"] == "image_url")["image_url"]["url"]
        return url

    def image(self, model: str, index: int = 0) -> Image.Image:
        """The ``index``-th page sent for ``model``, decoded as the engine would."""
        return decode(self.image_url(model, index))

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        self.server = server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        finally:
            server.close()
            await server.wait_closed()


def decode(url: str) -> Image.Image:
    """A ``data:image/...;base64,`` URL, decoded (and fully loaded)."""
    data = base64.b64decode(url.split(",", 1)[1])
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def photo(w: int, h: int) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients plus grain (its PNG is about 2 bytes a
    pixel, its JPEG a fifth of that)."""
    grey = Image.linear_gradient("L")
    tint = Image.merge("RGB", [grey.resize((w, h)), Image.radial_gradient("L").resize((w, h)),
                               grey.rotate(90).resize((w, h))])
    return ImageChops.blend(tint, Image.effect_noise((w, h), 30).convert("RGB"), 0.3)
