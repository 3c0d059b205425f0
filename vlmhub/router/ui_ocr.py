"""The web page's OCR playground, server side: two admin-only helpers around the request the
page itself sends to ``POST /v1/chat/completions``.

- ``POST /api/ui/ocr/page?model=M&name=FILE&page=N`` (body: the uploaded file) prepares one
  page as ``vlmhub ocr`` would (EXIF upright, PDFs rendered at 200 dpi, downscaled to the
  model's pixel cap, encoded to fit the router's body limit) and answers its data URL and size.
- ``POST /api/ui/ocr/render`` (``{model, preset, text, width, height, source_width,
  source_height}``) turns the answer into what the page shows: the Markdown and, for a layout
  answer, the repaired cells with their bboxes in the pixels of the original page
  (``source_*``, else the page that was sent), the coordinates of ``vlmhub ocr``'s NAME.json
  (:mod:`vlmhub.ocr.outputs`), with the colours its drawing uses. The layout preset's
  Markdown is rendered from those cells (so its picture links carry the same coordinates);
  other presets' is the model's post-processing.

Both follow the admin rule of ``/api``. Reading the upload blocks asynchronously; decoding,
rendering and encoding run in threads (PDFs one at a time: PDFium is not thread-safe).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlmhub.errors import VlmhubError
from vlmhub.ocr.drawing import CATEGORY_COLOURS, OTHER_COLOUR
from vlmhub.ocr.images import DEFAULT_MAX_PIXELS
from vlmhub.ocr.layout import not_recovered, render_markdown, was_recovered
from vlmhub.ocr.outputs import PageGeometry, is_layout, read_page_layout
from vlmhub.ocr.pages import INSTALL_HINT, PageRenderer, is_supported, list_pages
from vlmhub.router.admin import check_admin
from vlmhub.router.body import parse_payload, read_body
from vlmhub.router.errors import error_response
from vlmhub.router.state import Reject, RouterState, router_state
from vlmhub.spec import ModelSpec

PROMPT_ROOM = 64 * 1024  # bytes of the request body kept for the prompt and the JSON around


def _spec(st: RouterState, model: str | None) -> ModelSpec | None:
    """The spec of ``model`` (a name or alias) when the supervisor knows one, else None."""
    real = st.supervisor.resolve(model) if model else None
    replicas = getattr(st.supervisor, "replicas", None)
    replica = replicas.get(real) if isinstance(replicas, dict) and real else None
    spec = getattr(getattr(replica, "model", None), "spec", None)
    return spec if isinstance(spec, ModelSpec) else None


def _bad(message: str, code: str = "invalid_ocr_input", status: int = 400) -> Response:
    return error_response(status, message, "invalid_request_error", code)


async def _prepare(data: bytes, name: str, page: int, max_pixels: int,
                   max_bytes: int) -> dict[str, Any]:
    """Write the upload to a private temp folder and prepare one page with the batch's own
    :class:`PageRenderer` (PDFs in its PDFium thread; the rest in worker threads)."""
    renderer = PageRenderer()
    tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="vlmhub-ui-")
    try:
        path = Path(tmp) / f"upload{Path(name).suffix.lower()}"
        await asyncio.to_thread(path.write_bytes, data)
        refs = await asyncio.to_thread(list_pages, path)
        if not 1 <= page <= len(refs):
            raise VlmhubError(f"{name} has {len(refs)} page(s): there is no page {page}")
        prepared = await renderer.aload(refs[page - 1], max_pixels, max_bytes)
    finally:
        await asyncio.to_thread(renderer.close)  # closes the PDF before its file goes
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return {"data_url": prepared.data_url, "width": prepared.width, "height": prepared.height,
            "source_width": prepared.source_width, "source_height": prepared.source_height,
            "dpi": prepared.dpi, "encoding": prepared.encoding, "page": page,
            "pages": len(refs)}


def _lock(request: Request) -> asyncio.Lock:
    """One page prepared at a time per router (PDFium is not thread-safe; pages are big)."""
    lock = getattr(request.app.state, "ocr_lock", None)
    if not isinstance(lock, asyncio.Lock):
        lock = request.app.state.ocr_lock = asyncio.Lock()
    return lock


async def ocr_page(request: Request) -> Response:
    """POST /api/ui/ocr/page: one page of an uploaded image or PDF, ready to send."""
    st = router_state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    name = request.query_params.get("name", "")
    try:
        page = int(request.query_params.get("page", "1"))
    except ValueError:
        return _bad("`page` must be a page number (1, 2, ...)")
    if not is_supported(Path(name)):
        return _bad(f"{name or 'the file'} is not an image or a PDF: send png, jpg, jpeg, "
                    "webp, tif, tiff, bmp or pdf")
    module = "pypdfium2" if name.lower().endswith(".pdf") else "PIL"
    if importlib.util.find_spec(module) is None:
        return _bad(f"the router cannot read this file without {module}. Fix: {INSTALL_HINT} "
                    "where the router runs", "ocr_extra_missing", 501)
    try:
        data = await read_body(request, st.max_body, st.body_timeout_s)
    except Reject as exc:
        return exc.response
    spec = _spec(st, request.query_params.get("model"))
    cap = spec.vision.max_pixels if spec is not None and spec.vision is not None else None
    try:
        async with _lock(request):
            info = await _prepare(data, name, page, cap or DEFAULT_MAX_PIXELS,
                                  max(0, st.max_body - PROMPT_ROOM))
    except VlmhubError as exc:  # an unreadable file: say so without the temp path
        return _bad(re.sub(r"\S*vlmhub-ui-\S*/upload\.\w+", lambda _: name, str(exc)))
    return JSONResponse(info, headers={"Cache-Control": "no-store"})


def _size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def ocr_render(request: Request) -> Response:
    """POST /api/ui/ocr/render: the answer's Markdown and, for a layout, its cells."""
    st = router_state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    try:
        body = parse_payload(await read_body(request, st.max_body, st.body_timeout_s))
    except Reject as exc:
        return exc.response
    text, preset = body.get("text"), body.get("preset")
    if not isinstance(text, str) or not (preset is None or isinstance(preset, str)):
        return _bad("send {\"model\", \"preset\", \"text\", \"width\", \"height\"}: `text` is "
                    "the model's answer (a string), `preset` a preset name or null")
    model = body.get("model")
    spec = _spec(st, model if isinstance(model, str) else None)
    width, height = _size(body.get("width")), _size(body.get("height"))
    source = (_size(body.get("source_width")) or width, _size(body.get("source_height")) or height)
    markdown = await asyncio.to_thread(spec.postprocess, text, preset) if spec else text
    layout: dict[str, Any] | None = None
    if width and height and source[0] and source[1]:
        cap = spec.vision.max_pixels if spec is not None and spec.vision else DEFAULT_MAX_PIXELS
        geo = PageGeometry.of((source[0], source[1]), (width, height), spec, cap)
        read = await asyncio.to_thread(read_page_layout, text, geo)
        if is_layout(preset):
            markdown = await asyncio.to_thread(render_markdown, read)
        if any(c.bbox is not None for c in read.cells):
            layout = {**read.as_json(), "width": source[0], "height": source[1],
                      "colours": {**CATEGORY_COLOURS, "other": OTHER_COLOUR}}
    recovered = was_recovered(markdown) or bool(layout and layout["recovered"])
    return JSONResponse({"markdown": markdown, "layout": layout, "recovered": recovered,
                         "not_recovered": not_recovered(markdown)},
                        headers={"Cache-Control": "no-store"})


def ocr_routes() -> list[Route]:
    return [
        Route("/api/ui/ocr/page", ocr_page, methods=["POST"]),
        Route("/api/ui/ocr/render", ocr_render, methods=["POST"]),
    ]
