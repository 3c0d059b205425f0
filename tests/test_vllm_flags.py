"""Tier 3: every built-in plugin's argv, in every variant, parsed by vLLM's own parser.

Runs whenever the vLLM CPU venv exists (scripts/vllm-cpu-env.sh), and always in CI, where a
missing venv FAILS the tier instead of skipping it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmhub.config.registry import Registry
from vlmhub.engines import vllm_env
from vlmhub.sizing.flags import render_argv
from vlmhub.sizing.vram import Gpu, budget_for
from vlmhub.spec import ModelSpec

pytestmark = pytest.mark.vllm
GPU = Gpu(12.0, 0.5)
BUILTINS = ("dots-ocr", "qwen3-vl", "phi3-vision")


@pytest.fixture(autouse=True)
def need_vllm(vllm_python: Path) -> None:
    """Every test here needs the vLLM CPU venv (the plugin's fixture skips or fails)."""


def every_builtin() -> dict[str, ModelSpec]:
    specs = Registry().specs()
    out: dict[str, ModelSpec] = {}
    for name in BUILTINS:
        spec = specs[name]
        out[name] = spec
        for variant in spec.variants:
            out[f"{name}:{variant}"] = spec.with_variant(variant)
    return out


def argv_of(spec: ModelSpec, *, sleep: bool = False) -> list[str]:
    return render_argv(spec, budget_for(spec), GPU, port=8000, host="0.0.0.0", sleep_mode=sleep)


def test_every_plugin_and_variant_passes_vllms_own_parser() -> None:
    specs = every_builtin()
    assert "qwen3-vl:4b-fp8" in specs
    argvs = {key: argv_of(spec) for key, spec in specs.items()}
    argvs.update({f"{key}+sleep": argv_of(spec, sleep=True) for key, spec in specs.items()})
    results = vllm_env.validate_argv(argvs)
    assert results == dict.fromkeys(argvs), {k: v for k, v in results.items() if v}


def test_plugins_record_the_vllm_version_they_were_validated_against() -> None:
    installed = vllm_env.installed_vllm_version()
    assert installed is not None
    for key, spec in every_builtin().items():
        assert spec.validated_vllm == installed, (
            f"{key} says it was validated against vLLM {spec.validated_vllm}, but the tier runs "
            f"{installed}: re-run this test and update validated_vllm in the plugin"
        )


def test_a_planted_bad_flag_fails() -> None:
    spec = every_builtin()["dots-ocr"]
    planted = spec.model_copy(
        update={
            "options": spec.options.model_copy(
                update={"extra_args": ["--definitely-not-a-vllm-flag", "1"]}
            )
        }
    )
    results = vllm_env.validate_argv({"planted": argv_of(planted)})
    assert results["planted"] is not None
    assert "--definitely-not-a-vllm-flag" in results["planted"]


def test_the_seeds_request_logging_flag_is_rejected_by_032_and_not_rendered() -> None:
    spec = every_builtin()["dots-ocr"]
    old = spec.model_copy(update={"image": "vllm/vllm-openai:v0.9.2"})
    old_argv = argv_of(old)
    assert "--disable-log-requests" in old_argv  # what vLLM 0.9 wanted
    new_argv = argv_of(spec)
    assert "--disable-log-requests" not in new_argv and "--no-enable-log-requests" in new_argv
    results = vllm_env.validate_argv({"old": old_argv, "new": new_argv})
    assert results["new"] is None
    assert results["old"] is not None and "--disable-log-requests" in results["old"]
