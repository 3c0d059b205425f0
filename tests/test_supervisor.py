"""The supervisor over real stand-in engine processes: start once, queue, fail, evict, sleep."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from supervisor_support import build, model, used

from vlmhub.control.contract import LoadFailed, LoadTimeout, QueueFull, Refused, UnknownModel
from vlmhub.engines.process import ProcessRuntime


async def test_concurrent_requests_start_the_engine_once(tmp_path: Path) -> None:
    sup, rec, _ = build(tmp_path, {"a": model(1.0)}, delay=0.5)
    await sup.start()
    try:
        leases = await asyncio.gather(*(sup.acquire("a") for _ in range(12)))
        assert {lease.base_url for lease in leases} == {leases[0].base_url}
        assert rec.loads == [("a", True)]
        (info,) = sup.snapshot()
        assert info.state == "ready" and info.in_flight == 12
        for lease in leases:
            sup.release(lease)
            sup.release(lease)  # idempotent
        assert sup.snapshot()[0].in_flight == 0
    finally:
        await sup.shutdown()


async def test_unknown_model_lists_available(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0), "b": model(1.0, aliases=["bee"])})
    await sup.start()
    try:
        with pytest.raises(UnknownModel, match="available: a, b"):
            await sup.acquire("zzz")
        assert sup.resolve("bee") == "b"
    finally:
        await sup.shutdown()


async def test_bounded_queue_overflows_with_retry_after(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0, max_queue=3)}, delay=1.5)
    await sup.start()
    try:
        waiting = [asyncio.create_task(sup.acquire("a")) for _ in range(3)]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull) as err:
            await sup.acquire("a")
        assert err.value.retry_after and err.value.retry_after > 0
        assert err.value.status == 503
        for lease in await asyncio.gather(*waiting):
            sup.release(lease)
    finally:
        await sup.shutdown()


async def test_load_failure_releases_every_waiter_with_the_reason(tmp_path: Path) -> None:
    bad = model(1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "max-model-len"})
    sup, rec, _ = build(tmp_path, {"bad": bad})
    await sup.start()
    try:
        results = await asyncio.gather(
            *(sup.acquire("bad") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, LoadFailed) for r in results), results
        assert all("estimated maximum model length is 10240" in str(r) for r in results)
        info = sup.snapshot()[0]
        assert info.state == "failed" and info.last_error and "10240" in info.last_error
        assert rec.loads == [("bad", False)]
    finally:
        await sup.shutdown()


async def test_load_timeout_answers_504_with_the_engine_state(tmp_path: Path) -> None:
    slow = model(1.0, spec={"startup_timeout_s": 1.0})
    sup, _, _ = build(tmp_path, {"slow": slow}, delay=10)
    await sup.start()
    try:
        with pytest.raises(LoadTimeout) as err:
            await sup.acquire("slow")
        assert err.value.status == 504
        assert "did not become ready within 1 s" in str(err.value)
    finally:
        await sup.shutdown()


async def test_queue_timeout_means_no_request_waits_forever(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, delay=5, router={"queue_timeout_s": 0.5})
    await sup.start()
    try:
        with pytest.raises(LoadTimeout, match="was not ready after 0 s in the queue"):
            await sup.acquire("a")
    finally:
        await sup.shutdown()


async def test_swap_evicts_idle_lru_and_never_overcommits(tmp_path: Path) -> None:
    # 8 GiB; each model 3.25 GiB: two fit, three do not
    sup, rec, ledger = build(tmp_path, {n: model(3.0) for n in ("a", "b", "c")})
    await sup.start()
    try:
        for name in ("a", "b", "c", "a", "b"):
            lease = await sup.acquire(name)
            assert used(ledger) <= 8.0 + 1e-6
            sup.release(lease)
        states = {i.name: i.state for i in sup.snapshot()}
        assert states == {"a": "ready", "b": "ready", "c": "stopped"}
        assert rec.evictions == [("a", "stop"), ("b", "stop"), ("c", "stop")]
    finally:
        await sup.shutdown()


async def test_busy_model_is_drained_not_cut_off(tmp_path: Path) -> None:
    # the fifo policy swaps at once, which is what this drain test needs (the vlmhub policy
    # would hold a, just loaded and busy: tests/test_scheduler.py)
    sup, rec, _ = build(tmp_path, {"a": model(5.0), "b": model(5.0)}, router={"policy": "fifo"})
    await sup.start()
    try:
        held = await sup.acquire("a")
        want_b = asyncio.create_task(sup.acquire("b"))
        await asyncio.sleep(1.0)
        assert not want_b.done(), "b must wait while a has a request in flight"
        info = {i.name: i for i in sup.snapshot()}
        assert info["a"].state == "ready" and info["a"].draining and info["a"].in_flight == 1
        # new requests for a draining model queue instead of landing on it
        again_a = asyncio.create_task(sup.acquire("a"))
        await asyncio.sleep(0.2)
        assert not again_a.done()
        sup.release(held)
        lease_b = await asyncio.wait_for(want_b, 10)
        assert rec.evictions == [("a", "stop")]
        sup.release(lease_b)
        sup.release(await asyncio.wait_for(again_a, 10))  # and a comes back after b
    finally:
        await sup.shutdown()


async def test_drain_timeout_refuses_instead_of_breaking_the_request(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(5.0), "b": model(5.0)}, router={"drain_timeout_s": 0.5})
    await sup.start()
    try:
        held = await sup.acquire("a")
        with pytest.raises(Refused, match="still had requests running"):
            await sup.acquire("b")
        info = {i.name: i for i in sup.snapshot()}
        assert info["a"].state == "ready" and not info["a"].draining
        sup.release(held)
    finally:
        await sup.shutdown()


async def test_pinned_model_is_never_evicted(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(5.0, pinned=True, preload=True), "b": model(5.0)})
    await sup.start()
    try:
        await sup.load("a")
        with pytest.raises(Refused, match=r"Pinned models hold: a \(5.25 GiB\)"):
            await sup.acquire("b")
        assert {i.name: i.state for i in sup.snapshot()} == {"a": "ready", "b": "stopped"}
    finally:
        await sup.shutdown()


async def test_preload_and_ttl(tmp_path: Path) -> None:
    sup, rec, _ = build(tmp_path, {"a": model(1.0, preload=True, ttl=0.6)})
    await sup.start()
    try:
        for _ in range(100):
            if sup.snapshot()[0].state == "ready":
                break
            await asyncio.sleep(0.05)
        assert sup.snapshot()[0].state == "ready"
        for _ in range(100):
            if sup.snapshot()[0].state == "stopped":
                break
            await asyncio.sleep(0.05)
        assert sup.snapshot()[0].state == "stopped"
        assert rec.evictions == [("a", "stop")]
    finally:
        await sup.shutdown()


async def test_crash_is_detected_and_restarted_on_next_request(tmp_path: Path) -> None:
    sup, _rec, _ = build(tmp_path, {"a": model(1.0)})
    await sup.start()
    try:
        lease = await sup.acquire("a")
        sup.release(lease)
        handle = sup.replicas["a"].handle
        assert handle is not None
        os.killpg(int(handle.ident), signal.SIGKILL)
        for _ in range(100):
            if sup.snapshot()[0].state == "failed":
                break
            await asyncio.sleep(0.05)
        info = sup.snapshot()[0]
        assert info.state == "failed" and info.last_error and "crashed" in info.last_error
        lease = await asyncio.wait_for(sup.acquire("a"), 15)
        assert sup.snapshot()[0].state == "ready" and sup.snapshot()[0].restarts == 1
        sup.release(lease)
    finally:
        await sup.shutdown()


async def test_crash_loop_guard_stops_restarting(tmp_path: Path) -> None:
    bad = model(1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"})
    sup, rec, _ = build(
        tmp_path, {"bad": bad}, router={"crash_loop_max": 2, "restart_backoff_s": 0.1}
    )
    await sup.start()
    try:
        for _ in range(2):
            with pytest.raises(LoadFailed, match="No available memory for the cache blocks"):
                await sup.acquire("bad")
        with pytest.raises(LoadFailed, match="crash loop"):
            await asyncio.wait_for(sup.acquire("bad"), 10)
        assert [ok for _, ok in rec.loads] == [False, False]
    finally:
        await sup.shutdown()


async def test_sleep_mode_swap_accounts_for_the_residue(tmp_path: Path) -> None:
    sup, rec, ledger = build(tmp_path, {"a": model(4.0, sleep=True), "b": model(4.0)})
    await sup.start()
    try:
        sup.release(await sup.acquire("a"))
        sup.release(await sup.acquire("b"))  # a (4.25) sleeps: 1.25 + b 4.25 <= 8
        info = {i.name: i.state for i in sup.snapshot()}
        assert info == {"a": "sleeping", "b": "ready"}
        assert rec.evictions == [("a", "sleep")]
        assert used(ledger) <= 8.0
        sup.release(await sup.acquire("a"))  # wake: b must go first (vLLM does not check)
        assert {i.name: i.state for i in sup.snapshot()} == {"a": "ready", "b": "stopped"}
        assert rec.loads[-1] == ("a", True) and len(rec.loads) == 3
    finally:
        await sup.shutdown()


async def test_adoption_after_restart_and_stale_engines_are_replaced(tmp_path: Path) -> None:
    sup, _rec, _ = build(tmp_path, {"a": model(1.0), "b": model(1.0), "c": model(1.0)})
    await sup.start()
    for name in ("a", "b", "c"):
        sup.release(await sup.acquire(name))
    port_a = sup.snapshot()[0].port
    await sup.shutdown(stop_engines=False)
    # "restart vlmhub": a new supervisor over the same state dir; b's spec changed meanwhile,
    # and c is no longer configured
    sup2, rec2, _ = build(tmp_path, {"a": model(1.0), "b": model(1.5)})
    await sup2.start()
    runtime = ProcessRuntime(sup2.config.runtime, state_dir=tmp_path / "state")
    try:
        info = {i.name: i for i in sup2.snapshot()}
        assert info["a"].state == "ready" and info["a"].port == port_a
        assert info["b"].state == "stopped"
        assert [h.name for h in sup2.foreign] == ["c"]  # left alone, and reported
        assert rec2.loads == []
        sup2.release(await sup2.acquire("a"))
        assert rec2.loads == []  # served by the adopted engine
        assert sorted(h.name for h in await runtime.adopt()) == ["a", "c"]
    finally:
        await sup2.shutdown()
        for h in await runtime.adopt():
            await runtime.stop(h)


async def test_external_endpoint_is_routed_and_never_started(tmp_path: Path) -> None:
    sup, _rec, _ = build(tmp_path, {"a": model(1.0)})
    await sup.start()
    try:
        lease = await sup.acquire("a")
        ext_url = lease.base_url
        sup.release(lease)
        (tmp_path / "x").mkdir()
        sup2, rec2, _ = build(tmp_path / "x", {"ext": {"url": ext_url, "served_model_name": "a"}})
        await sup2.start()
        try:
            lease2 = await sup2.acquire("ext")
            assert lease2.external and lease2.base_url == ext_url and lease2.api_name == "a"
            sup2.release(lease2)
            assert rec2.loads == [] and sup2.snapshot()[0].budget_gib == 0
        finally:
            await sup2.shutdown()
        # the external engine is gone: the health loop marks it failed, acquire fails fast
        await sup.unload("a")
        (tmp_path / "y").mkdir()
        sup3, _, _ = build(tmp_path / "y", {"ext": {"url": ext_url}})
        await sup3.start()
        try:
            for _ in range(60):
                if sup3.snapshot()[0].state == "failed":
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(LoadFailed, match="unreachable"):
                await sup3.acquire("ext")
        finally:
            await sup3.shutdown()
    finally:
        await sup.shutdown()


async def test_a_client_that_leaves_the_queue_leaks_no_lease(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0)}, delay=1.0)
    await sup.start()
    try:
        leaving = asyncio.create_task(sup.acquire("a"))
        staying = asyncio.create_task(sup.acquire("a"))
        await asyncio.sleep(0.3)
        leaving.cancel()
        lease = await asyncio.wait_for(staying, 15)
        assert sup.snapshot()[0].in_flight == 1
        assert sup.snapshot()[0].queued == 0
        sup.release(lease)
        assert sup.snapshot()[0].in_flight == 0
        with pytest.raises(asyncio.CancelledError):
            await leaving
    finally:
        await sup.shutdown()


async def test_sleep_failure_falls_back_to_stop(tmp_path: Path) -> None:
    # /sleep answers 500 (as vLLM does on an OOM while offloading, vLLM #48680)
    sleeper = model(4.0, sleep=True, env={"VLMHUB_STUB_SLEEP_FAILS": "1"})
    sup, rec, ledger = build(tmp_path, {"a": sleeper, "b": model(4.0)})
    await sup.start()
    try:
        sup.release(await sup.acquire("a"))
        sup.release(await sup.acquire("b"))
        assert {i.name: i.state for i in sup.snapshot()} == {"a": "stopped", "b": "ready"}
        assert rec.evictions == [("a", "stop")]
        assert used(ledger) <= 8.0
    finally:
        await sup.shutdown()
