"""The image-size trap caught before a user meets it (issue 15 item 4), and the entry
overrides that point a plugin at other weights (item 3): pure parts and the CLI, no engine.
The same trap met at run time, through the router and a real vLLM, is tested in
test_vlm_route.py (test_vlm_image_too_large_for_the_context_gets_the_fix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import load_config, resolve
from vlmhub.config.vision import advise_context_error, context_need, prompt_tokens, runtime_advice
from vlmhub.sizing.vram import Gpu

PLUGINS = Registry().specs()
GPU = Gpu(24.0)
# vLLM 0.32's answer to a 1000x800 image for a Qwen2-VL without a pixel cap (api_utils.py)
VLLM_400 = {"error": {"message": "Input length (1095) exceeds model's maximum context length "
                                 "(1024).", "type": "BadRequestError", "param": None,
                      "code": 400}}  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with its own (empty) state dir: no recorded budget of this machine."""
    env = {**os.environ, "COLUMNS": "400", "VLMHUB_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "vlmhub", *args], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize("name", ["dots-ocr", "qwen3-vl"])
def test_vlm_plugins_hold_their_largest_input(name: str) -> None:
    need = context_need(PLUGINS[name])
    assert need is not None and need.fits
    assert need.max_pixels == PLUGINS[name].options.mm_processor_kwargs["max_pixels"]  # type: ignore[index]


def test_vlm_dots_ocr_numbers() -> None:
    need = context_need(PLUGINS["dots-ocr"].with_caps(max_pixels=200704))
    assert need is not None
    assert (need.images, need.image_tokens, need.output_tokens) == (1, 256, 8192)  # 200704/28²
    longest = max(len(p.prompt.encode()) for p in PLUGINS["dots-ocr"].presets.values())
    assert need.prompt_tokens == prompt_tokens(PLUGINS["dots-ocr"]) == -(-longest // 3) + 32
    assert need.need == 256 + need.prompt_tokens + 8192


@pytest.mark.parametrize(
    ("name", "entry", "pixels_fix"),
    [
        # 2 images x 3136 tokens + 1024 output = 7296 fit; the prompt does not
        ("qwen3-vl", {"max_model_len": 7300}, 3187712),  # 2 x 3113 tokens x 32²
        # a page of 256 tokens + 8192 output fit; the ~330-token layout prompt does not, and
        # no pixel cap above the plugin's floor (2 Mpx) would make room: one fix only
        ("dots-ocr", {"max_pixels": 200704, "max_model_len": 8648}, None),
    ],
)
def test_vlm_config_check_and_plan_refuse_a_context_without_room_for_the_prompt(
    tmp_path: Path, name: str, entry: dict[str, int], pixels_fix: int | None
) -> None:
    """The images and the output reserve fit (the spec's own check passes) but the prompt
    does not: refused with the numbers and the fixes, each of which then passes."""
    spec = PLUGINS[name].with_caps(max_pixels=entry.get("max_pixels"))
    need = context_need(spec.with_caps(max_model_len=entry["max_model_len"]))
    assert need is not None and not need.fits
    flow = ", ".join(f"{k}: {v}" for k, v in entry.items())
    path = write(tmp_path, f"""\
        gpu: {{total_gib: 24, force_total: true}}
        models:
          {name}: {{{flow}}}
        """)
    with pytest.raises(ConfigError) as err:
        resolve(load_config(path), PLUGINS, GPU)
    (problem,) = err.value.problems
    length = entry["max_model_len"]
    assert problem.startswith(f"{path}:3: models.{name}.max_model_len: max_model_len {length} ")
    assert (f"{need.images} image(s) of up to {need.image_tokens} tokens (max_pixels "
            f"{need.max_pixels} / {need.patch_factor}x{need.patch_factor}") in problem
    assert (f"~{need.prompt_tokens} prompt tokens + {need.output_tokens} output tokens = "
            f"{need.need}") in problem
    fix = f"Fix: raise max_model_len to at least {need.need}"
    assert fix + (f" or set max_pixels: {pixels_fix} " if pixels_fix else " under") in problem
    for command in ("config", "check"), ("plan",):
        done = cli(tmp_path, *command, "--config", str(path))
        assert done.returncode == 2, done.stdout + done.stderr
        assert fix in " ".join((done.stdout + done.stderr).split())  # rich wraps lines

    fixes = [{**entry, "max_model_len": need.need}]
    if pixels_fix:
        fixes.append({**entry, "max_pixels": pixels_fix})
    for fixed_entry in fixes:
        flow = ", ".join(f"{k}: {v}" for k, v in fixed_entry.items())
        fixed = write(tmp_path, f"""\
            gpu: {{total_gib: 24, force_total: true}}
            models:
              {name}: {{{flow}}}
            """)
        (model,) = resolve(load_config(fixed), PLUGINS, GPU)
        assert model.spec is not None
        assert context_need(model.spec).fits  # type: ignore[union-attr]
        assert cli(tmp_path, "config", "check", "--config", str(fixed)).returncode == 0


def test_vlm_entry_points_a_plugin_at_other_weights_with_option_overrides(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, """\
        gpu: {total_gib: 24, force_total: true}
        models:
          phi3-vision:
            model_path: /models/phi-3.5-v
            options: {dtype: float32, mm_processor_kwargs: {num_crops: 2}}
          ocr:
            plugin: dots-ocr
            model_path: /models/dots
            max_pixels: 1003520
        """)
    got = {m.name: m.spec for m in resolve(load_config(path), PLUGINS, GPU)}
    phi, dots = got["phi3-vision"], got["ocr"]
    assert phi is not None and dots is not None
    assert phi.hf_repo == "/models/phi-3.5-v" and phi.options.dtype == "float32"
    assert phi.options.mm_processor_kwargs == {"num_crops": 2}
    assert phi.options.trust_remote_code and phi.options.max_model_len == 4096  # the plugin's
    assert type(dots) is type(PLUGINS["dots-ocr"])  # its layout postprocess kept
    assert dots.options.mm_processor_kwargs == {"min_pixels": 3136, "max_pixels": 1003520}
    assert dots.max_pixels == 1003520 and dots.hf_repo == "/models/dots"
    assert phi.spec_hash() != PLUGINS["phi3-vision"].spec_hash()  # a changed engine


def test_vlm_entry_option_errors_are_located(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        models:
          qwen3-vl:
            options:
              dtype: float8
              no_such_flag: 1
        """)
    with pytest.raises(ConfigError) as err:
        resolve(load_config(path), PLUGINS, GPU)
    text = "\n".join(err.value.problems)
    assert f"{path}:4: models.qwen3-vl.options.dtype" in text
    assert f"{path}:5: models.qwen3-vl.options.no_such_flag: unknown key" in text


def test_vlm_runtime_advice_is_added_to_vllms_400_only() -> None:
    body = json.dumps(VLLM_400).encode()
    out = json.loads(advise_context_error(body, "my-vl"))
    message = out["error"]["message"]
    assert message.startswith(VLLM_400["error"]["message"])  # vLLM's numbers kept
    assert "(1095 tokens here)" in message
    assert "models.my-vl.max_model_len" in message and "models.my-vl.max_pixels" in message
    assert out["error"]["type"] == "BadRequestError" and out["error"]["code"] == 400
    # the renderer's wording of the same limit (a long text prompt) gets it too
    other = {"error": {"message": "This model's maximum context length is 1024 tokens. However,"
                                  " your prompt contains 2000 input tokens", "code": 400}}
    assert "Fix:" in json.loads(advise_context_error(json.dumps(other).encode(), "m"))[
        "error"]["message"]
    older = {"error": {"message": "This model's maximum context length is 1024 tokens. However,"
                                  " you requested 1100 tokens (100 in the messages, 1000 in the "
                                  "completion)."}}  # a smaller max_tokens may be the fix
    for untouched in (b'{"error": {"message": "temperature must be positive"}}',
                      json.dumps(older).encode(),
                      b"maximum context length, but not JSON", b"{}"):
        assert advise_context_error(untouched, "m") == untouched
    assert runtime_advice("m", "max_tokens must be at least 1") is None
