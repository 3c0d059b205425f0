"""Several GPUs in one machine without Ray (issue 24 item 3): each card a node of its own.

Real parts throughout: the process runtime spawns stand-in engines on a pretend machine of two
cards (``VLMHUB_STUB_GPUS``; each card its own ledger), the real supervisor places them, the
engines' environments are read from /proc, ``vlmhub ps`` runs as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from supervisor_support import build, model, routed, used

from vlmhub.config.gpu import STUB_GPUS_ENV, device_totals
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import GpuConfig, RuntimeConfig, load_config
from vlmhub.engines.devices import Devices, local_devices
from vlmhub.engines.docker import device_requests
from vlmhub.engines.process import ProcessRuntime

VLMHUB = str(Path(sys.executable).with_name("vlmhub"))
TWO_CARDS = {STUB_GPUS_ENV: "8,8"}


# -- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("devices", "says"), [
    ("[0, 0]", "gpu.devices: lists a device twice"),
    ("[-1]", "gpu.devices.0: Input should be greater than or equal to 0"),
    ("[]", "gpu.devices: List should have at least 1 item"),
    ("gpu1", "gpu.devices: Input should be a valid list"),
])
def test_gpu_devices_errors_name_the_file_and_line(tmp_path: Path, devices: str,
                                                   says: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(f"gpu:\n  total_gib: 8\n  devices: {devices}\nmodels: {{}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:3: {says}" in str(err.value)


def test_devices_default_to_every_card_and_take_each_cards_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STUB_GPUS_ENV, "8,12")
    assert device_totals(GpuConfig(total_gib=4)) == {0: 8.0, 1: 12.0}  # every card listed
    assert device_totals(GpuConfig(devices=[1])) == {1: 12.0}
    assert device_totals(GpuConfig(devices=[1, 3], total_gib=6)) == {1: 12.0, 3: 6.0}
    with pytest.raises(ConfigError, match="card 3 was not found"):
        device_totals(GpuConfig(devices=[3]))
    monkeypatch.setenv(STUB_GPUS_ENV, "2")  # two cards of the configured size
    assert device_totals(GpuConfig(total_gib=10)) == {0: 10.0, 1: 10.0}
    monkeypatch.setenv(STUB_GPUS_ENV, "two")
    with pytest.raises(ConfigError, match="not a pretend machine"):
        device_totals(GpuConfig(total_gib=10))
    monkeypatch.delenv(STUB_GPUS_ENV)
    # no card listed (no NVML here) and none configured: the single-GPU path, unchanged
    assert device_totals(GpuConfig(total_gib=8, force_total=True)) == {}
    assert device_totals(GpuConfig(total_gib=8, force_total=True, devices=[0, 1])) == {
        0: 8.0, 1: 8.0}  # without NVML each configured card is total_gib


def test_each_card_is_a_node_and_names_its_engines_card() -> None:
    two = local_devices(GpuConfig(total_gib=8, force_total=True, devices=[0, 1]))
    assert two.nodes() == {"gpu0": 8.0, "gpu1": 8.0}
    assert two.env("gpu1") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert two.env("w2") == {}  # not a card of this machine
    one = Devices({1: 8.0}, pinned=True)  # gpu.devices: [1]: one GPU, still card 1
    assert one.nodes() is None and one.env("") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert Devices().nodes() is None and Devices().env("") == {}


# -- Docker: the device request a container is created with -----------------------------------
def _shape(reqs: list[Any]) -> list[tuple[Any, Any, Any]]:
    return [(r["Count"], r["DeviceIDs"], r["Capabilities"]) for r in reqs]


def test_docker_asks_for_the_nodes_cards_not_every_card() -> None:
    assert _shape(device_requests("all", [1])) == [(0, ["1"], [["gpu"]])]
    assert _shape(device_requests(None, [0])) == [(0, ["0"], [["gpu"]])]
    assert _shape(device_requests("all", [])) == [(-1, [], [["gpu"]])]  # one GPU: as before
    assert _shape(device_requests("0, 2", [])) == [(0, ["0", "2"], [["gpu"]])]
    assert device_requests(None, []) == []


@pytest.mark.docker
def test_docker_creates_the_container_with_its_cards(docker_client: Any,
                                                     stub_image: str) -> None:
    """The real Docker engine stores the request (created, not started: no nvidia runtime
    is needed to create it)."""
    c = docker_client.containers.create(stub_image, ["stub/x"],
                                        device_requests=device_requests("all", [1]))
    try:
        c.reload()
        (req,) = c.attrs["HostConfig"]["DeviceRequests"]
        assert req["DeviceIDs"] == ["1"] and req["Capabilities"] == [["gpu"]]
    finally:
        c.remove(force=True)


# -- the process runtime on a pretend machine of two cards -------------------------------------
class TwoCards(ProcessRuntime):
    """The process runtime of a machine of two 8 GiB cards (``gpu.devices: [0, 1]``)."""

    def __init__(self, rc: RuntimeConfig, state_dir: Path | None = None) -> None:
        super().__init__(rc, state_dir, devices=local_devices(
            GpuConfig(total_gib=8, force_total=True, devices=[0, 1])))


def _visible(pid: str) -> str | None:
    """CUDA_VISIBLE_DEVICES in the environment the engine process was started with."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        key, _, value = item.partition(b"=")
        if key == b"CUDA_VISIBLE_DEVICES":
            return value.decode()
    return None


async def test_two_cards_run_two_models_at_once_and_evict_per_card(tmp_path: Path) -> None:
    # each model 5.25 GiB: two do not fit one 8 GiB card together, one fits each card
    models = {n: model(5.0) for n in ("a", "b", "c")}
    sup, rec, ledger = build(tmp_path, models, stub_env=TWO_CARDS, runtime_type=TwoCards)
    async with routed(sup) as url:
        la = await asyncio.wait_for(sup.acquire("a"), 60)
        lb = await asyncio.wait_for(sup.acquire("b"), 60)  # beside a, on the other card
        assert rec.evictions == []
        info = {i.name: i for i in sup.snapshot()}
        assert info["a"].state == info["b"].state == "ready"
        assert {info["a"].node, info["b"].node} == {"gpu0", "gpu1"}
        pids = {n: sup.replicas[n].handle.ident for n in ("a", "b")}  # type: ignore[union-attr]
        for n in ("a", "b"):  # each engine sees its own card, and charged that card's ledger
            card = info[n].node.removeprefix("gpu")
            assert _visible(pids[n]) == card
            assert [e["model"] for e in _ledger(ledger / f"gpu{card}")] == ["stub/x"]
        async with httpx.AsyncClient(trust_env=False) as http:
            cards = (await http.get(f"{url}/v1/models")).json()["data"]
            api = (await http.get(f"{url}/api/models")).json()
        assert {c["id"]: c.get("node") for c in cards} == {
            "a": info["a"].node, "b": info["b"].node, "c": None}
        shown = {m["name"]: m.get("node") for m in _models(api)}
        assert shown["a"] == info["a"].node and shown["b"] == info["b"].node
        ps = _ps(tmp_path)
        assert {r["name"]: r.get("node") for r in ps} == {"a": info["a"].node,
                                                          "b": info["b"].node}
        sup.release(la)
        sup.release(lb)
        # c fits neither card beside its model: it evicts one of them, on that card only
        lc = await asyncio.wait_for(sup.acquire("c"), 60)
        (victim, _mode), = rec.evictions
        kept = "b" if victim == "a" else "a"
        after = {i.name: i for i in sup.snapshot()}
        assert after["c"].node == info[victim].node
        assert after[kept].state == "ready"
        assert sup.replicas[kept].handle.ident == pids[kept]  # type: ignore[union-attr]
        for card in ("gpu0", "gpu1"):
            assert used(ledger / card) <= 8.0 + 1e-6
        sup.release(lc)


def _ledger(folder: Path) -> list[dict[str, Any]]:
    from vlmhub.testing.stub_engine import read_ledger

    return read_ledger(folder)


def _models(api: Any) -> list[dict[str, Any]]:
    return list(api["models"] if isinstance(api, dict) else api)


def _ps(tmp_path: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "NO_COLOR": "1",
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    out = subprocess.run([VLMHUB, "ps", "--json", "--config", str(tmp_path / "models.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                         check=True, stdin=subprocess.DEVNULL)
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def test_a_stand_in_charges_the_ledger_of_its_first_visible_card() -> None:
    from vlmhub.testing.stub_gpus import NoDevice, card

    env = {"VLMHUB_STUB_GPUS": "8,12", "CUDA_VISIBLE_DEVICES": "1"}
    assert card("/l", None, 24.0, env) == ("/l/gpu1", 12.0)
    assert card("/l", 6.0, 24.0, {"VLMHUB_STUB_GPUS": "2"}) == ("/l/gpu0", 6.0)
    assert card("/l", 6.0, 24.0, {}) == ("/l", 6.0)  # one card: the ledger dir itself
    with pytest.raises(NoDevice, match="No CUDA GPUs are available"):
        card("/l", None, 24.0, {**env, "CUDA_VISIBLE_DEVICES": "2"})


# -- tensor parallelism (tensor_parallel_size: k): one engine on k cards ----------------------
def _resolve_tp(tmp_path: Path, tp: object, devices: int = 2, kind: str = "process") -> Any:
    from vlmhub.config.registry import Registry
    from vlmhub.config.schema import resolve
    from vlmhub.sizing.vram import Gpu

    path = tmp_path / "models.yaml"
    entry = {**model(10.0), "tensor_parallel_size": tp}
    path.write_text(json.dumps({"gpu": {"total_gib": 8, "reserve_gib": 0, "force_total": True},
                                "runtime": {"kind": kind}, "models": {"big": entry}}))
    gpu = Gpu(8.0, 0.0, None, "test", "config", devices=devices)
    return path, resolve(load_config(path), Registry().specs(), gpu)


@pytest.mark.parametrize(("tp", "devices", "kind", "says"), [
    (3, 4, "process", "tensor_parallel_size 3 is not a power of two"),
    (4, 2, "process", "tensor_parallel_size 4 needs 4 GPUs; engines may use 2 here"),
    (2, 2, "ray", "tensor_parallel_size above 1 is not supported with the ray runtime"),
    (0, 2, "process", "Input should be greater than or equal to 1"),
])
def test_tensor_parallel_size_errors_name_the_file_line_and_fix(
        tmp_path: Path, tp: int, devices: int, kind: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _resolve_tp(tmp_path, tp, devices, kind)
    (problem,) = err.value.problems
    assert problem.startswith(f"{tmp_path / 'models.yaml'}:1: models.big.tensor_parallel_size")
    assert says in problem and ("Fix: " in problem or tp == 0)


def test_a_tp_models_budget_is_per_device_and_its_flags_say_so(tmp_path: Path) -> None:
    from vlmhub.sizing.flags import render_argv
    from vlmhub.sizing.parallel import TP_RANK_OVERHEAD_GIB
    from vlmhub.sizing.vram import Gpu

    with pytest.raises(ConfigError, match=r"big needs 10\.25 GiB"):  # fits no 8 GiB card alone
        _resolve_tp(tmp_path, 1)
    _, (m,) = _resolve_tp(tmp_path, 2)
    b = m.budget
    # weights / 2 + a rank's buffers + KV of half the heads (0.25 GiB / 2): on EACH card
    assert b.weights_gib == pytest.approx(5.0)
    assert b.non_torch_gib == pytest.approx(TP_RANK_OVERHEAD_GIB)
    assert b.kv_cache_gib == pytest.approx(0.125)
    assert b.footprint_gib == pytest.approx(5.0 + TP_RANK_OVERHEAD_GIB + 0.125)
    argv = render_argv(m.spec, b, Gpu(8.0), port=9000)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    util = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert util == pytest.approx(b.engine_gib / 8.0, abs=1e-3)  # a fraction of EACH card
    tp1 = m.spec.model_copy(update={"options": m.spec.options.model_copy(
        update={"tensor_parallel_size": 1})})
    assert m.spec.spec_hash() != tp1.spec_hash()


def test_a_tp_engine_sees_all_its_cards() -> None:
    from vlmhub.engines import devices as dev
    from vlmhub.scheduling import placement

    assert dev.JOIN == placement.JOIN  # the engines layer repeats the scheduling separator
    two = local_devices(GpuConfig(total_gib=8, force_total=True, devices=[0, 1]))
    assert two.ids("gpu0+gpu1") == [0, 1]
    assert two.env(placement.joined(["gpu0", "gpu1"])) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert two.ids("gpu0+gpu7") == []  # a card this machine lacks: no card at all
    assert _shape(device_requests("all", two.ids("gpu0+gpu1"))) == [(0, ["0", "1"], [["gpu"]])]


def test_a_tp_stand_in_charges_each_of_its_cards() -> None:
    from vlmhub.testing.stub_gpus import NoDevice, cards

    env = {"VLMHUB_STUB_GPUS": "8,12", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert cards("/l", None, 24.0, env, ranks=2) == [("/l/gpu0", 8.0), ("/l/gpu1", 12.0)]
    with pytest.raises(NoDevice, match="World size"):
        cards("/l", None, 24.0, {**env, "CUDA_VISIBLE_DEVICES": "1"}, ranks=2)


@pytest.mark.docker
def test_docker_creates_a_tp_container_with_both_cards(docker_client: Any,
                                                       stub_image: str) -> None:
    c = docker_client.containers.create(stub_image, ["stub/x"],
                                        device_requests=device_requests("all", [0, 1]))
    try:
        c.reload()
        (req,) = c.attrs["HostConfig"]["DeviceRequests"]
        assert req["DeviceIDs"] == ["0", "1"]
    finally:
        c.remove(force=True)


async def test_a_tp_model_spans_both_cards_and_a_small_one_evicts_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pretend 8 GiB cards; big (tensor_parallel_size 2, 5.375 GiB on each card) and small
    (5.25 GiB, one card): big runs on both cards with CUDA_VISIBLE_DEVICES=0,1 and is charged
    on both ledgers; small fits beside it on neither card, so placement evicts big; big back
    needs both cards, so it evicts small."""
    import functools

    import supervisor_support

    from vlmhub.sizing.vram import Gpu

    monkeypatch.setattr(supervisor_support, "Gpu", functools.partial(Gpu, devices=2))
    models = {"big": {**model(10.0), "tensor_parallel_size": 2}, "small": model(5.0)}
    sup, rec, ledger = build(tmp_path, models, stub_env=TWO_CARDS, runtime_type=TwoCards)
    async with routed(sup):
        lease = await asyncio.wait_for(sup.acquire("big"), 60)
        info = {i.name: i for i in sup.snapshot()}
        assert info["big"].node == "gpu0+gpu1"
        pid = sup.replicas["big"].handle.ident  # type: ignore[union-attr]
        assert _visible(pid) == "0,1"
        for card in ("gpu0", "gpu1"):  # each rank's card is charged its share
            (entry,) = _ledger(ledger / card)
            assert entry["claim_gib"] == pytest.approx(5.375, abs=0.01)
        sup.release(lease)
        lease = await asyncio.wait_for(sup.acquire("small"), 60)
        assert [v for v, _ in rec.evictions] == ["big"]
        node = {i.name: i for i in sup.snapshot()}["small"].node
        assert node in ("gpu0", "gpu1")
        for card in ("gpu0", "gpu1"):
            assert [e["claim_gib"] < 5.3 for e in _ledger(ledger / card)] == (
                [True] if card == node else [])
        sup.release(lease)
        lease = await asyncio.wait_for(sup.acquire("big"), 60)
        assert [v for v, _ in rec.evictions] == ["big", "small"]
        for card in ("gpu0", "gpu1"):
            assert used(ledger / card) <= 8.0 + 1e-6
        sup.release(lease)
