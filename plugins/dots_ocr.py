"""dots.ocr (rednote-hilab/dots.ocr): layout-aware OCR, the model vlmhub started from.

Numbers: vllm-notes.md (3.04B params, ~5.67 GiB BF16, 28 layers x 2 KV heads x 128 = 28 KiB
of KV per token). One page at dots.ocr's MAX_PIXELS (11,289,600, factor 28) is up to 14,400
visual tokens, so max_model_len is chosen with the pixel cap: 14,400 + 8,192 output < 24,576.
The seed's ``--max-model-len 1024`` could not hold a page. Most of the activation peak is the
42-layer vision tower run on the largest page vLLM profiles (57,600 patches at 1,536 wide):
``vision_activation_gib`` scales with the pixel cap. Floors for ``together``: one sequence,
pages down to ~2 Mpx (an A4 page at 150 dpi), always 8,192 tokens of output.
"""

from __future__ import annotations

from vlmhub.ocr.layout import layout_to_markdown
from vlmhub.spec import (
    Floors,
    ModelSpec,
    PromptPreset,
    Variant,
    VisionLimits,
    VllmOptions,
    VramModel,
)

_CATEGORIES = (
    "['Caption', 'Footnote', 'Formula', 'List-item', 'Page-footer', 'Page-header', "
    "'Picture', 'Section-header', 'Table', 'Text', 'Title']"
)
LAYOUT_ALL = (
    "Please output the layout information from the PDF image, including each layout "
    "element's bbox, its category, and the corresponding text content within the bbox.\n\n"
    "1. Bbox format: [x1, y1, x2, y2]\n\n"
    f"2. Layout Categories: The possible categories are {_CATEGORIES}.\n\n"
    "3. Text Extraction & Formatting Rules:\n"
    "    - Picture: For the 'Picture' category, the text field should be omitted.\n"
    "    - Formula: Format its text as LaTeX.\n"
    "    - Table: Format its text as HTML.\n"
    "    - All Others (Text, Title, etc.): Format their text as Markdown.\n\n"
    "4. Constraints:\n"
    "    - The output text must be the original text from the image, with no translation.\n"
    "    - All layout elements must be sorted according to human reading order.\n\n"
    "5. Final Output: The entire output must be a single JSON object.\n"
)
LAYOUT_ONLY = (
    "Please output the layout information from this PDF image, including each layout's bbox "
    "and its category. The bbox should be in the format [x1, y1, x2, y2]. The layout "
    f"categories for the PDF document include {_CATEGORIES}. Do not output the corresponding "
    "text. The layout result should be in JSON format."
)


class DotsOcrSpec(ModelSpec):
    """dots.ocr's one behaviour hook: layout JSON becomes Markdown."""

    def postprocess(self, text: str, preset: str | None = None) -> str:
        if preset == "layout":
            return layout_to_markdown(text)
        return text


def plugin() -> ModelSpec:
    return DotsOcrSpec(
        name="dots-ocr",
        description="dots.ocr 1.7B: multilingual layout + OCR (tables as HTML, formulas as LaTeX)",
        aliases=["dots.ocr", "rednote-hilab/dots.ocr"],
        hf_repo="rednote-hilab/dots.ocr",
        image="vllm/vllm-openai:v0.32.0",
        vllm_version="0.11.0",
        validated_vllm="0.32.0",
        capabilities=["chat", "vision", "ocr"],
        options=VllmOptions(
            max_model_len=24576,
            max_num_seqs=4,
            dtype="bfloat16",
            trust_remote_code=True,
            enforce_eager=True,
            async_scheduling=True,
            chat_template_content_format="string",
            limit_mm_per_prompt={"image": 1},
            mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 11289600},
        ),
        vision=VisionLimits(max_pixels=11289600, patch_factor=28, min_output_tokens=8192),
        vram=VramModel(
            weights_gib=5.67,
            layers=28,
            kv_heads=2,
            head_dim=128,
            activation_gib=1.5,
            vision_activation_gib=1.2,
            kv_sequences=2,
        ),
        floors=Floors(max_num_seqs=1, max_pixels=2007040),
        reload_cost_s=120.0,
        presets={
            "layout": PromptPreset(
                prompt=LAYOUT_ALL,
                description="layout JSON (bbox, category, text) -> Markdown",
                temperature=0.1,
                top_p=0.9,
                max_tokens=8192,
                output="markdown",
            ),
            "layout-only": PromptPreset(
                prompt=LAYOUT_ONLY,
                description="bboxes and categories only",
                temperature=0.1,
                top_p=0.9,
                max_tokens=4096,
                output="json",
            ),
            "ocr": PromptPreset(
                prompt="Extract the text content from this image.",
                description="plain text without page headers and footers",
                temperature=0.1,
                top_p=0.9,
                max_tokens=8192,
            ),
            "grounding": PromptPreset(
                prompt="Extract text from the given bounding box on the image "
                "(format: [x1, y1, x2, y2]).\nBounding Box:\n",
                description="the text inside a bbox: append [x1, y1, x2, y2]",
                temperature=0.1,
                top_p=0.9,
                max_tokens=2048,
            ),
        },
        default_preset="layout",
        variants={
            "fp8-kv": Variant(
                description="FP8 KV cache: half the KV memory (14 KiB/token), more pages at once",
                options={"kv_cache_dtype": "fp8"},
                vram={"kv_dtype_bytes": 1},
            ),
            # No FP8 or AWQ dots.ocr checkpoint is published by rednote-hilab; vLLM 0.32
            # quantizes the official BF16 weights at load (``fp8_per_tensor``, layer by layer
            # on the meta device, so no BF16 peak; Marlin W8A16 kernels before Ada).
            # https://docs.vllm.ai/en/stable/features/quantization/online/
            "fp8": Variant(
                description="FP8 weights quantized by vLLM at load (~3.6 GiB instead of 5.67)",
                options={"quantization": "fp8_per_tensor"},
                vram={"weights_gib": 3.6},
            ),
        },
    )
