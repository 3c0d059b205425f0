"""Write a tiny random-weight Qwen2 causal LM with its own tokenizer (runs in the vLLM venv).

Usage: ``python make_tiny_model.py DEST --seed N --name NAME``

The model is small enough to load in seconds on a CPU and big enough for vLLM's CPU attention
(head_dim 64; head_dim 16 crashes it). The tokenizer is a byte-level BPE trained here on a
built-in corpus, so nothing is downloaded. Two seeds give two models with different weights.
Idempotent: if DEST already holds config.json and model.safetensors, nothing is written.
Prints one JSON line: {"dest", "name", "seed", "created", "vocab_size"}.

This file must not import vlmhub or pydantic: it runs with the vLLM venv's python. Importing it
has no side effect (vlmhub reads its constants); heavy modules are imported when used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 64
MAX_POSITIONS = 4096
TOKENIZER_VOCAB = 768
PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
WEIGHTS_FILE = "model.safetensors"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = """
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
A model reads a page of text and writes an answer one token at a time. The engine keeps a
cache of keys and values for every token so that the next step is fast. When the cache is
full the scheduler waits until a request finishes and frees its blocks.
One graphics card has a fixed amount of memory. The weights take a part of it, the
activations take another part, and the rest is left for the cache. If two engines start at
the same time they both measure the free memory and both may be wrong.
Hello, how are you today? I am fine, thank you. What is the weather like? It is sunny and
warm, with a light wind from the west. Tomorrow it may rain in the morning and clear up in
the afternoon. Please bring an umbrella, a coat and a bottle of water.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 100 128 256 512 1000 1024 2048 4096.
Colours: red, orange, yellow, green, blue, indigo, violet, black, white, grey and brown.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Months: January, February, March, April, May, June, July, August, September, October,
November and December.
The router listens on one port and sends each request to the right engine. If the engine
is asleep it wakes it up first; if there is no room it stops another engine and starts the
new one. A user sends a chat message, the assistant replies, and the system prompt sets the
rules for the whole conversation.
Documents have titles, headers, footers, tables, pictures, captions, formulas, lists and
paragraphs. A reader finds the boxes, reads the text inside each box and puts them in the
order a person would read them, from top to bottom and from left to right.
Simple code: def add(a, b): return a + b. for i in range(10): print(i). x = [1, 2, 3].
if x > 0 and y < 5: z = x * y - 1. {"key": "value", "list": [true, false, null]}.
Some words to round out the vocabulary: apple, banana, cherry, garden, river, mountain,
forest, ocean, island, city, village, road, bridge, train, plane, ship, house, window,
door, table, chair, book, paper, pencil, music, song, dance, game, friend, family, school,
teacher, student, doctor, market, bread, cheese, coffee, tea, milk, sugar, salt, pepper,
quickly, slowly, happily, quietly, always, never, sometimes, often, before, after, during.
"""


def train_tokenizer(
    dest: Path,
    *,
    special_tokens: list[str],
    eos_token: str,
    pad_token: str,
    chat_template: str,
    bos_token: str | None = None,
    vocab_size: int = TOKENIZER_VOCAB,
    model_max_length: int = MAX_POSITIONS,
) -> int:
    """Train a byte-level BPE on the built-in corpus and save it with ``special_tokens`` (ids
    0..n-1, in order) as a PreTrainedTokenizerFast with ``chat_template``; return its length.
    Shared with make_tiny_vlm.py, whose models add their vision tokens here."""
    tk: Any = importlib.import_module("tokenizers")
    transformers: Any = importlib.import_module("transformers")

    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=None,
        additional_special_tokens=[t for t in special_tokens if t not in (pad_token, bos_token)],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(str(dest))
    # Make tokenizer_config.json readable by transformers 4.x as well as 5.x (a Docker vLLM
    # image may ship either), and keep the template in it for readers that look only there.
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return len(fast)


def token_ids(dest: Path, *tokens: str) -> list[int]:
    """The ids of ``tokens`` in the tokenizer saved in ``dest``."""
    data = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return [int(added[t] if t in added else vocab[t]) for t in tokens]


def build_atomically(
    dest: Path, build: Callable[[Path], dict[str, Any]], is_complete: Callable[[Path], bool]
) -> bool:
    """Run ``build(tmp)`` in a sibling temp dir, then move it to ``dest``, so that a crash
    leaves no half model and two concurrent runs keep one result. False when ``dest`` was
    already complete (nothing built)."""
    if is_complete(dest):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if is_complete(dest):  # another run finished first: keep its model
            return False
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_complete(dest):
                raise
            return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _train_tokenizer(dest: Path) -> int:
    return train_tokenizer(
        dest,
        special_tokens=SPECIAL_TOKENS,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _write_model(dest: Path, *, seed: int, name: str, tokenizer_len: int, dtype: str) -> int:
    """Write config.json, generation_config.json and random weights; return vocab_size."""
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")

    vocab_size = ((tokenizer_len + 63) // 64) * 64  # pad to a multiple of 64
    vocab = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    pad_id = int(vocab[PAD_TOKEN])
    eos_id = int(vocab[IM_END])

    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
        rope_theta=10000.0,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = model.to(torch_dtype)
    model.config.name_or_path = name
    model.save_pretrained(str(dest), safe_serialization=True)

    gen = {"bos_token_id": pad_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return vocab_size


def is_complete(dest: Path) -> bool:
    return (dest / "config.json").is_file() and (dest / WEIGHTS_FILE).is_file()


def make(dest: Path, *, seed: int, name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    dest = dest.resolve()

    def build(tmp: Path) -> dict[str, Any]:
        tokenizer_len = _train_tokenizer(tmp)
        _write_model(tmp, seed=seed, name=name, tokenizer_len=tokenizer_len, dtype=dtype)
        meta = {"name": name, "seed": seed, "dtype": dtype}
        (tmp / "vlmhub-tiny.json").write_text(json.dumps(meta), encoding="utf-8")
        return meta

    created = build_atomically(dest, build, is_complete)
    cfg = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    return {
        "dest": str(dest),
        "name": name,
        "seed": seed,
        "created": created,
        "vocab_size": cfg.get("vocab_size"),
    }


def offline() -> None:
    """Never reach a hub (set before transformers is imported: imports here are lazy)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: list[str] | None = None) -> int:
    offline()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    result = make(args.dest, seed=args.seed, name=args.name, dtype=args.dtype)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
