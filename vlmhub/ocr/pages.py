"""Inputs -> pages -> data URLs, the way dots.ocr's own client prepares them.

* Image files (png, jpg, jpeg, webp, tif/tiff, bmp) are one page each; a multi-frame TIFF is
  one page per frame. Their EXIF orientation is applied (a phone photo is sent upright).
* PDFs are rendered page by page with pypdfium2 at 200 dpi; a page that would be more than
  4500 px on a side at 200 dpi is rendered at 72 dpi instead (dots.ocr's rule).
* Each page then goes through :func:`vlmhub.ocr.images.prepare`: bit depth scaled to 8 bits,
  downscaled to ``max_pixels``, encoded (a JPEG file that needs no change as its own bytes),
  and made to fit ``max_bytes``.

Pillow and pypdfium2 are the optional extra ``vlmhub[ocr]``; they are imported only when a
page is opened, and a missing one raises :class:`~vlmhub.errors.VlmhubError` with the fix.
Every function here blocks (file reads, decoding, rendering, encoding): the batch runner
calls them in worker threads. PDFium is not thread-safe, so :class:`PageRenderer` runs every
pypdfium2 call in one dedicated thread, while Pillow work runs in the default pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlmhub.errors import VlmhubError
from vlmhub.ocr.images import PreparedPage, prepare, to_rgb, upright

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
PDF_SUFFIX = ".pdf"
PDF_DPI = 200
FALLBACK_DPI = 72
MAX_RENDER_SIDE = 4500
INSTALL_HINT = "pip install 'vlmhub[ocr]'"
PageKind = Literal["image", "frames", "pdf"]


def require(module: str) -> Any:
    """Import an optional dependency, or raise a VlmhubError that names the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what = "pypdfium2" if module.startswith("pypdfium2") else "Pillow"
        raise VlmhubError(
            f"OCR of images and PDFs needs {what}, which is not installed. "
            f"Fix: {INSTALL_HINT}"
        ) from None


def is_supported(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix == PDF_SUFFIX


def find_inputs(paths: Iterable[Path]) -> list[Path]:
    """The files to OCR: each file given, and every supported file under each folder given
    (recursively, sorted). Raises VlmhubError for a missing path, an unsupported file named
    explicitly, or when nothing is found. Blocks on listing folders."""
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and is_supported(p))
        elif given.is_file():
            if not is_supported(given):
                kinds = ", ".join(sorted(s[1:] for s in IMAGE_SUFFIXES | {PDF_SUFFIX}))
                raise VlmhubError(f"{given}: not an image or a PDF. Fix: give files of: {kinds}")
            files = [given]
        else:
            raise VlmhubError(f"{given}: no such file or folder")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        raise VlmhubError("no images or PDFs found in the inputs given")
    return found


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """A distinct output name per input: its stem; ``stem-ext`` when stems collide; plus a
    short hash of the path when even that collides (same name in two folders)."""
    stems = Counter(f.stem for f in files)
    names = {f: f.stem if stems[f.stem] == 1 else f"{f.stem}-{f.suffix[1:].lower()}"
             for f in files}
    taken = Counter(names.values())
    for f in files:
        if taken[names[f]] > 1:
            names[f] += "-" + hashlib.sha256(str(f.resolve()).encode()).hexdigest()[:8]
    return names



@dataclass(frozen=True)
class PageRef:
    """One page of one input file. ``index`` is 0-based; ``count`` the pages of the file."""

    path: Path
    index: int
    count: int
    kind: PageKind

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def paged(self) -> bool:
        """Whether output names carry ``-pNNNN`` (PDFs and multi-frame TIFFs)."""
        return self.kind != "image"

    def label(self) -> str:
        return f"{self.path.name} p{self.number}" if self.paged else self.path.name


def list_pages(path: Path) -> list[PageRef]:
    """The pages of one input. Blocks: opens a PDF (or a TIFF) to count its pages."""
    suffix = path.suffix.lower()
    if suffix == PDF_SUFFIX:
        pdfium = require("pypdfium2")
        try:
            doc = pdfium.PdfDocument(str(path))
        except Exception as exc:  # pypdfium2 raises PdfiumError and OSError subclasses
            raise VlmhubError(f"{path}: cannot open the PDF: {exc}") from None
        try:
            count = len(doc)
        finally:
            doc.close()
        return [PageRef(path, i, count, "pdf") for i in range(count)]
    if suffix in (".tif", ".tiff"):
        require("PIL.Image")
        from PIL import Image as PILImage

        try:
            with PILImage.open(path) as img:
                frames = int(getattr(img, "n_frames", 1))
        except Exception as exc:  # a corrupt file: its page fails later with the reason
            raise VlmhubError(f"{path}: cannot read the image: {exc}") from None
        if frames > 1:
            return [PageRef(path, i, frames, "frames") for i in range(frames)]
    return [PageRef(path, 0, 1, "image")]


def render_size(width_pt: float, height_pt: float, dpi: int) -> tuple[int, int]:
    """The bitmap size pypdfium2 renders a page of this size (PDF points) at ``dpi``."""
    scale = dpi / 72
    return math.ceil(width_pt * scale), math.ceil(height_pt * scale)


def pdf_dpi(width_pt: float, height_pt: float) -> int:
    """200 dpi, or 72 when a side would exceed 4500 px at 200 dpi (dots.ocr's rule)."""
    if max(render_size(width_pt, height_pt, PDF_DPI)) > MAX_RENDER_SIDE:
        return FALLBACK_DPI
    return PDF_DPI


def load_image(ref: PageRef) -> tuple[Image, bytes | None]:
    """An image file's page (its frame ``ref.index`` for a multi-frame TIFF), decoded and
    turned upright, plus the file's bytes when it is a JPEG that can be sent as it is (RGB
    or greyscale, already upright), else None."""
    require("PIL.Image")
    from PIL import Image as PILImage

    try:  # a file object, not the path: Pillow 13 mis-turns memory-mapped TIFFs
        with ref.path.open("rb") as fh, PILImage.open(fh) as img:
            if ref.kind == "frames":
                img.seek(ref.index)
            img.load()
            page = upright(img)
            if page is img and ref.kind == "frames":
                page = img.copy()
            keep = (ref.kind == "image" and img.format == "JPEG" and page is img
                    and img.mode in ("RGB", "L"))
            return page, ref.path.read_bytes() if keep else None
    except VlmhubError:
        raise
    except Exception as exc:  # Pillow raises many kinds: the page fails with the reason
        raise VlmhubError(f"{ref.label()}: cannot read the image: {exc}") from None


class PageRenderer:
    """Turns :class:`PageRef` objects into images; owns the one thread PDFium runs in.

    Open PDFs are kept (a few, least recently used first out) so that their pages render
    without reopening the file. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, keep_open: int = 4) -> None:
        self._pdf_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmhub-pdfium")
        self._docs: OrderedDict[Path, Any] = OrderedDict()
        self._keep = max(1, keep_open)
        self._closed = False

    def __enter__(self) -> PageRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render_pdf_page(self, ref: PageRef) -> tuple[Image, int]:
        """Render one PDF page; ``(image, dpi)``. Blocks; call only in the PDFium thread."""
        pdfium = require("pypdfium2")
        doc = self._docs.pop(ref.path, None)
        try:
            if doc is None:
                doc = pdfium.PdfDocument(str(ref.path))
            page = doc[ref.index]
            try:
                dpi = pdf_dpi(*page.get_size())
                img: Image = page.render(scale=dpi / 72).to_pil()
            finally:
                page.close()
        except Exception as exc:  # PdfiumError, OSError, IndexError: this page fails
            if doc is not None:
                doc.close()
            raise VlmhubError(f"{ref.label()}: cannot render the PDF page: {exc}") from None
        self._docs[ref.path] = doc
        while len(self._docs) > self._keep:
            self._docs.popitem(last=False)[1].close()
        return img, dpi

    def load(self, ref: PageRef, max_pixels: int | None,
             max_bytes: int | None = None) -> PreparedPage:
        """Render or read one page and prepare it (see :func:`~vlmhub.ocr.images.prepare`).
        Blocks; PDFs must go through :meth:`aload` (or this must be called from the PDFium
        thread)."""
        if ref.kind == "pdf":
            img, dpi = self.render_pdf_page(ref)
            return prepare(img, max_pixels, dpi, max_bytes=max_bytes)
        img, original = load_image(ref)
        return prepare(img, max_pixels, max_bytes=max_bytes, original=original)

    async def aload(self, ref: PageRef, max_pixels: int | None,
                    max_bytes: int | None = None) -> PreparedPage:
        """:meth:`load` without blocking the event loop: PDF rendering in the PDFium thread
        (one page at a time), decoding, resizing and encoding in the default thread pool
        (concurrent with other pages)."""
        loop = asyncio.get_running_loop()
        if ref.kind == "pdf":
            img, dpi = await loop.run_in_executor(self._pdf_thread, self.render_pdf_page, ref)
            return await asyncio.to_thread(prepare, img, max_pixels, dpi, max_bytes=max_bytes)
        return await asyncio.to_thread(self.load, ref, max_pixels, max_bytes)

    async def aimage(self, ref: PageRef) -> Image:
        """The original page as :meth:`aload` prepares it before any downscaling (upright,
        flattened to RGB or L), without blocking the event loop (as :meth:`aload`)."""
        loop = asyncio.get_running_loop()
        if ref.kind == "pdf":
            img, _ = await loop.run_in_executor(self._pdf_thread, self.render_pdf_page, ref)
        else:
            img, _ = await asyncio.to_thread(load_image, ref)
        return await asyncio.to_thread(to_rgb, img)

    def _close_docs(self) -> None:
        while self._docs:
            self._docs.popitem()[1].close()

    def close(self) -> None:
        """Close the open PDFs (in the PDFium thread) and stop that thread. Blocks."""
        if self._closed:
            return
        self._closed = True
        self._pdf_thread.submit(self._close_docs).result()
        self._pdf_thread.shutdown(wait=True)
