"""Measured budgets (issue 8 item 1) and ``together`` groups in models.yaml (item 2).

The stand-in engine prints vLLM's memory lines with figures from its env; a start records them
(`observe_start`), and the next plan and launch use them. A start that fails for memory raises
the estimate so that the next one succeeds. The real vLLM CPU tier checks the CPU lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import ResolvedModel, load_config, resolve, together_groups
from vlmhub.engine_log import LogParser
from vlmhub.engines import vllm_env
from vlmhub.engines.base import wait_ready
from vlmhub.engines.launch import launch_request
from vlmhub.engines.ports import free_port
from vlmhub.engines.process import ProcessRuntime
from vlmhub.errors import EngineStartError
from vlmhub.sizing.budgets import (
    RAISE_CAP_FRACTION,
    RAISE_TTL_DAYS,
    BudgetStore,
    key_for,
    learned,
    measured_from_facts,
    observe_start,
)
from vlmhub.sizing.flags import render_argv
from vlmhub.sizing.vram import Gpu, Measured, budget_for
from vlmhub.spec import GIB

NOW = datetime(2026, 12, 2, 9, 30, tzinfo=timezone(timedelta(hours=1)))
GPU = Gpu(8.0, 0.0, None, "Simulated 8G", "config")
VLMHUB = str(Path(sys.executable).parent / "vlmhub")
# The plugin-style estimate: 2.7 GiB + 0.5 GiB of KV (4,096 x 128 KiB) + 0.5 context.
SPEC: dict[str, Any] = {
    "hf_repo": "stub/m", "image": "vlmhub/stub-engine:dev", "vllm_version": "0.32.0",
    "startup_timeout_s": 30,
    "options": {"max_model_len": 4096, "max_num_seqs": 4, "enforce_eager": True},
    "vram": {"weights_gib": 2.0, "activation_gib": 0.5, "non_torch_gib": 0.2,
             "kv_bytes_per_token": 131072, "cuda_context_gib": 0.5},
}  # fmt: skip
# What the stand-in "measures": 1.6 GiB instead of the estimated 2.7.
REAL = {"VLMHUB_STUB_WEIGHTS_GIB": "1.2", "VLMHUB_STUB_ACTIVATION_GIB": "0.3",
        "VLMHUB_STUB_NON_TORCH_GIB": "0.1", "VLMHUB_STUB_KV_BYTES_PER_TOKEN": "131072",
        "VLMHUB_STUB_STARTUP_DELAY": "0.3"}  # fmt: skip


def write_config(tmp_path: Path, models: dict[str, Any], **top: Any) -> Path:
    lo = random.randrange(20000, 60000, 100)
    config = {
        "gpu": {"total_gib": 8, "reserve_gib": 0, "force_total": True},
        "runtime": {"kind": "process",
                    "process_argv": ["{python}", "-m", "vlmhub.testing.stub_engine"],
                    "port_range": [lo, lo + 99],
                    "env": {"VLMHUB_STUB_GPU_TOTAL_GIB": "8"}},
        "models": models,
        **top,
    }  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def model(tmp_path: Path, store: BudgetStore, env: dict[str, str]) -> ResolvedModel:
    path = tmp_path / "models.yaml"
    if not path.exists():
        write_config(tmp_path, {"m": {"spec": SPEC, "env": env}})
    return resolve(load_config(path), Registry().specs(), GPU, measured=store)[0]


def start(tmp_path: Path, m: ResolvedModel) -> tuple[list[str], LogParser, BaseException | None]:
    """Start ``m`` once with the real launch request; (argv, parsed log, error or None)."""
    loaded = load_config(tmp_path / "models.yaml")
    rt = ProcessRuntime(loaded.config.runtime, state_dir=tmp_path / "state")

    async def run() -> tuple[list[str], LogParser, BaseException | None]:
        req = launch_request(m, GPU, rt, loaded.config.runtime, free_port())
        handle = await rt.start(req)
        parser = LogParser()
        try:
            await wait_ready(rt, handle, timeout_s=30, parser=parser)
            return req.argv, parser, None
        except EngineStartError as exc:
            return req.argv, parser, exc
        finally:
            await rt.stop(handle, timeout_s=5)

    return asyncio.run(run())


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# --- the store ---------------------------------------------------------------------------


def test_store_is_keyed_by_memory_settings_written_atomically_and_forgets(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "state" / "budgets.json")
    spec = Registry().specs()["qwen3-vl"]
    key = key_for(spec, GPU)
    assert key.vllm_version == "0.32.0" and key.gpu == "Simulated 8G"
    assert store.lookup(key) is None and store.entries() == []
    facts = {"model_load_gib": 4.457, "peak_activation_gib": 0.8, "kv_cache_gib": 2.0,
             "kv_cache_tokens": 18720, "init_engine_seconds": 3.0}  # fmt: skip
    store.record(key, facts, NOW)
    m = store.lookup(key)
    assert m is not None and m.weights_gib == 4.457 and m.activation_gib == 0.8
    assert m.measured_on == "2026-12-02"
    assert m.kv_bytes_per_token == pytest.approx(2.0 * GIB / 18720)
    data = json.loads(store.path.read_text())
    assert data["schema"] == 1 and len(data["entries"]) == 1
    assert "init_engine_seconds" not in data["entries"][0]["facts"]  # memory facts only
    assert sorted(p.name for p in store.path.parent.iterdir()) == [
        "budgets.json", "budgets.json.lock"]  # fmt: skip  (no temp file left behind)
    # any memory-changing setting is another key: a measurement does not carry over
    for changed in (spec.with_caps(max_model_len=8192), spec.with_caps(max_num_seqs=1),
                    spec.with_caps(max_pixels=1_003_520), spec.with_variant("2b-fp8"),
                    spec.with_overrides(enforce_eager=True), spec.with_overrides(dtype="half"),
                    spec.with_overrides(kv_cache_dtype="fp8")):  # fmt: skip
        assert store.lookup(key_for(changed, GPU)) is None
    assert store.lookup(key_for(spec, Gpu(12.0, name="RTX 3060"))) is None
    assert store.lookup(key_for(spec, GPU, vllm_version="0.33.0")) is None
    store.path.write_text("{not json")  # a damaged file reads as empty, and is replaced
    assert store.entries() == []
    store.record(key, facts, NOW)
    store.record(key_for(spec.with_caps(max_num_seqs=1), GPU), facts, NOW)
    assert store.forget("dots-ocr") == 0 and store.forget("qwen3-vl") == 2
    assert store.entries() == []


def test_measured_parts_from_gpu_and_cpu_log_facts() -> None:
    new = measured_from_facts({"model_load_gib": 15.0, "consumed_gib": 15.25,
                               "peak_activation_gib": 1.66, "cuda_graph_gib": 0.14})
    parts = (new.weights_gib, new.non_torch_gib, new.activation_gib, new.cuda_graph_gib)
    assert parts == pytest.approx((15.0, 0.25, 1.66, 0.14))
    old = measured_from_facts({"weights_gib": 5.1, "non_torch_gib": 0.2})
    assert (old.weights_gib, old.non_torch_gib, old.activation_gib) == (5.1, 0.2, None)
    cpu = measured_from_facts({"checkpoint_gib": 0.56, "kv_cache_gib": 1.0,
                               "kv_cache_tokens": 1_048_576})  # fmt: skip
    assert cpu.weights_gib == 0.56 and cpu.kv_bytes_per_token == 1024


# --- stand-in engine: measured, then used ------------------------------------------------


def test_a_second_start_uses_the_budget_the_first_measured(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    first = model(tmp_path, store, REAL)
    assert first.budget is not None and first.budget.source == "estimated"
    assert first.budget.footprint_gib == pytest.approx(3.7)
    argv, parser, err = start(tmp_path, first)
    assert err is None, err
    # an estimate lets vLLM profile: only the fraction, and the log reports what it measured
    assert flag(argv, "--gpu-memory-utilization") == "0.400"
    assert flag(argv, "--kv-cache-memory-bytes") is None
    assert parser.facts["model_load_gib"] == 1.2 and parser.facts["peak_activation_gib"] == 0.3
    seen = observe_start(store, first, GPU, parser.facts, True, now=NOW)
    assert seen.kind == "measured" and "recorded the measured budget" in seen.message
    assert seen.model.budget is not None and seen.model.budget.source == "measured 2026-12-02"

    second = model(tmp_path, store, REAL)  # a new plan reads the store
    b = second.budget
    assert b is not None and b.source == "measured 2026-12-02"
    assert (b.weights_gib, b.activation_gib, b.non_torch_gib) == pytest.approx((1.2, 0.3, 0.1))
    assert b.margin_gib == pytest.approx(0.1)  # max(5 % of 1.6 GiB, 0.1 GiB)
    # measured + margin, the KV cache (at the measured 128 KiB/token, to block rounding), context
    assert b.footprint_gib == pytest.approx(1.7 + 0.5 + 0.5, rel=1e-3)
    argv2, parser2, err2 = start(tmp_path, second)
    assert err2 is None, err2
    assert flag(argv2, "--gpu-memory-utilization") == "0.275"  # 2.2 GiB of 8, not 3.2
    assert flag(argv2, "--kv-cache-memory-bytes") == str(b.kv_cache_bytes)
    assert b.kv_cache_bytes == pytest.approx(512 * 1024**2, rel=1e-3)
    assert parser2.facts["kv_cache_gib"] == 0.5  # the engine took exactly the planned KV


def test_a_memory_failure_raises_the_estimate_and_the_next_start_succeeds(
    tmp_path: Path,
) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    # the real activation (1.5 GiB) is three times the estimate: the KV cache comes up short
    env = {**REAL, "VLMHUB_STUB_ACTIVATION_GIB": "1.5"}
    first = model(tmp_path, store, env)
    _, parser, err = start(tmp_path, first)
    assert isinstance(err, EngineStartError) and err.code == "max_model_len", err
    seen = observe_start(store, first, GPU, parser.facts, False, err, now=NOW)
    assert seen.kind == "raised" and "raised its budget by 0.15 GiB" in seen.message
    assert seen.before is not None and seen.after is not None
    assert seen.after.footprint_gib == pytest.approx(seen.before.footprint_gib + 0.15)
    assert seen.after.source == "estimated" and "after a memory failure" in seen.after.label

    second = model(tmp_path, store, env)
    assert second.budget is not None and second.budget.activation_gib == pytest.approx(0.65)
    _, parser2, err2 = start(tmp_path, second)
    assert err2 is None, err2
    ok = observe_start(store, second, GPU, parser2.facts, True, now=NOW)
    # measured now: the real 1.5 GiB activation replaces estimate and raise alike
    assert ok.after is not None and ok.after.activation_gib == 1.5 and ok.after.raised_gib == 0


def test_no_cache_blocks_raises_by_at_least_the_planned_kv_cache(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    env = {**REAL, "VLMHUB_STUB_ACTIVATION_GIB": "2.0"}  # 3.3 GiB of fixed parts > U x total
    first = model(tmp_path, store, env)
    _, parser, err = start(tmp_path, first)
    assert isinstance(err, EngineStartError) and err.code == "no_cache_blocks", err
    seen = observe_start(store, first, GPU, parser.facts, False, err, now=NOW)
    assert seen.after is not None and seen.after.raised_gib == pytest.approx(0.5 + 0.25)
    _, _, err2 = start(tmp_path, model(tmp_path, store, env))
    assert err2 is None, err2


def test_a_busy_card_never_raises_the_budget(tmp_path: Path) -> None:
    """Issue 21 item 3: vLLM's free-memory check says another program held the card; that
    says nothing about the model, so nothing is recorded (it used to add the shortfall)."""
    store = BudgetStore(tmp_path / "budgets.json")
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    foreign = ledger / "other-1.json"  # another program holds 6 of the 8 GiB
    foreign.write_text(json.dumps({"ident": "other", "claim_gib": 6.0}))
    env = {**REAL, "VLMHUB_STUB_LEDGER": str(ledger)}
    first = model(tmp_path, store, env)
    _, parser, err = start(tmp_path, first)
    assert isinstance(err, EngineStartError) and err.code == "free_memory", err
    seen = observe_start(store, first, GPU, parser.facts, False, err, now=NOW)
    assert seen.kind == "busy" and "busy" in seen.message and "unchanged" in seen.message
    assert "2 GiB free < 3.2 GiB requested" in seen.message
    assert seen.after == seen.before and store.entries() == []
    foreign.unlink()
    _, _, err2 = start(tmp_path, model(tmp_path, store, env))
    assert err2 is None, err2


def test_raises_are_bounded_and_expire(tmp_path: Path) -> None:
    """Item 3: however many memory failures, raises add at most half the estimate; they end
    after RAISE_TTL_DAYS, and a good start ends a headroom raise."""
    store = BudgetStore(tmp_path / "budgets.json")
    m = model(tmp_path, store, REAL)
    assert m.spec is not None and m.budget is not None
    estimate, key = m.budget.footprint_gib, key_for(m.spec, GPU)
    oom = EngineStartError("m", "boom", [], "no_cache_blocks")
    for _ in range(10):
        observe_start(store, m, GPU, {}, False, oom, now=NOW)
    got = learned(store, m.spec, GPU, now=NOW)
    assert got is not None and 0 < got.raised_gib <= RAISE_CAP_FRACTION * estimate + 0.01
    later = NOW + timedelta(days=RAISE_TTL_DAYS + 1)
    expired = learned(store, m.spec, GPU, now=later)
    assert expired is not None and expired.raised_gib == 0
    again = observe_start(store, m, GPU, {}, False, oom, now=later)  # counts from 0 again
    assert again.after is not None and again.after.raised_gib == pytest.approx(0.75)
    # a file from before the cap (the reproduced +6.67 GiB of headroom) is held to it
    store.raise_estimate(key, "old", headroom_gib=6.67, now=NOW)
    legacy = learned(store, m.spec, GPU, now=NOW)
    assert legacy is not None and legacy.raised_gib <= RAISE_CAP_FRACTION * estimate + 0.01
    store.record(key, {"model_load_gib": 1.2}, NOW)  # a good start without an activation
    entry = store.find(key)
    assert entry is not None and entry.raised_headroom_gib == 0


def test_a_learned_budget_that_no_longer_fits_refuses_the_model_not_the_config(
    tmp_path: Path,
) -> None:
    """Item 3: the reproduced case (a learned raise past the card) used to be a ConfigError
    that kept `vlmhub route` from starting; now that model is refused with the reason and the
    reset command, and a plugin default that does not fit stays a config error."""
    store = BudgetStore(tmp_path / "state" / "budgets.json")  # the one `cli` uses
    write_config(tmp_path, {"m": {"spec": SPEC}, "n": {"spec": SPEC}})
    small = Gpu(5.0, 0.0, None, "Simulated 5G", "config")  # the 3.7 GiB estimate fits
    (m, n) = resolve(load_config(tmp_path / "models.yaml"), {}, small, measured=store)
    assert m.spec is not None and m.refusal is None
    store.raise_estimate(key_for(m.spec, small), "old", headroom_gib=6.67, now=datetime.now(UTC))
    (m, n) = resolve(load_config(tmp_path / "models.yaml"), {}, small, measured=store)
    assert m.refusal is not None and "vlmhub budgets --reset m" in m.refusal
    assert m.budget is not None and m.budget.footprint_gib > small.usable_gib
    assert n.refusal is None and n.budget is not None
    with pytest.raises(ConfigError, match=r"m needs 3\.70 GiB"):  # the estimate itself
        resolve(load_config(tmp_path / "models.yaml"), {}, Gpu(3.0, 0.0, None, "3G", "config"),
                measured=store)  # fmt: skip
    reset = cli(tmp_path, "budgets", "--reset", "m")
    assert reset.returncode == 0 and "Forgot 1" in reset.stdout, reset.stderr
    (m, _) = resolve(load_config(tmp_path / "models.yaml"), {}, small, measured=store)
    assert m.refusal is None


def test_other_failures_change_nothing(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    m = model(tmp_path, store, REAL)
    err = EngineStartError("m", "boom", ["ValueError: bad flag"], "invalid_argument")
    seen = observe_start(store, m, GPU, {}, False, err, now=NOW)
    assert seen.kind == "none" and store.entries() == []


# --- the CLI -----------------------------------------------------------------------------


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "250",
           "NO_COLOR": "1"}  # fmt: skip
    return subprocess.run([VLMHUB, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_serve_records_and_plan_budgets_show_and_forget_it(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, {"m": {"spec": SPEC, "env": REAL}}))
    before = cli(tmp_path, "plan", "--config", config)
    assert before.returncode == 0, before.stderr
    assert "estimated" in before.stdout and "measured" not in before.stdout
    assert "No measured budgets yet" in cli(tmp_path, "budgets").stdout
    served = cli(tmp_path, "serve", "m", "--detach", "--config", config)
    try:
        assert served.returncode == 0, served.stderr
        assert "m: recorded the measured budget (weights 1.20 GiB" in served.stdout
    finally:
        assert cli(tmp_path, "stop", "m", "--config", config).returncode == 0
    today = datetime.now().astimezone().date().isoformat()
    shown = cli(tmp_path, "budgets", "show")
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("│ m "))
    assert "1.20" in row and "0.30" in row and today in row and "len 4096" in row
    plan = cli(tmp_path, "plan", "--config", config)
    assert f"measured {today}" in plan.stdout and "--kv-cache-memory-bytes" in plan.stdout
    models = cli(tmp_path, "models")
    assert models.returncode == 0 and "estimated" in models.stdout  # plugins: not measured
    forgot = cli(tmp_path, "budgets", "forget", "m")
    assert "Forgot 1 measured budget(s) of 'm'" in forgot.stdout
    assert "measured" not in cli(tmp_path, "plan", "--config", config).stdout
    assert cli(tmp_path, "budgets", "forget").returncode == 2  # MODEL or --all


# --- together groups in models.yaml --------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_shipped_models_yaml_keeps_dots_ocr_and_qwen_together_on_12_gb() -> None:
    loaded = load_config(REPO / "models.yaml")
    assert together_groups(loaded.config) == [frozenset({"dots-ocr", "qwen3-vl"})]
    card = Gpu(12.0, 0.5)
    resolved = {m.name: m for m in resolve(loaded, Registry().specs(), card)}
    dots, qwen = resolved["dots-ocr"], resolved["qwen3-vl"]
    assert dots.group is qwen.group and dots.group is not None and dots.group.fits
    assert dots.budget is not None and qwen.budget is not None
    assert dots.budget.footprint_gib + qwen.budget.footprint_gib <= card.usable_gib + 1e-9
    assert dots.spec is not None and dots.spec.options.max_num_seqs == 1  # capped
    assert resolved["phi3-vision"].group is None
    # serving one member alone still plans it with the group's caps
    (alone,) = resolve(loaded, Registry().specs(), card, only=["dots-ocr"])
    assert alone.spec == dots.spec and alone.budget == dots.budget
    # on 24 GB nothing needs lowering
    wide = {m.name: m for m in resolve(loaded, Registry().specs(), Gpu(24.0, 0.5))}
    assert wide["dots-ocr"].group is not None and not wide["dots-ocr"].group.lowered


def test_plan_cli_on_12_gb_shows_the_pair_with_its_caps(tmp_path: Path) -> None:
    res = cli(tmp_path, "plan", "--config", str(REPO / "models.yaml"), "--gpu-gib", "12")
    assert res.returncode == 0, res.stderr
    assert "Together: dots-ocr + qwen3-vl fit together with lower caps" in res.stdout
    assert "max_pixels 11289600 -> " in res.stdout
    fits = res.stdout.split("What fits together")[1].splitlines()[1]
    assert "dots-ocr + qwen3-vl" in fits


def test_fit_with_merges_groups_and_bad_groups_are_located_errors(tmp_path: Path) -> None:
    stub = {**SPEC, "options": {**SPEC["options"], "max_num_seqs": 4, "max_model_len": 2048},
            "vram": {**SPEC["vram"], "weights_gib": 1.0, "kv_sequences": 4},
            "floors": {"max_num_seqs": 1}}
    models = {"a": {"spec": stub, "fit_with": ["b"]}, "b": {"spec": stub},
              "c": {"spec": stub, "fit_with": ["b"]}}  # fmt: skip
    loaded = load_config(write_config(tmp_path, models))
    assert together_groups(loaded.config) == [frozenset({"a", "b", "c"})]
    # three at 4 sequences (1 GiB of KV each) cannot share 8 GiB; at one sequence they do
    res = {m.name: m for m in resolve(loaded, Registry().specs(), GPU)}
    assert all(m.spec is not None and m.spec.options.max_num_seqs == 1 for m in res.values())
    bad = write_config(tmp_path, {"a": {"spec": stub}}, together=[["a", "nope"]])
    with pytest.raises(ConfigError) as err:
        resolve(load_config(bad), Registry().specs(), GPU)
    assert f"{bad}:" in str(err.value) and "together" in str(err.value)
    assert "no model named nope" in str(err.value)
    big = write_config(tmp_path, {n: {"spec": {**SPEC, "vram": {**SPEC["vram"],
                                                                "weights_gib": 3.0}}}
                                  for n in "xyz"}, together=[["x", "y", "z"]])  # fmt: skip
    with pytest.raises(ConfigError, match="cannot be resident together: even at the lowest"):
        resolve(load_config(big), Registry().specs(), GPU)


# --- real vLLM on the CPU ----------------------------------------------------------------


@pytest.mark.vllm
def test_real_vllm_cpu_start_records_its_checkpoint_and_kv_cache(
    vllm_python: Path, tmp_path: Path
) -> None:
    tiny = vllm_env.make_tiny_model(tmp_path / "tiny", seed=3, name="tiny")
    spec = {"hf_repo": str(tiny), "image": "vllm/vllm-openai:v0.32.0", "startup_timeout_s": 240,
            "options": {"max_model_len": 1024, "max_num_seqs": 4, "dtype": "bfloat16",
                        "enforce_eager": True},
            "vram": {"weights_gib": 1.0, "kv_bytes_per_token": 4096, "activation_gib": 0.5}}
    path = write_config(tmp_path, {"tiny": {"spec": spec}})
    cfg = yaml.safe_load(path.read_text())
    cfg["runtime"]["process_argv"] = [str(vllm_python), "-m",
                                      "vllm.entrypoints.openai.api_server"]
    cfg["runtime"]["env"] = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                             "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    store = BudgetStore(tmp_path / "budgets.json")
    m = model(tmp_path, store, {})
    loaded = load_config(path)
    rt = ProcessRuntime(loaded.config.runtime, state_dir=tmp_path / "state")

    async def run() -> LogParser:
        req = launch_request(m, GPU, rt, loaded.config.runtime, free_port())
        handle = await rt.start(req)
        parser = LogParser()
        try:
            await wait_ready(rt, handle, timeout_s=240, parser=parser)
        finally:
            await rt.stop(handle, timeout_s=10)
        return parser

    facts = asyncio.run(run()).facts
    # "Checkpoint size: X GiB" (vLLM CPU): the model's safetensors, to 0.01 GiB
    size = sum(f.stat().st_size for f in tiny.glob("*.safetensors")) / GIB
    assert facts["checkpoint_gib"] == round(size, 2)
    assert facts["kv_cache_gib"] == 1.0 and facts["kv_cache_tokens"] > 0
    seen = observe_start(store, m, GPU, facts, True, now=NOW)
    assert seen.after is not None and seen.after.source == "measured 2026-12-02"
    assert seen.after.weights_gib == facts["checkpoint_gib"]
    per_token = GIB / facts["kv_cache_tokens"]
    assert seen.after.kv_cache_gib == pytest.approx(1024 * per_token / GIB)
    assert model(tmp_path, store, {}).budget == seen.after  # the next plan uses it


@pytest.mark.vllm
def test_vllm_parser_accepts_the_together_caps_and_measured_flags(vllm_python: Path) -> None:
    card = Gpu(12.0, 0.5)
    resolved = resolve(load_config(REPO / "models.yaml"), Registry().specs(), card)
    argvs = {}
    for m in resolved:
        assert m.spec is not None
        measured = Measured(weights_gib=m.spec.vram.weights_gib, measured_on="2026-12-02")
        b = budget_for(m.spec, None, measured)
        argv = render_argv(m.spec, b, card, port=8000, host="0.0.0.0")
        assert "--kv-cache-memory-bytes" in argv
        argvs[m.name] = argv
    assert '"max_pixels": ' in " ".join(argvs["dots-ocr"])
    results = vllm_env.validate_argv(argvs)
    assert results == dict.fromkeys(argvs), {k: v for k, v in results.items() if v}
