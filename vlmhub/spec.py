"""What a model plugin declares: :class:`ModelSpec` and its parts.

A spec is plain, validated data (pydantic, ``extra="forbid"``). A plugin may subclass
:class:`ModelSpec` to add the one optional behaviour hook, :meth:`ModelSpec.postprocess`
(for example dots.ocr's layout JSON to Markdown). Everything here is pure and does no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GIB = 1024**3
KIB = 1024
DEFAULT_MIN_MODEL_LEN = 2048
"""The lowest max_model_len a planner picks for a model that declares no floor nor vision."""

Capability = Literal["chat", "completion", "vision", "ocr", "embedding"]
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")


class Strict(BaseModel):
    """Base for every schema: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.11.2"`` -> ``(0, 11, 2)``; a suffix such as ``rc1`` or ``+cpu`` is ignored."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _default_caps() -> list[Capability]:
    return ["chat", "vision"]


class PromptPreset(Strict):
    """A named prompt: the text sent with an image, and the sampling settings it wants."""

    prompt: str
    description: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    output: Literal["text", "json", "markdown"] = "text"


class VisionLimits(Strict):
    """How many tokens one image may take, so that max_model_len can be chosen with it.

    ``max_pixels / patch_factor**2`` tokens per image at most (dots.ocr and Qwen-VL use 28).
    """

    max_pixels: int = Field(gt=0)
    patch_factor: int = Field(default=28, gt=0)
    max_images: int = Field(default=1, ge=1)
    min_output_tokens: int = Field(default=1024, ge=1)

    @property
    def max_image_tokens(self) -> int:
        return -(-self.max_pixels // (self.patch_factor**2))

    @property
    def min_model_len(self) -> int:
        """The smallest context that holds every image at its largest plus the output."""
        return self.max_images * self.max_image_tokens + self.min_output_tokens


class VramModel(Strict):
    """What one engine instance costs in GPU memory (GiB unless named otherwise).

    Give ``kv_bytes_per_token`` directly, or ``layers``, ``kv_heads`` and ``head_dim`` to
    derive it as ``2 * layers * kv_heads * head_dim * kv_dtype_bytes``.
    """

    weights_gib: float = Field(gt=0)
    kv_bytes_per_token: int | None = Field(default=None, gt=0)
    layers: int | None = Field(default=None, gt=0)
    kv_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    kv_dtype_bytes: int = Field(default=2, gt=0)
    activation_gib: float = Field(default=1.0, ge=0)
    non_torch_gib: float = Field(default=0.2, ge=0)
    cuda_graph_gib: float = Field(default=0.5, ge=0)
    cuda_context_gib: float = Field(default=0.5, ge=0)
    kv_sequences: float = Field(
        default=1.0,
        gt=0,
        description="How many full-length sequences the KV cache must hold at once.",
    )
    sleep_residual_gib: float = Field(
        default=1.25, ge=0, description="What a sleeping instance keeps on the GPU."
    )
    vision_activation_gib: float = Field(
        default=0.0,
        ge=0,
        description="The part of activation_gib that is the vision encoder's profile run at "
        "vision.max_pixels (vLLM profiles the largest image); it scales with the pixel cap.",
    )

    @model_validator(mode="after")
    def _kv_known(self) -> VramModel:
        if self.kv_bytes_per_token is None and None in (self.layers, self.kv_heads, self.head_dim):
            raise ValueError(
                "give kv_bytes_per_token, or all of layers, kv_heads and head_dim to derive it"
            )
        if self.vision_activation_gib > self.activation_gib:
            raise ValueError("vision_activation_gib is a part of activation_gib: make it smaller")
        return self

    @property
    def kv_per_token(self) -> int:
        if self.kv_bytes_per_token is not None:
            return self.kv_bytes_per_token
        assert self.layers and self.kv_heads and self.head_dim
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes


class VllmOptions(Strict):
    """Typed vLLM engine options. Memory flags are not here: the planner renders them."""

    max_model_len: int = Field(gt=0)
    max_num_seqs: int | None = Field(default=8, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half"] | None = None
    quantization: str | None = None
    trust_remote_code: bool = False
    enforce_eager: bool = False
    limit_mm_per_prompt: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_content_format: Literal["auto", "string", "openai"] | None = None
    kv_cache_dtype: str | None = None
    async_scheduling: bool = False
    enable_log_requests: bool | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    """``--tensor-parallel-size``: the engine spans this many GPUs, each holding its share
    (docs/vram.md, "Tensor parallelism"). models.yaml's ``tensor_parallel_size`` sets it."""
    extra_args: list[str] = Field(default_factory=list)


class Floors(Strict):
    """How far a planner may lower this model's settings to fit it beside others
    (``together`` in models.yaml). ``max_model_len`` None means: what ``vision`` needs for
    one full input plus ``min_output_tokens`` (a full page of output for an OCR model), or
    2,048 tokens without ``vision``; ``max_pixels`` None means the image cap is not lowered."""

    max_num_seqs: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, gt=0)
    max_pixels: int | None = Field(default=None, gt=0)


class Variant(Strict):
    """A named alternative (size or quantization) of a model; its fields override the base."""

    description: str = ""
    hf_repo: str | None = None
    revision: str | None = None
    image: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    vram: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Strict):
    """Everything vlmhub needs to launch, size and talk to one model."""

    name: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    hf_repo: str
    revision: str | None = None
    served_model_name: str | None = None
    image: str = "vllm/vllm-openai:v0.32.0"
    vllm_version: str = Field(default="0.11.0", description="Minimum vLLM version the flags need.")
    validated_vllm: str | None = Field(
        default=None, description="The vLLM version whose parser accepted this spec's argv."
    )
    options: VllmOptions
    vram: VramModel
    vision: VisionLimits | None = None
    env: dict[str, str] = Field(default_factory=dict)
    health_path: str = "/health"
    startup_timeout_s: float = Field(default=900.0, gt=0)
    reload_cost_s: float = Field(default=60.0, gt=0, description="Expected cold-start seconds.")
    sleep_min_vllm: str = "0.10.0"
    capabilities: list[Capability] = Field(default_factory=lambda: _default_caps())
    presets: dict[str, PromptPreset] = Field(default_factory=dict)
    default_preset: str | None = None
    variants: dict[str, Variant] = Field(default_factory=dict)
    variant: str | None = Field(default=None, description="Set when this spec is a variant.")
    floors: Floors = Field(default_factory=Floors)

    @field_validator("name")
    @classmethod
    def _name_slug(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a model name: use lower-case letters, digits, . _ -")
        return v

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, v: str) -> str:
        tail = v.rsplit("/", 1)[-1]
        if "@sha256:" in v:
            return v
        if ":" not in tail or tail.endswith(":latest"):
            raise ValueError(f"image {v!r} is not pinned: name a tested tag, never 'latest'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.vision is not None and self.options.max_model_len < self.vision.min_model_len:
            v = self.vision
            raise ValueError(
                f"max_model_len {self.options.max_model_len} cannot hold one full page: "
                f"{v.max_images} image(s) of up to {v.max_image_tokens} tokens "
                f"(max_pixels {v.max_pixels}) plus {v.min_output_tokens} output tokens need "
                f"{v.min_model_len}; raise max_model_len or lower max_pixels"
            )
        if self.default_preset is not None and self.default_preset not in self.presets:
            raise ValueError(f"default_preset {self.default_preset!r} is not in presets")
        return self

    @property
    def api_name(self) -> str:
        """The name the engine serves (``--served-model-name``)."""
        return self.served_model_name or self.name

    @property
    def image_tag(self) -> str:
        return self.image.rsplit(":", 1)[-1]

    def has_vllm(self, version: str) -> bool:
        """Whether this spec's minimum vLLM version is at least ``version``."""
        return version_tuple(self.vllm_version) >= version_tuple(version)

    def with_variant(self, variant: str) -> ModelSpec:
        """Return this spec with one of its variants applied (a new, validated spec)."""
        if variant not in self.variants:
            known = ", ".join(sorted(self.variants)) or "none"
            raise KeyError(f"{self.name} has no variant {variant!r} (variants: {known})")
        v = self.variants[variant]
        data = self.model_dump()
        for key in ("hf_repo", "revision", "image"):
            if getattr(v, key) is not None:
                data[key] = getattr(v, key)
        data["options"] = {**data["options"], **v.options}
        data["vram"] = {**data["vram"], **v.vram}
        data["variant"] = variant
        data["variants"] = {}
        return type(self).model_validate(data)

    def with_overrides(self, **options: Any) -> ModelSpec:
        """Return this spec with some vLLM options replaced (``None`` values are ignored)."""
        changed = {k: v for k, v in options.items() if v is not None}
        if not changed:
            return self
        data = self.model_dump()
        data["options"] = {**data["options"], **changed}
        return type(self).model_validate(data)

    @property
    def max_pixels(self) -> int | None:
        """The image cap the engine profiles with (``vision.max_pixels``), if declared."""
        return self.vision.max_pixels if self.vision is not None else None

    def min_model_len_at(self, max_pixels: int | None) -> int:
        """The smallest max_model_len allowed with images capped at ``max_pixels``."""
        need = self.floors.max_model_len or (1 if self.vision else DEFAULT_MIN_MODEL_LEN)
        if self.vision is not None:
            v = self.vision
            pixels = max_pixels or v.max_pixels
            need = max(need, v.max_images * -(-pixels // v.patch_factor**2) + v.min_output_tokens)
        return need

    def with_caps(
        self,
        *,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        max_pixels: int | None = None,
    ) -> ModelSpec:
        """This spec with lower engine settings (``None`` keeps one). A pixel cap also goes to
        ``mm_processor_kwargs`` and scales ``vision_activation_gib`` (and so the activation
        estimate) with the pixels, since vLLM profiles the largest image allowed. A spec
        without ``vision`` gets the cap in ``mm_processor_kwargs`` only."""
        data = self.model_dump()
        options = data["options"]
        if max_num_seqs is not None:
            options["max_num_seqs"] = max_num_seqs
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        if max_pixels is not None:
            kwargs = dict(options.get("mm_processor_kwargs") or {})
            kwargs["max_pixels"] = max_pixels
            if "min_pixels" in kwargs:
                kwargs["min_pixels"] = min(kwargs["min_pixels"], max_pixels)
            options["mm_processor_kwargs"] = kwargs
        if max_pixels is not None and self.vision is not None:
            old = self.vision.max_pixels
            data["vision"]["max_pixels"] = max_pixels
            vram = data["vram"]
            scaled = vram["vision_activation_gib"] * max_pixels / old
            vram["activation_gib"] = max(vram["activation_gib"] - vram["vision_activation_gib"]
                                         + scaled, 0.0)
            vram["vision_activation_gib"] = min(scaled, vram["activation_gib"])
        return type(self).model_validate(data)

    def spec_hash(self) -> str:
        """A short, stable hash of everything that changes the launched engine."""
        data = self.model_dump(mode="json")
        if data["options"]["tensor_parallel_size"] == 1:  # the hashes of engines before it
            del data["options"]["tensor_parallel_size"]
        payload = json.dumps(data, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def postprocess(self, text: str, preset: str | None = None) -> str:
        """Turn an engine answer into the user's output. Plugins may override; pure."""
        return text
