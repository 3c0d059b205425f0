"""One decoded page -> the data URL sent: bit depth, orientation, flattening, size, encoding.

* :func:`to_8bit` scales 16-bit, 32-bit and float greyscale to 8 bits (never clipping it at
  255, which turns a 16-bit scan into a white page).
* :func:`upright` applies the EXIF orientation, so a phone photo is not sent sideways.
* :func:`prepare` flattens to RGB or L, downscales to ``max_pixels`` and encodes: a JPEG file
  that needs no change is sent as its own bytes; otherwise PNG, or JPEG quality 90 when the
  PNG would be large; and a page whose data URL is over ``max_bytes`` is re-encoded and
  downscaled until it fits.

Pillow is imported lazily (it is the optional extra ``vlmhub[ocr]``); callers import it
through :func:`vlmhub.ocr.pages.require` first. Everything here blocks (CPU: converting,
resizing, encoding): the batch runner calls it in worker threads. Images are never changed in
place, so a function may be called from several threads on different images.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from vlmhub.errors import VlmhubError

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_MAX_PIXELS = 11_289_600  # dots.ocr's cap (e.g. 2800 x 4032): for models without one
JPEG_QUALITY = 90
PNG_SMALL_BYTES = 2 * 1024 * 1024  # a PNG up to this size is always kept
PNG_MAX_BYTES_PER_PIXEL = 1.0  # a larger PNG is a photo or a colour scan: JPEG instead
MIN_SIDE = 64  # a page is never shrunk below this to fit a body limit
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ORIENTATION = 0x0112  # the EXIF tag
Encoding = Literal["original", "png", "jpeg"]


def depth_range(mode: str, lo: float, hi: float) -> tuple[float, float]:
    """The source values mapped to 0 and 255.

    Values in 0..65535 use the range of the bit depth they fit, 0 .. 2^n - 1 for the smallest
    n of 8, 10, 12, 14, 16 that holds the brightest value: a 16-bit scan keeps its tones
    (0..65535 -> 0..255), a 12-bit one in a 16-bit file is not left dark, and a nearly blank
    page stays nearly blank instead of being stretched into noise. Floats in 0..1 use 0..1.
    Anything else (negative or larger values, 32-bit data) uses its actual minimum and
    maximum."""
    if mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    if lo >= 0 and hi <= 65535:
        bits = next(b for b in (8, 10, 12, 14, 16) if hi < 2**b)
        return 0.0, float(2**bits - 1)
    return lo, hi


def to_8bit(img: Image) -> Image:
    """A mode ``L`` copy of a 16-bit (``I;16``, ``I;16B``, ...), 32-bit (``I``) or float
    (``F``) greyscale image, scaled linearly by :func:`depth_range`, rounded, never clipped.
    Raises VlmhubError for NaN or infinite values."""
    f = img if img.mode == "F" else img.convert("F")
    lo, hi = cast(tuple[float, float], f.getextrema())  # one band: (min, max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise VlmhubError("the image holds values that are not finite numbers (NaN or "
                          "infinity), so it cannot be scaled to 8 bits")
    low, high = depth_range(img.mode, lo, hi)
    scale = 255.0 / (high - low) if high > low else 0.0
    offset = 0.5 - low * scale if high > low else 255.0  # one value only: a blank page
    return f.point(lambda v: v * scale + offset).convert("L")


def upright(img: Image) -> Image:
    """``img`` turned as its EXIF (or TIFF) orientation tag says, or ``img`` itself when it
    has none (or 1, already upright)."""
    if img.getexif().get(ORIENTATION, 1) in (None, 1):
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


def to_rgb(img: Image) -> Image:
    """RGB or L as they are; high bit depths scaled to L (:func:`to_8bit`); bilevel to L;
    transparency flattened onto white; other modes to RGB."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in HIGH_DEPTH_MODES:
        return to_8bit(img)
    if img.mode == "1":
        return img.convert("L")
    from PIL import Image as PILImage

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = PILImage.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def fit_within(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels
    (unchanged when it already fits, or when there is no limit)."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels and (w > 1 or h > 1):  # only for degenerate 1-px-wide pages
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def downscale(img: Image, max_pixels: int | None) -> Image:
    """``img`` resized (Lanczos) to fit ``max_pixels``, or ``img`` itself when it fits."""
    size = fit_within(img.width, img.height, max_pixels)
    if size == (img.width, img.height):
        return img
    from PIL import Image as PILImage

    return img.resize(size, PILImage.Resampling.LANCZOS, reducing_gap=3.0)


def encode(img: Image, fmt: Literal["png", "jpeg"]) -> bytes:
    """``img`` (RGB or L) as PNG, or as JPEG at :data:`JPEG_QUALITY`."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def encode_page(img: Image) -> tuple[bytes, Literal["png", "jpeg"]]:
    """PNG when it is small (at most 2 MiB, or 1 byte per pixel: line art, text, flat
    colour), else JPEG quality 90 when that is smaller (photos, colour scans)."""
    png = encode(img, "png")
    if len(png) <= max(PNG_SMALL_BYTES, PNG_MAX_BYTES_PER_PIXEL * img.width * img.height):
        return png, "png"
    jpeg = encode(img, "jpeg")
    return (jpeg, "jpeg") if len(jpeg) < len(png) else (png, "png")


def data_url(data: bytes, fmt: Literal["png", "jpeg"]) -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def url_size(nbytes: int, fmt: str = "jpeg") -> int:
    """The length of the data URL of ``nbytes`` bytes (base64 plus the header)."""
    return len(f"data:image/{fmt};base64,") + 4 * math.ceil(nbytes / 3)


@dataclass(frozen=True)
class PreparedPage:
    """What is sent for one page, and how it was made."""

    data_url: str
    width: int
    height: int
    source_width: int
    source_height: int
    dpi: int | None
    encoding: Encoding = "png"

    @property
    def downscaled(self) -> bool:
        return (self.width, self.height) != (self.source_width, self.source_height)


def prepare(img: Image, max_pixels: int | None, dpi: int | None = None, *,
            max_bytes: int | None = None, original: bytes | None = None) -> PreparedPage:
    """The page to send: ``original`` (a JPEG file's own bytes, given only when its image
    needs no conversion) as is when it fits ``max_pixels`` and ``max_bytes``; else flattened
    (:func:`to_rgb`), downscaled to ``max_pixels`` and encoded (:func:`encode_page`), then
    as JPEG and smaller until the data URL is at most ``max_bytes`` long. Raises
    VlmhubError when even a page of :data:`MIN_SIDE` px does not fit. Blocks (CPU)."""
    w0, h0 = img.size

    def fits(size: int) -> bool:
        return max_bytes is None or size <= max_bytes

    if (original is not None and fit_within(w0, h0, max_pixels) == (w0, h0)
            and fits(url_size(len(original)))):
        return PreparedPage(data_url(original, "jpeg"), w0, h0, w0, h0, dpi, "original")
    flat, cap = to_rgb(img), max_pixels
    small = downscale(flat, cap)
    data, fmt = encode_page(small)
    if not fits(url_size(len(data), fmt)) and fmt == "png":
        data, fmt = encode(small, "jpeg"), "jpeg"
    while not fits(size := url_size(len(data), fmt)):  # smaller JPEGs until it fits
        assert max_bytes is not None
        cap = math.floor(small.width * small.height * max_bytes / size * 0.9)
        if min(fit_within(small.width, small.height, cap)) < MIN_SIDE:
            raise VlmhubError(
                f"the page does not fit in {max_bytes} bytes even at {small.width}x"
                f"{small.height} px as JPEG. Fix: raise router.max_body_mb in models.yaml")
        small = downscale(flat, cap)
        data = encode(small, "jpeg")
    return PreparedPage(data_url(data, fmt), small.width, small.height, w0, h0, dpi, fmt)
