"""Phi-3-V's configuration class, copied into a tiny model folder as configuration_phi3_v.py.

transformers has no ``phi3_v`` config type: the hub's model ships its own file, loaded through
config.json's ``auto_map`` under ``--trust-remote-code``. vLLM's ``Phi3VForCausalLM`` reads the
Phi-3 text fields plus ``embd_layer`` (the HD transform) and ``img_processor`` (the CLIP tower's
output width and tokens per crop); this small class carries exactly those.

Runs inside transformers (the vLLM venv), never in vlmhub: transformers is reached through
importlib so that this file type-checks without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_Phi3Config: Any = importlib.import_module("transformers").Phi3Config

EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
IMG_PROCESSOR: dict[str, Any] = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


class Phi3VConfig(_Phi3Config):  # type: ignore[misc]
    model_type = "phi3_v"

    def __init__(
        self,
        embd_layer: dict[str, Any] | None = None,
        img_processor: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.embd_layer = dict(embd_layer or EMBD_LAYER)
        self.img_processor = dict(img_processor or IMG_PROCESSOR)
