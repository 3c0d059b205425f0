"""Phi-3-V's image processor and processor, copied into a tiny model folder as
processing_phi3_v.py (loaded by transformers through ``auto_map`` under trust_remote_code).

Written with PIL, numpy and torch (no torchvision), after the hub model's
image_processing_phi3_v.py / processing_phi3_v.py, with what vLLM's ``Phi3VForCausalLM`` uses:

* the HD transform: the image (transposed when portrait) is resized so that its width is
  ``scale * 336`` with ``scale * ceil(scale / ratio) <= num_crops``, then padded with white to a
  height that is a multiple of 336 (centred); it is cut into 336x336 crops, and a global view
  (the whole image resized to 336x336, bicubic) goes first;
* ``pixel_values``: (images, num_crops + 1, 3, 336, 336), zero-padded crops, CLIP mean/std;
  ``image_sizes``: (images, 2) as (height, width) after the transform;
* ``calc_num_image_tokens_from_image_size``: ``(h/336 * w/336 + 1) * 144 + 1 + (h/336 + 1) * 12``,
  the count vLLM puts in the prompt for an image;
* ``img_tokens``: the ``<|image_i|>`` placeholders a prompt carries, one per image.

Runs inside transformers (the vLLM venv), never in vlmhub: its libraries are reached through
importlib so that this file type-checks without them.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

_np: Any = importlib.import_module("numpy")
_torch: Any = importlib.import_module("torch")
_Image: Any = importlib.import_module("PIL.Image")
_transformers: Any = importlib.import_module("transformers")
_ImageProcessingMixin: Any = importlib.import_module(
    "transformers.image_processing_base"
).ImageProcessingMixin

CROP = 336
TOKENS_PER_CROP = 144  # 24x24 CLIP patches, merged 2x2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_IMAGES = 64
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int, int]:
    """(resized width, resized height, padded height) of the HD transform, in the transposed
    frame where width >= height."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP
    new_h = max(1, int(new_w / ratio))
    return new_w, new_h, math.ceil(new_h / CROP) * CROP


def transformed_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of an image after the HD transform."""
    if width < height:
        h, _, w = hd_size(height, width, num_crops)
        return w, h
    w, _, h = hd_size(width, height, num_crops)
    return w, h


class Phi3VImagesKwargs:
    """The keyword arguments ``from_pretrained`` may override (transformers reads the names)."""

    num_crops: int
    num_img_tokens: int


class Phi3VImageProcessor(_ImageProcessingMixin):  # type: ignore[misc]
    model_input_names = ["pixel_values", "image_sizes"]  # noqa: RUF012
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 4,
        num_img_tokens: int = TOKENS_PER_CROP,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean or CLIP_MEAN)
        self.image_std = list(image_std or CLIP_STD)

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, num_crops: int | None = None
    ) -> int:
        w, h = transformed_size(width, height, num_crops or self.num_crops)
        return (h // CROP * (w // CROP) + 1) * TOKENS_PER_CROP + 1 + (h // CROP + 1) * 12

    def _hd_image(self, image: Any, num_crops: int) -> Any:
        img = image.convert("RGB")
        transposed = img.width < img.height
        if transposed:
            img = img.transpose(_Image.Transpose.TRANSPOSE)
        new_w, new_h, padded_h = hd_size(img.width, img.height, num_crops)
        img = img.resize((new_w, new_h), _Image.Resampling.BILINEAR)
        canvas = _Image.new("RGB", (new_w, padded_h), (255, 255, 255))
        canvas.paste(img, (0, (padded_h - new_h) // 2))
        return canvas.transpose(_Image.Transpose.TRANSPOSE) if transposed else canvas

    def _crops(self, image: Any, num_crops: int) -> tuple[Any, list[int]]:
        hd = self._hd_image(image, num_crops)
        array = _np.asarray(hd, dtype=_np.float32) / 255.0
        tensor = _torch.from_numpy(array).permute(2, 0, 1)
        mean = _torch.tensor(self.image_mean).view(3, 1, 1)
        std = _torch.tensor(self.image_std).view(3, 1, 1)
        tensor = (tensor - mean) / std
        _, h, w = tensor.shape
        glb = _torch.nn.functional.interpolate(
            tensor.unsqueeze(0), size=(CROP, CROP), mode="bicubic", align_corners=False
        )
        subs = (
            tensor.reshape(3, h // CROP, CROP, w // CROP, CROP)
            .permute(1, 3, 0, 2, 4)
            .reshape(-1, 3, CROP, CROP)
        )
        crops = _torch.cat([glb, subs], dim=0)
        pad = num_crops + 1 - crops.shape[0]
        if pad > 0:
            crops = _torch.cat([crops, crops.new_zeros(pad, 3, CROP, CROP)], dim=0)
        return crops, [h, w]

    def preprocess(
        self,
        images: Any,
        num_crops: int | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        crops_n = int(num_crops or self.num_crops)
        if not isinstance(images, (list, tuple)):
            images = [images]
        results = [self._crops(image, crops_n) for image in images]
        pixel_values = _torch.stack([crops for crops, _ in results])
        image_sizes = _torch.tensor([size for _, size in results], dtype=_torch.long)
        num_img_tokens = [
            self.calc_num_image_tokens_from_image_size(w, h, crops_n)
            for image in images
            for w, h in [image.size]
        ]
        return _transformers.BatchFeature(
            {
                "pixel_values": pixel_values,
                "image_sizes": image_sizes,
                "num_img_tokens": num_img_tokens,
            },
            tensor_type=return_tensors,
        )

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        return self.preprocess(images, **kwargs)


class Phi3VProcessor(_transformers.ProcessorMixin):  # type: ignore[misc]
    """Images through :class:`Phi3VImageProcessor`; text through the tokenizer, where each
    ``<|image_i|>`` becomes that image's token count of ``-i`` (the hub processor's format)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.img_tokens = [f"<|image_{i}|>" for i in range(1, MAX_IMAGES + 1)]
        self.num_img_tokens = image_processor.num_img_tokens

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return int(self.image_processor.calc_num_image_tokens_from_image_size(width, height))

    def __call__(
        self,
        text: Any = None,
        images: Any = None,
        num_crops: int | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        data: dict[str, Any] = {}
        counts: list[int] = []
        if images is not None:
            image_inputs = self.image_processor(images, num_crops=num_crops, return_tensors="pt")
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
            counts = list(image_inputs["num_img_tokens"])
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            data["input_ids"] = [self._ids_with_placeholders(t, counts) for t in texts]
            if return_tensors == "pt" and len({len(ids) for ids in data["input_ids"]}) == 1:
                data["input_ids"] = _torch.tensor(data["input_ids"], dtype=_torch.long)
        return _transformers.BatchFeature(data)

    def _ids_with_placeholders(self, text: str, counts: list[int]) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in IMAGE_TAG.finditer(text):
            ids += self.tokenizer(text[pos : m.start()], add_special_tokens=False).input_ids
            index = int(m.group(1))
            if not 1 <= index <= len(counts):
                raise ValueError(f"{m.group(0)} but {len(counts)} image(s) were given")
            ids += [-index] * counts[index - 1]
            pos = m.end()
        ids += self.tokenizer(text[pos:], add_special_tokens=False).input_ids
        return ids
