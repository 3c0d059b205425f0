"""dots.ocr's configuration classes, copied into a tiny model folder as configuration_dots.py.

vLLM 0.32 has ``DotsOCRForCausalLM`` and its own ``DotsOCRConfig`` but does not register the
``dots_ocr`` config type, so transformers refuses the folder unless ``--trust-remote-code``
lets it load this file through config.json's ``auto_map`` (``AutoConfig``), as it loads the
hub's file for the real model. vLLM checks only the class name (``DotsOCRConfig``) and the
fields; the field names and defaults follow the hub's configuration_dots.py.

Runs inside transformers (the vLLM venv), never in vlmhub: transformers is reached through
importlib so that this file type-checks without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_transformers: Any = importlib.import_module("transformers")
_PreTrainedConfig: Any = _transformers.PretrainedConfig
_Qwen2Config: Any = _transformers.Qwen2Config


class DotsVisionConfig(_PreTrainedConfig):  # type: ignore[misc]
    model_type = "dots_vit"

    def __init__(
        self,
        embed_dim: int = 1536,
        hidden_size: int = 1536,
        intermediate_size: int = 4224,
        num_hidden_layers: int = 42,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        patch_size: int = 14,
        spatial_merge_size: int = 2,
        temporal_patch_size: int = 1,
        rms_norm_eps: float = 1e-5,
        use_bias: bool = False,
        attn_implementation: str = "flash_attention_2",
        initializer_range: float = 0.02,
        init_merger_std: float = 0.02,
        is_causal: bool = False,
        post_norm: bool = True,
        gradient_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.rms_norm_eps = rms_norm_eps
        self.use_bias = use_bias
        self.attn_implementation = attn_implementation
        self.initializer_range = initializer_range
        self.init_merger_std = init_merger_std
        self.is_causal = is_causal
        self.post_norm = post_norm
        self.gradient_checkpointing = gradient_checkpointing


class DotsOCRConfig(_Qwen2Config):  # type: ignore[misc]
    model_type = "dots_ocr"

    def __init__(
        self,
        image_token_id: int = 151665,
        video_token_id: int = 151656,
        vision_config: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_config = DotsVisionConfig(**(vision_config or {}))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        self._auto_class = None
        super().save_pretrained(save_directory, **kwargs)
