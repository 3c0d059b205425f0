"""An example third-party model plugin: one file and one entry point.

Install it next to vlmhub (``pip install ./examples/vlmhub-example-plugin``) and
``vlmhub models`` lists ``smolvlm`` with this distribution as its source. The numbers are
SmolVLM-256M-Instruct's (a SmolLM2-135M text model: 30 layers, 3 KV heads, head_dim 64).
"""

from __future__ import annotations

from vlmhub.spec import ModelSpec, PromptPreset, VllmOptions, VramModel


def plugin() -> ModelSpec:
    return ModelSpec(
        name="smolvlm",
        description="SmolVLM 256M Instruct: a tiny VLM for captions and simple OCR",
        hf_repo="HuggingFaceTB/SmolVLM-256M-Instruct",
        image="vllm/vllm-openai:v0.32.0",
        vllm_version="0.11.0",
        options=VllmOptions(max_model_len=8192, max_num_seqs=8, limit_mm_per_prompt={"image": 1}),
        vram=VramModel(weights_gib=0.5, layers=30, kv_heads=3, head_dim=64, activation_gib=0.4),
        reload_cost_s=20.0,
        presets={"caption": PromptPreset(prompt="Describe this image in one sentence.")},
    )
