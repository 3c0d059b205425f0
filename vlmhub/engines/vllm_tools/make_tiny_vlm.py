"""Write a tiny random-weight vision-language model that real vLLM serves (runs in the vLLM venv).

Usage: ``python make_tiny_vlm.py ARCH DEST --seed N --name NAME``, ARCH one of :data:`ARCHS`.

One model per built-in plugin's architecture, each a folder that vLLM 0.32 loads offline:

* ``qwen2.5-vl`` (``Qwen2_5_VLForConditionalGeneration``) and ``qwen3-vl``
  (``Qwen3VLForConditionalGeneration``): made with transformers' own classes; a 2-layer vision
  tower of width 128; ``Qwen2VLImageProcessor`` (+ video processor) with the real models'
  settings (patch 14 and CLIP mean/std for 2.5; patch 16, mean/std 0.5 for 3); the Qwen2-VL chat
  template. ``mrope_section`` sums to head_dim/2: [8, 12, 12], and [12, 10, 10] interleaved.
* ``dots-ocr`` (``DotsOCRForCausalLM``): a Qwen2 text model plus dots.ocr's vision tower under
  its checkpoint names, config ``dots_ocr`` through a local configuration_dots.py (``auto_map``;
  serve with ``--trust-remote-code``); ``Qwen2VLImageProcessor`` with temporal patch 1; image
  token ``<|imgpad|>``; dots.ocr's chat template (``<|img|><|imgpad|><|endofimg|>`` per image).
* ``phi3-vision`` (``Phi3VForCausalLM``): a Phi-3 text model plus the CLIP ViT-L/14-336 tower
  that vLLM hard-codes (23 of its 24 layers, width 1024: ~300 M parameters, ~0.56 GiB in
  bfloat16; serve with ``--dtype float32``, ~9x faster than bf16 on an AVX2 CPU) and its image
  token id 32044 (vocab 32064); a local configuration_phi3_v.py and a PIL/torch processor
  (processing_phi3_v.py); serve with ``--trust-remote-code``.

All share the text tier's tiny shape (2 layers, hidden 128, 2 heads, 1 KV head, head_dim 64)
and its locally trained byte-level BPE, with each model's special and vision tokens added.
Nothing is downloaded. Deterministic for a seed. Idempotent: a complete DEST is left alone.
Prints one JSON line: {"dest", "arch", "name", "seed", "created"}.

This file must not import vlmhub or pydantic: it runs with the vLLM venv's python.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__:
    from . import make_tiny_model as text_tier
else:  # run as a script: this folder is sys.path[0]
    import make_tiny_model as text_tier  # type: ignore[import-not-found, no-redef]

HERE = Path(__file__).resolve().parent
WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlmhub-tiny.json"
H = text_tier.HIDDEN_SIZE
MAX_POSITIONS = 32768
"""Above every built-in plugin's max_model_len (dots.ocr's 24,576), so that the plugins are
served at their own lengths (vLLM refuses a max_model_len above max_position_embeddings)."""
TEXT_SHAPE: dict[str, Any] = {
    "hidden_size": text_tier.HIDDEN_SIZE,
    "intermediate_size": text_tier.INTERMEDIATE_SIZE,
    "num_hidden_layers": text_tier.NUM_LAYERS,
    "num_attention_heads": text_tier.NUM_HEADS,
    "num_key_value_heads": text_tier.NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
}
VISION_WIDTH, VISION_HEADS, VISION_DEPTH, VISION_MLP = 128, 2, 2, 256
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PAD, IM_START, IM_END = text_tier.PAD_TOKEN, text_tier.IM_START, text_tier.IM_END
VISION_START, VISION_END, VISION_PAD = "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
QWEN_TOKENS = [PAD, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD]

# The upstream Qwen2-VL chat template (Qwen2-VL-7B-Instruct), which Qwen2.5-VL shares.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DOTS_IMG, DOTS_IMGPAD, DOTS_ENDOFIMG = "<|img|>", "<|imgpad|>", "<|endofimg|>"
DOTS_ROLES = ["<|system|>", "<|endofsystem|>", "<|user|>", "<|endofuser|>", "<|assistant|>"]
DOTS_END = "<|endofassistant|>"
DOTS_TOKENS = [PAD, DOTS_IMG, DOTS_IMGPAD, DOTS_ENDOFIMG, *DOTS_ROLES, DOTS_END,
               VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]  # fmt: skip
# dots.ocr's template: string content (the plugin's chat_template_content_format) already
# carries vLLM's image placeholder; list content gets one per image part.
DOTS_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '<|system|>' + m['content'] + '<|endofsystem|>\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|user|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' or c['type'] == 'image_url' -%}"
    "{{- '<|img|><|imgpad|><|endofimg|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|endofuser|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant|>' + m['content'] -}}"
    "{%- if not loop.last -%}{{- '<|endofassistant|>' -}}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- endif -%}"
)

PHI3_BOS, PHI3_END = "<s>", "<|end|>"
PHI3_TOKENS = [PAD, PHI3_BOS, "</s>", "<|system|>", "<|user|>", "<|assistant|>", PHI3_END]
PHI3_VOCAB = 32064  # vLLM hard-codes image token id 32044
PHI3_IMAGE_TOKEN_ID = 32044
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content']"
    " + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\\n' -}}{% endif %}"
)
CLIP_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,  # vLLM builds 24 + layer_idx(-2) + 1 layers and no post norm
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

REMOTE_CODE = {  # file in this folder -> name in the model folder
    "dots-ocr": {"hf_configuration_dots.py": "configuration_dots.py"},
    "phi3-vision": {
        "hf_configuration_phi3_v.py": "configuration_phi3_v.py",
        "hf_processing_phi3_v.py": "processing_phi3_v.py",
    },
}


def _mods() -> tuple[Any, Any]:
    return importlib.import_module("torch"), importlib.import_module("transformers")


def _vocab_size(tokenizer_len: int) -> int:
    return ((tokenizer_len + 63) // 64) * 64


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_model(model: Any, dest: Path, name: str) -> None:
    torch, _ = _mods()
    model = model.to(torch.bfloat16)
    model.config.name_or_path = name
    model.save_pretrained(str(dest), safe_serialization=True)
    (dest / "generation_config.json").unlink(missing_ok=True)  # written by us, per model


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    """bf16 weights: norms (``*norm*.weight``, ``*ln_q.weight``) 1, biases 0, else N(0, 0.02)."""
    torch, _ = _mods()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key.endswith(".bias"):
            t = torch.zeros(shape)
        elif key.endswith(".weight") and len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        out[key] = t.to(torch.bfloat16).contiguous()
    return out


def _save_safetensors(tensors: dict[str, Any], dest: Path) -> None:
    save_file = importlib.import_module("safetensors.torch").save_file
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())},
        str(dest / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )


def _copy_remote_code(arch: str, dest: Path) -> None:
    for src, target in REMOTE_CODE.get(arch, {}).items():
        shutil.copyfile(HERE / src, dest / target)


def _generation_config(dest: Path, *, bos: int | None, eos: list[int], pad: int) -> None:
    gen: dict[str, Any] = {"eos_token_id": eos, "pad_token_id": pad}
    if bos is not None:
        gen["bos_token_id"] = bos
    _write_json(dest / "generation_config.json", gen)


def _text_model(
    model_cls: Any, config_cls: Any, seed: int, **fields: Any
) -> tuple[Any, dict[str, Any]]:
    """A bf16 text model of the tiny shape (untied head, as the real ones) and a copy of its
    weights, to which the vision tower's are added."""
    torch, _ = _mods()
    torch.manual_seed(seed)
    config = config_cls(**TEXT_SHAPE, tie_word_embeddings=False, **fields)
    lm = model_cls(config).to(torch.bfloat16)
    return lm, {k: v.clone() for k, v in lm.state_dict().items()}


def _write_remote_config(
    dest: Path,
    lm: Any,
    name: str,
    architecture: str,
    model_type: str,
    auto_config: str,
    **fields: Any,
) -> None:
    """config.json: the text model's fields plus the architecture's, its config class loaded
    from the folder (``auto_map``, under --trust-remote-code)."""
    config = {
        **lm.config.to_dict(),
        "architectures": [architecture],
        "model_type": model_type,
        "auto_map": {"AutoConfig": auto_config},
        **fields,
        "name_or_path": name,
        "torch_dtype": "bfloat16",
    }
    config.pop("dtype", None)
    _write_json(dest / "config.json", config)


# --- Qwen2.5-VL and Qwen3-VL ------------------------------------------------------------------


def _build_qwen(dest: Path, *, arch: str, seed: int, name: str) -> None:
    torch, transformers = _mods()
    tok_len = text_tier.train_tokenizer(
        dest, special_tokens=QWEN_TOKENS, eos_token=IM_END, pad_token=PAD,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    pad, eos, image, video, start, end = text_tier.token_ids(
        dest, PAD, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END
    )
    text: dict[str, Any] = {
        **TEXT_SHAPE,
        "vocab_size": _vocab_size(tok_len),
        "head_dim": text_tier.HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision: dict[str, Any] = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_WIDTH,
        "intermediate_size": VISION_MLP,
        "num_heads": VISION_HEADS,
        "out_hidden_size": H,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    tokens = {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }
    if arch == "qwen3-vl":
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        }
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0],
                      hidden_act="gelu_pytorch_tanh")  # fmt: skip
        config = transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens
        )
        model_cls = transformers.Qwen3VLForConditionalGeneration
        patch, mean, std = 16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        size = {"shortest_edge": 65536, "longest_edge": 16777216}  # the hub's Qwen3-VL
        video_processor: Any = transformers.Qwen3VLVideoProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
            size={"shortest_edge": 4096, "longest_edge": 25165824},
        )  # fmt: skip
        processor_class = "Qwen3VLProcessor"
    else:
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [8, 12, 12],
        }
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2, hidden_act="silu")  # fmt: skip
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens
        )
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        patch, mean, std = 14, CLIP_MEAN, CLIP_STD
        size = {"shortest_edge": 3136, "longest_edge": 12845056}  # the hub's Qwen2.5-VL
        video_processor = transformers.Qwen2VLVideoProcessor(
            patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
        )  # fmt: skip
        processor_class = "Qwen2_5_VLProcessor"
    torch.manual_seed(seed)
    _save_model(model_cls(config), dest, name)
    image_processor = transformers.Qwen2VLImageProcessor(
        size=size, patch_size=patch, temporal_patch_size=2, merge_size=2,
        image_mean=mean, image_std=std,
    )  # fmt: skip
    _save_processor_configs(dest, image_processor, video_processor, processor_class)
    _generation_config(dest, bos=pad, eos=[eos, pad], pad=pad)


def _save_processor_configs(
    dest: Path, image_processor: Any, video_processor: Any, processor_class: str
) -> None:
    """preprocessor_config.json (+ video_preprocessor_config.json), naming the processor
    class, without re-saving the tokenizer (a processor's save_pretrained would)."""
    image_processor.save_pretrained(str(dest))
    if video_processor is not None:
        video_processor.save_pretrained(str(dest))
    for fname in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = dest / fname
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["processor_class"] = processor_class
            _write_json(path, data)


# --- dots.ocr ---------------------------------------------------------------------------------


def dots_vision_shapes(
    *, width: int, depth: int, mlp: int, patch: int, merge: int, out: int
) -> dict[str, tuple[int, ...]]:
    """dots.ocr's vision tower as its checkpoint names it (use_bias false, post_norm true)."""
    merged = width * merge * merge
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.patchifier.proj.weight": (width, 3, patch, patch),
        "vision_tower.patch_embed.patchifier.proj.bias": (width,),
        "vision_tower.patch_embed.patchifier.norm.weight": (width,),
        "vision_tower.post_trunk_norm.weight": (width,),
        "vision_tower.merger.ln_q.weight": (width,),
        "vision_tower.merger.ln_q.bias": (width,),
        "vision_tower.merger.mlp.0.weight": (merged, merged),
        "vision_tower.merger.mlp.0.bias": (merged,),
        "vision_tower.merger.mlp.2.weight": (out, merged),
        "vision_tower.merger.mlp.2.bias": (out,),
    }
    for i in range(depth):
        block = f"vision_tower.blocks.{i}"
        shapes.update({
            f"{block}.attn.qkv.weight": (3 * width, width),
            f"{block}.attn.proj.weight": (width, width),
            f"{block}.norm1.weight": (width,),
            f"{block}.norm2.weight": (width,),
            f"{block}.mlp.fc1.weight": (mlp, width),
            f"{block}.mlp.fc3.weight": (mlp, width),
            f"{block}.mlp.fc2.weight": (width, mlp),
        })  # fmt: skip
    return shapes


def _build_dots(dest: Path, *, arch: str, seed: int, name: str) -> None:
    _, transformers = _mods()
    tok_len = text_tier.train_tokenizer(
        dest, special_tokens=DOTS_TOKENS, eos_token=DOTS_END, pad_token=PAD,
        chat_template=DOTS_CHAT_TEMPLATE,
    )  # fmt: skip
    pad, eos, image, video = text_tier.token_ids(dest, PAD, DOTS_END, DOTS_IMGPAD, VIDEO_PAD)
    lm, tensors = _text_model(
        transformers.Qwen2ForCausalLM, transformers.Qwen2Config, seed,
        vocab_size=_vocab_size(tok_len), rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    tensors.update(_random_tensors(
        dots_vision_shapes(width=VISION_WIDTH, depth=VISION_DEPTH, mlp=VISION_MLP, patch=14,
                           merge=2, out=H),
        seed + 1,
    ))  # fmt: skip
    _save_safetensors(tensors, dest)
    vision = {
        "embed_dim": VISION_WIDTH,
        "hidden_size": H,
        "intermediate_size": VISION_MLP,
        "num_hidden_layers": VISION_DEPTH,
        "num_attention_heads": VISION_HEADS,
        "num_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 1,
        "rms_norm_eps": 1e-5,
        "use_bias": False,
        "post_norm": True,
        "attn_implementation": "sdpa",
        "is_causal": False,
        "initializer_range": 0.02,
        "init_merger_std": 0.02,
        "gradient_checkpointing": False,
    }
    _write_remote_config(
        dest, lm, name, "DotsOCRForCausalLM", "dots_ocr", "configuration_dots.DotsOCRConfig",
        image_token_id=image, video_token_id=video, vision_config=vision,
    )  # fmt: skip
    image_processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": 3136, "longest_edge": 11289600},  # dots.ocr's MIN/MAX_PIXELS
        patch_size=14, temporal_patch_size=1, merge_size=2, image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )  # fmt: skip
    _save_processor_configs(dest, image_processor, None, "Qwen2VLProcessor")
    _generation_config(dest, bos=None, eos=[eos, pad], pad=pad)


# --- Phi-3-V ----------------------------------------------------------------------------------


def _build_phi3v(dest: Path, *, arch: str, seed: int, name: str) -> None:
    torch, transformers = _mods()
    text_tier.train_tokenizer(
        dest, special_tokens=PHI3_TOKENS, eos_token=PHI3_END, pad_token=PAD,
        bos_token=PHI3_BOS, chat_template=PHI3_CHAT_TEMPLATE,
    )  # fmt: skip
    pad, bos, eos = text_tier.token_ids(dest, PAD, PHI3_BOS, PHI3_END)
    lm, tensors = _text_model(
        transformers.Phi3ForCausalLM, transformers.Phi3Config, seed, vocab_size=PHI3_VOCAB,
        rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_L14_336))
    prefix = "model.vision_embed_tokens."
    for key, value in clip.to(torch.bfloat16).state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.startswith("post_layernorm."):
            continue  # vLLM's truncated tower has none
        # transformers 5 saves CLIPVisionModel keys without the prefix vLLM's CLIP expects
        tensors[f"{prefix}img_processor.vision_model.{key}"] = value.clone()
    del clip
    merged = CLIP_L14_336["hidden_size"] * 4
    tensors.update(_random_tensors({
        f"{prefix}glb_GN": (1, 1, merged),
        f"{prefix}sub_GN": (1, 1, 1, merged),
        f"{prefix}img_projection.0.weight": (H, merged),
        f"{prefix}img_projection.0.bias": (H,),
        f"{prefix}img_projection.2.weight": (H, H),
        f"{prefix}img_projection.2.bias": (H,),
    }, seed + 1))  # fmt: skip
    _save_safetensors(tensors, dest)
    phi3v = importlib.import_module(
        f"{__package__}.hf_configuration_phi3_v" if __package__ else "hf_configuration_phi3_v"
    )
    _write_remote_config(
        dest, lm, name, "Phi3VForCausalLM", "phi3_v", "configuration_phi3_v.Phi3VConfig",
        embd_layer=phi3v.EMBD_LAYER, img_processor=phi3v.IMG_PROCESSOR,
    )  # fmt: skip
    auto_map = {
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    }
    _write_json(dest / "preprocessor_config.json", {
        "auto_map": auto_map,
        "image_processor_type": "Phi3VImageProcessor",
        "processor_class": "Phi3VProcessor",
        "num_crops": 4,  # Phi-3.5-vision's
        "num_img_tokens": 144,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    })  # fmt: skip
    _write_json(
        dest / "processor_config.json", {"auto_map": auto_map, "processor_class": "Phi3VProcessor"}
    )
    _generation_config(dest, bos=bos, eos=[eos, pad], pad=pad)


BUILDERS: dict[str, Callable[..., None]] = {
    "qwen2.5-vl": _build_qwen,
    "qwen3-vl": _build_qwen,
    "dots-ocr": _build_dots,
    "phi3-vision": _build_phi3v,
}
ARCHS = tuple(BUILDERS)


def is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in ("config.json", WEIGHTS_FILE, META_FILE))


def make(dest: Path, *, arch: str, seed: int, name: str) -> dict[str, Any]:
    if arch not in BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    dest = dest.resolve()

    def build(tmp: Path) -> dict[str, Any]:
        BUILDERS[arch](tmp, arch=arch, seed=seed, name=name)
        _copy_remote_code(arch, tmp)
        meta = {"arch": arch, "name": name, "seed": seed}
        (tmp / "chat_template.jinja").write_text(
            json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))[
                "chat_template"
            ],
            encoding="utf-8",
        )
        _write_json(tmp / META_FILE, meta)  # last: marks the folder complete
        return meta

    created = text_tier.build_atomically(dest, build, is_complete)
    return {"dest": str(dest), "arch": arch, "name": name, "seed": seed, "created": created}


def main(argv: list[str] | None = None) -> int:
    text_tier.offline()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("arch", choices=ARCHS)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    result = make(args.dest, arch=args.arch, seed=args.seed, name=args.name or args.arch)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
