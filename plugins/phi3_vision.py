"""Phi-3.5-vision-instruct (``Phi3VForCausalLM``, images only).

Numbers: vllm-notes.md. ~8.3 GB BF16 (~7.73 GiB); 32 layers x 32 KV heads x 96 = 384 KiB of
KV per token, so its 4,096-token context alone costs 1.5 GiB. ``num_crops`` sets the image
tokens (144 per 336x336 crop); 4 crops keep two images well inside the context.
"""

from __future__ import annotations

from vlmhub.spec import Floors, ModelSpec, PromptPreset, VllmOptions, VramModel


def plugin() -> ModelSpec:
    return ModelSpec(
        name="phi3-vision",
        description="Phi-3.5-vision-instruct: multi-image chat and charts",
        aliases=["phi-3.5-vision", "phi3.5-vision"],
        hf_repo="microsoft/Phi-3.5-vision-instruct",
        image="vllm/vllm-openai:v0.32.0",
        vllm_version="0.11.0",
        validated_vllm="0.32.0",
        capabilities=["chat", "vision"],
        options=VllmOptions(
            max_model_len=4096,
            max_num_seqs=2,
            dtype="bfloat16",
            trust_remote_code=True,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 2},
            mm_processor_kwargs={"num_crops": 4},
        ),
        vram=VramModel(weights_gib=7.73, layers=32, kv_heads=32, head_dim=96, activation_gib=0.8),
        floors=Floors(max_num_seqs=1, max_model_len=2048),
        reload_cost_s=60.0,
        presets={"describe": PromptPreset(prompt="Describe this image in detail.")},
    )
