"""What `vlmhub ocr` sends for a page: bit depth, orientation, encoding and size (issue 14,
items 13-15). Real files written by Pillow, sent by the real batch runner to a real HTTP
server on loopback, and decoded again from the request the server received."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from ocr_support import FlakyServer, decode, photo
from PIL import Image, ImageStat

from vlmhub.config.registry import Registry
from vlmhub.ocr.batch import BatchOptions, ocr_batch


def ink_page(mode: str, paper: float, ink: float, size: tuple[int, int] = (300, 200)
             ) -> Image.Image:
    """A page of ``paper`` with a block of ``ink`` in its top-left quarter."""
    img = Image.new(mode, size, paper)  # type: ignore[arg-type]
    img.paste(Image.new(mode, (size[0] // 2, size[1] // 2), ink), (0, 0))  # type: ignore[arg-type]
    return img


async def send(tmp_path: Path, files: list[Path], model: str = "any", **opts: Any
               ) -> tuple[FlakyServer, list[dict[str, Any]]]:
    """OCR ``files`` (in order) through a real server; the server and the manifest lines."""
    fake = FlakyServer()
    out = tmp_path / "out"
    async with fake.serve() as url:
        summary = await ocr_batch(files, BatchOptions(model=model, out_dir=out, base_url=url,
                                                      concurrency=1, **opts))
    assert summary.count("ok") == len(files), summary.results
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return fake, lines


async def test_16_bit_32_bit_and_float_greyscale_keep_their_contrast(tmp_path: Path) -> None:
    """A 16-bit scan used to be clipped at 255 by convert("RGB"): a blank white page."""
    pages = {
        "scan16.png": ink_page("I;16", 60000, 3000),  # 16-bit PNG: paper 60000, ink 3000
        "scan16.tif": ink_page("I;16", 52000, 9000),  # 16-bit TIFF
        "scan12.tif": ink_page("I;16", 4000, 300),  # 12-bit data in a 16-bit file
        "float.tif": ink_page("F", 0.95, 0.05),  # float 0..1
        "int32.tif": ink_page("I", 150000, -20000),  # 32-bit signed, beyond 16 bits
    }
    files = []
    for name, img in pages.items():
        img.save(tmp_path / name)
        files.append(tmp_path / name)
    with Image.open(tmp_path / "scan16.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    fake, lines = await send(tmp_path, files)
    for i, name in enumerate(pages):
        sent = fake.image("any", i)
        assert sent.size == (300, 200) and sent.mode == "L", name
        ink = sent.crop((0, 0, 150, 100))
        paper = sent.crop((150, 100, 300, 200))
        ink_level, paper_level = ImageStat.Stat(ink).mean[0], ImageStat.Stat(paper).mean[0]
        assert ink_level < 40 and paper_level > 200, (name, ink_level, paper_level)
        assert ImageStat.Stat(sent).stddev[0] > 60, name  # the contrast is still there
    # linear, by the type's range: 60000 / 65535 * 255 = 233.5, 3000 / 65535 * 255 = 11.7
    scan16 = fake.image("any", 0)
    assert scan16.getpixel((0, 0)) == 12 and scan16.getpixel((299, 199)) == 233
    assert {(line["name"], line["encoding"]) for line in lines} >= {("scan16-png", "png")}


async def test_exif_orientation_is_applied_before_sending(tmp_path: Path) -> None:
    """A phone photo stored landscape with orientation 6 (turn 90 degrees clockwise to view)
    must be sent upright: portrait, its left (dark) half at the top."""
    img = Image.new("RGB", (400, 200), "white")
    img.paste((0, 0, 0), (0, 0, 200, 200))  # the left half dark
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    tiff = ink_page("L", 255, 0, (400, 200))  # a TIFF with orientation 8 (90 degrees anti)
    tiff.save(tmp_path / "scan.tif", tiffinfo={0x0112: 8})
    fake, lines = await send(tmp_path, [tmp_path / "phone.jpg", tmp_path / "scan.tif"])
    phone = fake.image("any", 0)
    assert phone.size == (200, 400)
    top = ImageStat.Stat(phone.convert("L").crop((0, 0, 200, 190))).mean[0]
    bottom = ImageStat.Stat(phone.convert("L").crop((0, 210, 200, 400))).mean[0]
    assert top < 30 and bottom > 225, (top, bottom)
    assert (lines[0]["width"], lines[0]["height"]) == (200, 400)
    assert lines[0]["encoding"] != "original"  # turned, so re-encoded
    scan = fake.image("any", 1)  # ink top-left, turned anticlockwise: bottom-left
    assert scan.size == (200, 400)
    assert scan.getpixel((50, 350)) == 0 and scan.getpixel((50, 50)) == 255


async def test_jpeg_kept_as_is_and_encoding_chosen_by_size(tmp_path: Path) -> None:
    """A JPEG that needs no change is sent byte for byte; otherwise PNG for line art and
    JPEG for a photo whose PNG would be large."""
    photo(800, 600).save(tmp_path / "camera.jpg", quality=85)
    photo(640, 480).convert("L").save(tmp_path / "grey.jpg", quality=85)
    photo(300, 200).convert("CMYK").save(tmp_path / "print.jpg", quality=85)
    photo(1500, 1000).save(tmp_path / "big-photo.png")
    ink_page("RGB", 255, 0, (1500, 1000)).save(tmp_path / "line-art.png")
    files = [tmp_path / n for n in ("camera.jpg", "grey.jpg", "print.jpg", "big-photo.png",
                                    "line-art.png")]
    fake, lines = await send(tmp_path, files)
    encodings = {line["name"]: line["encoding"] for line in lines}
    assert encodings == {"camera": "original", "grey": "original", "print": "png",
                         "big-photo": "jpeg", "line-art": "png"}
    for i in (0, 1):  # the file's own bytes
        header, data = fake.image_url("any", i).split(",", 1)
        assert header == "data:image/jpeg;base64"
        assert base64.b64decode(data) == files[i].read_bytes()
    big = fake.image("any", 3)
    assert (big.format, big.size) == ("JPEG", (1500, 1000))
    assert len(fake.image_url("any", 3)) < 0.4 * files[3].stat().st_size  # not a 5x PNG
    assert decode(fake.image_url("any", 4)).format == "PNG"
    assert decode(fake.image_url("any", 2)).mode == "RGB"  # CMYK converted


async def test_max_pixels_default_cap_and_option(tmp_path: Path) -> None:
    """A model without a pixel cap gets dots.ocr's 11,289,600; --max-pixels lowers any cap
    and never raises a model's own."""
    Image.new("L", (4000, 3000), 255).save(tmp_path / "huge.png")  # 12 MP
    Image.new("L", (1200, 1000), 255).save(tmp_path / "page.png")  # 1.2 MP
    _, lines = await send(tmp_path, [tmp_path / "huge.png"])
    assert lines[0]["width"] * lines[0]["height"] <= 11_289_600
    assert lines[0]["width"] * lines[0]["height"] > 11_000_000
    _, lines = await send(tmp_path / "opt", [tmp_path / "page.png"], max_pixels=500_000,
                          force=True)
    assert 490_000 < lines[0]["width"] * lines[0]["height"] <= 500_000
    dots = Registry().specs()["dots-ocr"]
    assert dots.vision is not None
    capped = dots.model_copy(update={"vision": dots.vision.model_copy(
        update={"max_pixels": 200_000})})
    fake = FlakyServer()
    async with fake.serve() as url:
        await ocr_batch([tmp_path / "page.png"], BatchOptions(
            model="capped", out_dir=tmp_path / "capped", base_url=url, max_pixels=900_000),
            capped)
    w, h = fake.image("capped").size
    assert 190_000 < w * h <= 200_000


@pytest.mark.parametrize("limit", [300_000, 60_000])
async def test_pages_are_made_to_fit_a_known_body_limit(tmp_path: Path, limit: int) -> None:
    """With the router's body limit known (from the config), every request fits at once."""
    photo(1500, 1000).save(tmp_path / "photo.png")
    photo(900, 700).save(tmp_path / "camera.jpg", quality=95)
    fake, lines = await send(tmp_path, [tmp_path / "photo.png", tmp_path / "camera.jpg"],
                             max_body_bytes=limit)
    for i, line in enumerate(lines):
        body = json.dumps(fake.bodies["any"][i]).encode()
        assert len(body) <= limit and line["attempts"] == 1
        assert line["encoding"] == "jpeg" and line["width"] < 1500
        sent = fake.image("any", i)
        assert sent.size == (line["width"], line["height"])
        assert abs(sent.width / sent.height - (1500 / 1000 if i == 0 else 900 / 700)) < 0.02


def test_a_limit_too_small_for_any_page_is_a_clear_error(tmp_path: Path) -> None:
    from vlmhub.errors import VlmhubError
    from vlmhub.ocr.images import prepare

    with pytest.raises(VlmhubError, match=r"does not fit in 500 bytes.*router\.max_body_mb"):
        prepare(photo(600, 400), None, max_bytes=500)
    small = prepare(photo(600, 400), None, max_bytes=40_000)
    assert len(small.data_url) <= 40_000 and small.downscaled
    with Image.open(io.BytesIO(base64.b64decode(small.data_url.split(",", 1)[1]))) as sent:
        assert sent.size == (small.width, small.height)
