"""The image-size trap: does a vision model's largest input fit its ``max_model_len``?

A Qwen-VL-style processor (Qwen2/2.5/3-VL, dots.ocr) resizes an image to at most
``max_pixels`` and turns every ``patch_factor x patch_factor`` square into one token, so one
image takes up to ``max_pixels / patch_factor**2`` tokens. vLLM does not check this when it
starts (on a CPU it does not even profile the largest image): a request whose image does not
fit is answered ``400 Input length (1095) exceeds model's maximum context length (1024).``
(seen with a Qwen2-VL at the checkpoint's own pixel limit and ``--max-model-len 1024``).

:func:`context_need` counts the largest input the engine will accept: every image it allows
(``limit_mm_per_prompt``, else ``vision.max_images``) at the pixel cap it is given
(``mm_processor_kwargs.max_pixels``: what the engine really uses), the longest preset prompt
(estimated, no tokenizer) and the plugin's output reserve (``vision.min_output_tokens``).
``vlmhub config check`` and ``vlmhub plan`` refuse a model for which it does not fit, with the
numbers and the fix (:meth:`ContextNeed.problem`). :func:`advise_context_error` adds the same
fix to vLLM's 400 when a request meets the trap anyway (a model without ``vision`` limits).

Pure functions; nothing here blocks or does I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vlmhub.spec import ModelSpec

TEMPLATE_TOKENS = 32
"""Tokens the chat template and the image's start/end markers add around a prompt."""
BYTES_PER_TOKEN = 3
"""A prompt's tokens are estimated as its UTF-8 bytes / 3 (English BPE averages ~4)."""
SHORT_PROMPT_TOKENS = 64
"""The prompt allowance of a model without presets (a short question)."""
CONTEXT_ERROR = re.compile(
    rb"Input length \((\d+)\) exceeds model's maximum context length \((\d+)\)"
    rb"|maximum context length is (\d+) tokens\. However, your prompt contains"
)
"""vLLM 0.32's 400s for an input longer than max_model_len: api_utils.get_max_tokens, and the
renderer's (renderers/params.py). Not older releases' "you requested N tokens (X in the
messages, Y in the completion)", whose fix may be a smaller max_tokens."""


@dataclass(frozen=True)
class ContextNeed:
    """The largest input one request may bring, against the context it has."""

    max_model_len: int
    images: int
    image_tokens: int
    """Tokens of one image at the engine's pixel cap."""
    max_pixels: int
    """``mm_processor_kwargs.max_pixels`` (what the engine uses), else ``vision.max_pixels``."""
    patch_factor: int
    prompt_tokens: int
    output_tokens: int
    floor_pixels: int | None = None
    """The plugin's lowest sensible cap (``floors.max_pixels``): no fix goes below it."""

    @property
    def need(self) -> int:
        return self.images * self.image_tokens + self.prompt_tokens + self.output_tokens

    @property
    def fits(self) -> bool:
        return self.need <= self.max_model_len

    @property
    def fitting_max_pixels(self) -> int | None:
        """The largest pixel cap (a whole number of patches) at which the input fits the
        current max_model_len, or None when it would be below the plugin's floor (or below
        one patch per image)."""
        room = self.max_model_len - self.prompt_tokens - self.output_tokens
        cap = room // self.images * self.patch_factor**2
        return cap if cap >= max(self.floor_pixels or 1, 1) else None

    def problem(self, name: str) -> tuple[str, str]:
        """(what is wrong, the fix) for models.yaml's ``models.<name>``."""
        cap = self.fitting_max_pixels
        lower = (f" or set max_pixels: {cap} (an image then takes at most "
                 f"{cap // self.patch_factor**2} tokens)") if cap else ""
        return (
            f"max_model_len {self.max_model_len} cannot hold the largest input: "
            f"{self.images} image(s) of up to {self.image_tokens} tokens (max_pixels "
            f"{self.max_pixels} / {self.patch_factor}x{self.patch_factor} pixels per token) + "
            f"~{self.prompt_tokens} prompt tokens + {self.output_tokens} output tokens = "
            f"{self.need}; vLLM would answer such a request 400 \"exceeds model's maximum "
            "context length\"",
            f"raise max_model_len to at least {self.need}{lower} under models.{name}",
        )


def prompt_tokens(spec: ModelSpec) -> int:
    """A generous estimate of the longest preset prompt in tokens, chat template included."""
    longest = max((len(p.prompt.encode()) for p in spec.presets.values()), default=0)
    text = -(-longest // BYTES_PER_TOKEN) if longest else SHORT_PROMPT_TOKENS
    return text + TEMPLATE_TOKENS


def context_need(spec: ModelSpec) -> ContextNeed | None:
    """The largest input of ``spec`` at the settings its engine gets; None for a model that
    declares no ``vision`` limits (its image tokens are unknown)."""
    v = spec.vision
    if v is None:
        return None
    o = spec.options
    kwargs = o.mm_processor_kwargs or {}
    engine_cap = kwargs.get("max_pixels")
    engine_cap = int(engine_cap) if isinstance(engine_cap, (int, float)) else None
    pixels = engine_cap or v.max_pixels
    limit = (o.limit_mm_per_prompt or {}).get("image")
    images = int(limit) if isinstance(limit, int) and limit > 0 else v.max_images
    return ContextNeed(
        max_model_len=o.max_model_len,
        images=images,
        image_tokens=-(-pixels // v.patch_factor**2),
        max_pixels=pixels,
        patch_factor=v.patch_factor,
        prompt_tokens=prompt_tokens(spec),
        output_tokens=v.min_output_tokens,
        floor_pixels=spec.floors.max_pixels,
    )


def context_problem(spec: ModelSpec) -> ContextNeed | None:
    """:func:`context_need` when the largest input does not fit, else None."""
    need = context_need(spec)
    return need if need is not None and not need.fits else None


def runtime_advice(model: str, message: str) -> str | None:
    """The fix to append to vLLM's "exceeds model's maximum context length" message, or
    None when ``message`` is another error."""
    m = CONTEXT_ERROR.search(message.encode())
    if m is None:
        return None
    got = f" ({m.group(1).decode()} tokens here)" if m.group(1) else ""
    return (
        f"vlmhub: the prompt and its image(s){got} are longer than model {model!r} can "
        "hold. Fix: send a smaller image or a shorter prompt; or, in models.yaml, raise "
        f"models.{model}.max_model_len, or lower models.{model}.max_pixels so that one image "
        "takes fewer tokens (`vlmhub config check` counts the largest image of a model with "
        "vision limits against max_model_len)."
    )


def advise_context_error(body: bytes, model: str) -> bytes:
    """vLLM's 400 body with :func:`runtime_advice` appended to ``error.message``; any other
    body is returned as is. Cheap for bodies that are not this error (a byte search)."""
    if b"maximum context length" not in body:
        return body
    try:
        data = json.loads(body)
        error = data["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        return body
    advice = runtime_advice(model, message)
    if advice is None or not isinstance(error, dict):
        return body
    error["message"] = f"{message.rstrip()} {advice}"
    return json.dumps(data, ensure_ascii=False).encode()
