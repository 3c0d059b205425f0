"""Model spec validation and the VRAM planner, table-tested against vllm-notes.md."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from vlmhub.config.registry import Registry
from vlmhub.sizing.flags import engine_version, redact, render_argv
from vlmhub.sizing.together import fit_together
from vlmhub.sizing.vram import (
    DoesNotFit,
    Gpu,
    Measured,
    budget_for,
    check_fits_alone,
    fitting_sets,
    gpu_memory_utilization,
    max_model_len_that_fits,
    memory_flags,
)
from vlmhub.spec import GIB, KIB, ModelSpec, VllmOptions, VramModel

SPECS = Registry().specs()
CARD_12 = Gpu(total_gib=12.0, reserve_gib=0.5)


def test_builtin_plugins_load_through_entry_points() -> None:
    reg = Registry()
    for name in ("dots-ocr", "qwen3-vl", "phi3-vision"):
        assert reg.plugins[name].ok, reg.plugins[name].error
        assert reg.plugins[name].source.startswith(f"vlmhub_plugins.{name.replace('-', '_')}:")


@pytest.mark.parametrize(
    ("name", "variant", "kv_kib", "weights_gib"),
    [
        ("dots-ocr", None, 28, 5.67),  # 28 layers x 2 KV heads x 128 x 2 x bf16
        ("dots-ocr", "fp8-kv", 14, 5.67),  # the same with a 1-byte KV cache
        ("dots-ocr", "fp8", 28, 3.6),  # FP8 weights quantized by vLLM at load
        ("qwen3-vl", None, 112, 4.46),  # 2B: vLLM's "Model loading took 4.4570 GiB" (#27706)
        ("qwen3-vl", "2b-fp8", 112, 3.15),  # 2B FP8: the linear layers' second byte saved
        ("qwen3-vl", "4b-fp8", 144, 4.66),  # 4B FP8: ~5 GB
        ("phi3-vision", None, 384, 7.73),  # 8.3 GB, 32 x 32 x 96
    ],
)
def test_published_sizes(name: str, variant: str | None, kv_kib: int, weights_gib: float) -> None:
    spec = SPECS[name] if variant is None else SPECS[name].with_variant(variant)
    assert spec.vram.kv_per_token == kv_kib * KIB
    assert spec.vram.weights_gib == pytest.approx(weights_gib)
    b = budget_for(spec)
    expected_kv = spec.options.max_model_len * spec.vram.kv_sequences * kv_kib * KIB / GIB
    assert b.kv_cache_gib == pytest.approx(expected_kv)
    # every built-in fits a 12 GB card alone, as the seed report needs
    assert check_fits_alone(spec, CARD_12).footprint_gib <= CARD_12.usable_gib


def test_at_default_settings_no_two_builtins_fit_12_gb_but_on_24_all_pairs_do() -> None:
    budgets = [budget_for(SPECS[n]) for n in ("dots-ocr", "qwen3-vl", "phi3-vision")]
    sets12 = fitting_sets(budgets, CARD_12)
    assert all(len(s) == 1 for s in sets12) and len(sets12) == 3
    sets24 = fitting_sets(budgets, Gpu(24.0, 0.5))
    assert {len(s) for s in sets24} == {2}
    assert len(sets24) == 3


def named(spec: ModelSpec, name: str) -> ModelSpec:
    return spec.model_copy(update={"name": name})


def test_on_12_gb_dots_ocr_and_qwen3_vl_fp8_fit_together_with_caps() -> None:
    dots = named(SPECS["dots-ocr"].with_variant("fp8"), "dots")
    qwen = named(SPECS["qwen3-vl"].with_variant("2b-fp8"), "qwen")
    assert budget_for(dots).footprint_gib + budget_for(qwen).footprint_gib > CARD_12.usable_gib
    plan = fit_together([dots, qwen], CARD_12)
    assert plan.fits, plan.reason
    assert plan.total_gib <= CARD_12.usable_gib + 1e-9 < plan.default_total_gib
    by = {m.name: m for m in plan.members}
    for m in plan.members:  # every member lowered, never below its plugin's floors
        assert m.lowered and m.caps.max_num_seqs is not None
        assert m.caps.max_num_seqs >= m.spec.floors.max_num_seqs
        top, floor = m.default_caps.max_pixels, m.spec.floors.max_pixels
        assert m.caps.max_pixels is not None and floor is not None and top is not None
        assert floor <= m.caps.max_pixels < top
        assert m.budget == budget_for(m.spec)
        assert m.spec.options.mm_processor_kwargs is not None
        assert m.spec.options.mm_processor_kwargs["max_pixels"] == m.caps.max_pixels
    # dots.ocr keeps one full page: every image token of the capped page plus 8,192 of output
    d = by["dots"].spec
    assert d.vision is not None and d.vision.max_pixels == by["dots"].caps.max_pixels
    assert d.options.max_model_len >= d.vision.max_image_tokens + 8192
    assert "max_pixels 11289600 -> " in plan.summary()
    # the caps are the largest that fit: a little more pixels would not
    assert d.vram.activation_gib < SPECS["dots-ocr"].vram.activation_gib


def test_the_planner_lowers_seqs_first_then_length_then_pixels() -> None:
    dots = named(SPECS["dots-ocr"].with_variant("fp8"), "dots")
    qwen = named(SPECS["qwen3-vl"].with_variant("2b-fp8"), "qwen")
    pair = budget_for(dots).footprint_gib + budget_for(qwen).footprint_gib
    # room for both at one sequence each: only max_num_seqs moves
    one_seq = budget_for(dots.with_caps(max_num_seqs=1)).footprint_gib + budget_for(
        qwen.with_caps(max_num_seqs=1)).footprint_gib  # fmt: skip
    assert one_seq < pair
    plan = fit_together([dots, qwen], Gpu(one_seq + 0.01))
    # dots.ocr's KV cache holds two pages: one sequence halves it; Qwen's holds one, so its
    # max_num_seqs would save nothing and stays
    assert plan.fits and [m.lowered for m in plan.members] == [["max_num_seqs 4 -> 1"], []]
    # a little less room: the context shrinks next, pixels stay
    plan = fit_together([dots, qwen], Gpu(one_seq - 0.3))
    assert plan.fits
    assert all(m.caps.max_pixels == m.default_caps.max_pixels for m in plan.members)
    assert any(m.caps.max_model_len < m.default_caps.max_model_len for m in plan.members)


def test_a_group_that_cannot_fit_says_why() -> None:
    plan = fit_together([SPECS["dots-ocr"], SPECS["phi3-vision"]], CARD_12)
    assert not plan.fits
    assert "dots-ocr + phi3-vision cannot be resident together" in plan.summary()
    assert "lowest settings" in plan.reason and "11.50 GiB is usable" in plan.reason
    assert "quantized variants" in plan.reason


def test_pixel_caps_scale_the_vision_activation() -> None:
    spec = SPECS["dots-ocr"]
    half = spec.with_caps(max_pixels=spec.vision.max_pixels // 2 if spec.vision else 0)
    assert half.vram.vision_activation_gib == pytest.approx(spec.vram.vision_activation_gib / 2)
    assert half.vram.activation_gib == pytest.approx(
        spec.vram.activation_gib - spec.vram.vision_activation_gib / 2
    )
    assert half.min_model_len_at(half.max_pixels) < spec.min_model_len_at(spec.max_pixels)
    with pytest.raises(ValidationError, match="vision_activation_gib"):
        VramModel(weights_gib=1, kv_bytes_per_token=1, activation_gib=0.5,
                  vision_activation_gib=0.6)  # fmt: skip


def test_kv_cache_holds_no_more_sequences_than_max_num_seqs() -> None:
    spec = SPECS["dots-ocr"]  # kv_sequences 2
    assert budget_for(spec.with_caps(max_num_seqs=1)).kv_cache_gib == pytest.approx(
        budget_for(spec).kv_cache_gib / 2
    )


def test_a_measured_budget_replaces_the_estimate_with_a_margin() -> None:
    spec = SPECS["qwen3-vl"]
    est = budget_for(spec)
    m = Measured(weights_gib=4.0, activation_gib=0.6, non_torch_gib=0.15, cuda_graph_gib=0.2,
                 measured_on="2026-12-02")  # fmt: skip
    b = budget_for(spec, None, m)
    assert est.source == "estimated" and b.source == "measured 2026-12-02" and b.measured
    assert (b.weights_gib, b.activation_gib, b.non_torch_gib, b.cuda_graph_gib) == (
        4.0, 0.6, 0.15, 0.2)  # fmt: skip
    assert b.margin_gib == pytest.approx(max(0.05 * 4.95, 0.1))
    assert b.kv_cache_gib == est.kv_cache_gib  # the KV cache is planned, not measured
    assert b.engine_gib == pytest.approx(4.95 + b.margin_gib + b.kv_cache_gib)
    # a raise after a memory failure, with no measurement yet, stays "estimated"
    raised = budget_for(spec, None, Measured(raised_activation_gib=0.5, raised_on="2026-12-02"))
    assert raised.source == "estimated" and raised.raised_gib == 0.5
    assert raised.footprint_gib == pytest.approx(est.footprint_gib + 0.5)
    assert "after a memory failure" in raised.label


def test_qwen3_vl_8b_does_not_fit_12gb() -> None:
    big = SPECS["qwen3-vl"].model_copy(
        update={"vram": SPECS["qwen3-vl"].vram.model_copy(update={"weights_gib": 16.3})}
    )
    with pytest.raises(DoesNotFit) as err:
        check_fits_alone(big, CARD_12)
    assert err.value.max_model_len == 0
    assert "smaller or quantized variant" in str(err.value)


def test_dots_ocr_page_needs_more_than_the_seed_1024() -> None:
    with pytest.raises(ValidationError, match="cannot hold one full page"):
        SPECS["dots-ocr"].with_overrides(max_model_len=1024)
    spec = SPECS["dots-ocr"]
    assert spec.vision is not None
    assert spec.vision.max_image_tokens == 14400
    assert spec.options.max_model_len >= 14400 + spec.vision.min_output_tokens


def test_does_not_fit_names_the_largest_length_that_does() -> None:
    spec = SPECS["phi3-vision"].with_overrides(max_model_len=16384)
    with pytest.raises(DoesNotFit) as err:
        check_fits_alone(spec, CARD_12)
    best = err.value.max_model_len
    assert str(best) in str(err.value)
    assert best % 16 == 0 and 4096 <= best < 16384
    assert check_fits_alone(spec.with_overrides(max_model_len=best), CARD_12)
    with pytest.raises(DoesNotFit):
        check_fits_alone(spec.with_overrides(max_model_len=best + 16), CARD_12)
    assert max_model_len_that_fits(spec, CARD_12.usable_gib) == best


def test_gpu_memory_utilization_is_per_instance_not_ninety_percent() -> None:
    spec = SPECS["dots-ocr"]
    b = budget_for(spec)
    u = gpu_memory_utilization(b, CARD_12)
    assert u == math.floor(b.engine_gib / 12.0 * 1000) / 1000
    assert u * 12.0 <= b.engine_gib  # never claims more than planned
    assert 0.5 < u < 0.9  # the engine's share, not GPUStack's 90 %
    # the CUDA context is outside U
    assert b.footprint_gib == pytest.approx(b.engine_gib + spec.vram.cuda_context_gib)
    # an estimate lets vLLM profile (and log what it measured): the fraction only
    assert memory_flags(spec, b, CARD_12) == ["--gpu-memory-utilization", f"{u:.3f}"]
    # a measured budget also pins the KV cache in bytes
    mb = budget_for(spec, None, Measured(weights_gib=5.6, measured_on="2026-12-02"))
    mu = gpu_memory_utilization(mb, CARD_12)
    assert memory_flags(spec, mb, CARD_12) == [
        "--gpu-memory-utilization",
        f"{mu:.3f}",
        "--kv-cache-memory-bytes",
        str(mb.kv_cache_bytes),
    ]
    old = spec.model_copy(update={"vllm_version": "0.10.1"})
    assert memory_flags(old, mb, CARD_12) == ["--gpu-memory-utilization", f"{mu:.3f}"]


def test_budget_override_gives_kv_the_rest() -> None:
    spec = SPECS["qwen3-vl"]
    b = budget_for(spec, budget_gib=9.0)
    assert b.footprint_gib == pytest.approx(9.0)
    assert b.kv_tokens > spec.options.max_model_len
    with pytest.raises(DoesNotFit):
        budget_for(spec, budget_gib=5.0)


def test_enforce_eager_drops_cuda_graph_memory() -> None:
    spec = SPECS["qwen3-vl"]
    eager = spec.with_overrides(enforce_eager=True)
    assert budget_for(spec).engine_gib - budget_for(eager).engine_gib == pytest.approx(
        spec.vram.cuda_graph_gib
    )


@pytest.mark.parametrize("image", ["vllm/vllm-openai", "vllm/vllm-openai:latest"])
def test_images_must_be_pinned(image: str) -> None:
    with pytest.raises(ValidationError, match="not pinned"):
        SPECS["qwen3-vl"].model_copy().model_validate(
            {**SPECS["qwen3-vl"].model_dump(), "image": image}
        )


def test_spec_rejects_unknown_keys_and_needs_kv_size() -> None:
    base = {"name": "x", "hf_repo": "a/b", "options": {"max_model_len": 10}}
    with pytest.raises(ValidationError, match="extra"):
        ModelSpec.model_validate(
            {**base, "vram": {"weights_gib": 1, "kv_bytes_per_token": 1}, "colour": "red"}
        )
    with pytest.raises(ValidationError, match="kv_bytes_per_token"):
        ModelSpec.model_validate({**base, "vram": {"weights_gib": 1}})
    with pytest.raises(ValidationError, match="not a model name"):
        ModelSpec.model_validate(
            {**base, "name": "Bad Name", "vram": {"weights_gib": 1, "kv_bytes_per_token": 1}}
        )


def test_variant_overrides_and_unknown_variant() -> None:
    v = SPECS["qwen3-vl"].with_variant("4b-fp8")
    assert v.hf_repo == "Qwen/Qwen3-VL-4B-Instruct-FP8" and v.variant == "4b-fp8"
    assert v.options.dtype == "auto" and v.options.max_model_len == 16384
    with pytest.raises(KeyError, match="4b-fp8"):
        SPECS["qwen3-vl"].with_variant("8b")


def test_render_argv_for_vllm_032() -> None:
    spec = SPECS["dots-ocr"]
    argv = render_argv(spec, budget_for(spec), CARD_12, port=8000, host="0.0.0.0")
    assert "--disable-log-requests" not in argv
    assert "--no-enable-log-requests" in argv
    assert argv[0] == "rednote-hilab/dots.ocr"  # positional: `vllm serve --model` is deprecated
    flagged = render_argv(
        spec, budget_for(spec), CARD_12, port=8000, host="0.0.0.0", model_flag=True
    )
    assert flagged[:2] == ["--model", "rednote-hilab/dots.ocr"] and flagged[2:] == argv[1:]
    assert argv[argv.index("--max-model-len") + 1] == "24576"
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 1}'
    assert "--trust-remote-code" in argv and "--served-model-name" in argv
    assert engine_version(spec) == "0.32.0"
    old = spec.model_copy(update={"image": "vllm/vllm-openai:v0.9.2"})
    assert "--disable-log-requests" in render_argv(old, budget_for(old), CARD_12, port=1)
    assert "--enable-sleep-mode" in render_argv(
        spec, budget_for(spec), CARD_12, port=1, sleep_mode=True
    )


def test_redact_hides_secrets() -> None:
    assert redact(["--api-key", "sk-1", "--hf-token=abc", "--port", "1"]) == [
        "--api-key",
        "***",
        "--hf-token=***",
        "--port",
        "1",
    ]


def test_inline_spec_minimal() -> None:
    s = ModelSpec(
        name="m",
        hf_repo="a/b",
        options=VllmOptions(max_model_len=128),
        vram=VramModel(weights_gib=1, kv_bytes_per_token=1024),
    )
    assert s.api_name == "m" and s.spec_hash() == s.spec_hash()
    assert s.with_overrides(max_model_len=256).spec_hash() != s.spec_hash()
