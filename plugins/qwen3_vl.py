"""Qwen3-VL Instruct: the 2B by default, the official 2B and 4B FP8 as variants.

Numbers: vllm-notes.md and docs/vram.md. 2B: 4.27 GB BF16 on disk, but vLLM reports "Model
loading took 4.4570 GiB" for it (vllm-project/vllm#27706), so 4.46 GiB; 28 layers x 8 KV
heads x 128 = 112 KiB per token. 2B FP8 (block-128 FP8 on the language model's linear layers,
vision tower and embeddings in BF16): ~3.15 GiB, the vLLM figure less the 1.41 B linear
weights' second byte. 4B FP8: ~5 GB, 36 layers -> 144 KiB. The default max length is 262,144
and one image may take 16,384 tokens: both are capped here. The 8B (~17.5 GB BF16) does not
fit a 12 GB card. Floors for ``together``: one sequence, images down to 896x896.
"""

from __future__ import annotations

from vlmhub.spec import (
    Floors,
    ModelSpec,
    PromptPreset,
    Variant,
    VisionLimits,
    VllmOptions,
    VramModel,
)


def plugin() -> ModelSpec:
    return ModelSpec(
        name="qwen3-vl",
        description="Qwen3-VL 2B Instruct: general vision chat and OCR",
        aliases=["qwen3-vl-2b"],
        hf_repo="Qwen/Qwen3-VL-2B-Instruct",
        image="vllm/vllm-openai:v0.32.0",
        vllm_version="0.11.0",
        validated_vllm="0.32.0",
        capabilities=["chat", "vision", "ocr"],
        options=VllmOptions(
            max_model_len=16384,
            max_num_seqs=4,
            dtype="bfloat16",
            limit_mm_per_prompt={"image": 2, "video": 0},
            mm_processor_kwargs={"max_pixels": 3211264},
        ),
        vision=VisionLimits(max_pixels=3211264, patch_factor=32, max_images=2),
        vram=VramModel(
            weights_gib=4.46,
            layers=28,
            kv_heads=8,
            head_dim=128,
            activation_gib=1.2,
            vision_activation_gib=0.9,
        ),
        floors=Floors(max_num_seqs=1, max_pixels=802816),
        reload_cost_s=60.0,
        presets={
            "describe": PromptPreset(prompt="Describe this image in detail."),
            "ocr": PromptPreset(
                prompt="Read all the text in this image, in reading order.", temperature=0.0
            ),
        },
        default_preset="ocr",
        variants={
            "2b-fp8": Variant(
                description="Qwen3-VL 2B Instruct, official FP8 weights (~3.15 GiB)",
                hf_repo="Qwen/Qwen3-VL-2B-Instruct-FP8",
                vram={"weights_gib": 3.15},
                options={"dtype": "auto"},
            ),
            "4b-fp8": Variant(
                description="Qwen3-VL 4B Instruct, official FP8 weights (~5 GB)",
                hf_repo="Qwen/Qwen3-VL-4B-Instruct-FP8",
                vram={"weights_gib": 4.66, "layers": 36, "kv_heads": 8, "head_dim": 128},
                options={"dtype": "auto"},
            ),
        },
    )
