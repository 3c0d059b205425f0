"""Measured budgets through the real supervisor (issue 8): the router's first start of a
stand-in model records what its log reported, and the next start plans and launches with it;
a start that fails for memory raises the estimate and the next start succeeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from supervisor_support import build

from vlmhub.control.contract import LoadFailed, Refused
from vlmhub.sizing.budgets import BudgetStore

SPEC: dict[str, Any] = {
    "hf_repo": "stub/m", "image": "vlmhub/stub-engine:dev", "vllm_version": "0.32.0",
    "startup_timeout_s": 30, "reload_cost_s": 1,
    "options": {"max_model_len": 4096, "max_num_seqs": 4, "enforce_eager": True},
    "vram": {"weights_gib": 2.0, "activation_gib": 0.5, "non_torch_gib": 0.2,
             "kv_bytes_per_token": 131072, "cuda_context_gib": 0.5},
}  # fmt: skip
MEASURED = {"VLMHUB_STUB_WEIGHTS_GIB": "1.2", "VLMHUB_STUB_ACTIVATION_GIB": "0.3",
            "VLMHUB_STUB_NON_TORCH_GIB": "0.1", "VLMHUB_STUB_KV_BYTES_PER_TOKEN": "131072"}


def engine_argv(tmp_path: Path) -> list[str]:
    (state,) = (tmp_path / "state" / "process").glob("*.json")
    argv: list[str] = json.loads(state.read_text())["argv"]
    return argv


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


async def test_the_routers_second_start_uses_the_measured_budget(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    sup, _, _ = build(tmp_path, {"m": {"spec": SPEC, "env": MEASURED}}, budgets=store)
    await sup.start()
    try:
        assert sup.snapshot()[0].budget_gib == pytest.approx(3.7)  # the estimate
        sup.release(await sup.acquire("m"))
        assert flag(engine_argv(tmp_path), "--kv-cache-memory-bytes") is None  # vLLM profiles
        r = sup.replicas["m"]
        assert r.budget_note and "measured" in r.budget_note
        assert r.model.budget is not None and r.model.budget.source.startswith("measured")
        assert len(store.entries()) == 1
        measured = sup.snapshot()[0].budget_gib
        assert measured < 3.7 - 0.5  # 1.6 measured (not 2.7) + margin + KV + context
        await sup.unload("m")
        sup.release(await sup.acquire("m"))
        argv = engine_argv(tmp_path)
        assert float(flag(argv, "--gpu-memory-utilization") or 1) < 0.4  # the estimate's 0.4
        assert flag(argv, "--kv-cache-memory-bytes") is not None
    finally:
        await sup.shutdown()


async def test_a_memory_failure_in_the_router_raises_the_budget(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "budgets.json")
    env = {**MEASURED, "VLMHUB_STUB_ACTIVATION_GIB": "1.5"}  # three times the estimate
    sup, _, _ = build(
        tmp_path, {"m": {"spec": SPEC, "env": env}}, budgets=store,
        router={"restart_backoff_s": 0.1},
    )
    await sup.start()
    try:
        before = sup.snapshot()[0].budget_gib
        with pytest.raises(LoadFailed):
            await sup.acquire("m")
        r = sup.replicas["m"]
        assert r.budget_note and "raised" in r.budget_note
        assert sup.snapshot()[0].budget_gib > before
        sup.release(await sup.acquire("m"))  # the next start succeeds with the raised budget
        assert sup.snapshot()[0].state == "ready"
    finally:
        await sup.shutdown()


async def test_a_busy_card_fails_the_start_but_never_raises_the_budget(tmp_path: Path) -> None:
    """Issue 21 item 3: another program held the card (vLLM's free-memory check): the start
    fails with that reason, the budget stays, and once the card is free the model starts."""
    store = BudgetStore(tmp_path / "budgets.json")
    sup, _, ledger = build(tmp_path, {"m": {"spec": SPEC, "env": MEASURED}}, budgets=store,
                           router={"restart_backoff_s": 0.1})  # fmt: skip
    foreign = ledger / "other-1.json"  # a program outside vlmhub holds 6 of the 8 GiB
    foreign.write_text(json.dumps({"ident": "other", "claim_gib": 6.0}))
    await sup.start()
    try:
        before = sup.snapshot()[0].budget_gib
        with pytest.raises(LoadFailed, match="free"):
            await sup.acquire("m")
        r = sup.replicas["m"]
        assert r.budget_note and "busy" in r.budget_note and "unchanged" in r.budget_note
        assert sup.snapshot()[0].budget_gib == before and store.entries() == []
        foreign.unlink()
        sup.release(await sup.acquire("m"))
        assert sup.snapshot()[0].state == "ready"
    finally:
        await sup.shutdown()


async def test_a_learned_budget_past_the_card_refuses_that_model_the_others_serve(
    tmp_path: Path,
) -> None:
    """Item 3: the reproduced state (a raise that no longer fits) used to stop the router
    from starting (ConfigError in resolve); now that model is refused with why and how to
    reset it, and the other model serves."""
    from vlmhub.config.registry import Registry
    from vlmhub.config.schema import load_config, resolve
    from vlmhub.sizing.budgets import key_for
    from vlmhub.sizing.vram import Gpu

    store = BudgetStore(tmp_path / "budgets.json")
    models = {"m": {"spec": SPEC, "env": MEASURED}, "n": {"spec": SPEC, "env": MEASURED}}
    sup, _, _ = build(tmp_path, models, budgets=store)  # writes models.yaml
    gpu = Gpu(8.0, 0, None, "test", "config")
    (m, _) = resolve(load_config(tmp_path / "models.yaml"), Registry().specs(), gpu)
    assert m.spec is not None
    store.raise_estimate(key_for(m.spec, gpu), "free memory 3.21 GiB < requested 9.78 GiB",
                         activation_gib=6.67)  # fmt: skip
    store.record(key_for(m.spec, gpu), {"model_load_gib": 5.5})  # measured: heavier weights
    sup, _, _ = build(tmp_path, models, budgets=store)
    refused = sup.replicas["m"].model.refusal
    assert refused is not None and "vlmhub budgets --reset m" in refused
    await sup.start()
    try:
        with pytest.raises(Refused, match="m needs"):
            await sup.acquire("m")
        sup.release(await sup.acquire("n"))
        assert {i.name: i.state for i in sup.snapshot()}["n"] == "ready"
    finally:
        await sup.shutdown()
